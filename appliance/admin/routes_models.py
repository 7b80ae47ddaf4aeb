"""The Models page: every GGUF, aliases, default, prices, load / unload / delete, and pulls."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from litestar import Request, Response, get, post
from litestar.response import Redirect, Template

from appliance.admin.forms import (
    AliasForm,
    AliasNameForm,
    DeleteForm,
    FormError,
    ModelForm,
    PriceForm,
    PullForm,
    read_form,
)
from appliance.admin.modelinfo import GGUFSummary, gguf_summary
from appliance.admin.pulls import PullError
from appliance.admin.views import is_htmx, page
from appliance.api.deps import services
from appliance.engine.protocol import ModelInfo
from appliance.errors import ApplianceError, NotFoundError
from appliance.services import Services
from appliance.store.ledger import DEFAULT_PRICES, Price
from appliance.store.money import format_credits, parse_credits

__all__ = ["ROUTES"]

_SPLIT = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})$")


@dataclass(frozen=True, slots=True)
class ModelRow:
    info: ModelInfo
    meta: GGUFSummary
    aliases: list[str]
    price: Price
    custom_price: bool
    is_default: bool
    loading: bool

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def filename(self) -> str:
        return Path(self.info.path).name

    @property
    def price_in(self) -> Decimal:
        return format_credits(self.price.input_per_million) or Decimal(0)

    @property
    def price_out(self) -> Decimal:
        return format_credits(self.price.output_per_million) or Decimal(0)


def _default_id(found: Services) -> str:
    try:
        return found.engine.resolve("")
    except ApplianceError:
        return ""


async def models_context(found: Services, **extra: Any) -> dict[str, Any]:
    engine = found.engine

    def scan() -> tuple[list[ModelInfo], list[GGUFSummary], str]:
        # Listing reads GGUF headers (tens of ms for a big vocabulary): keep it off the loop.
        infos = engine.models()
        return infos, [gguf_summary(i.path) for i in infos], _default_id(found)

    infos, metas, default = await asyncio.to_thread(scan)
    status = engine.status()
    aliases: dict[str, str] = await found.owner.get("aliases", {})
    prices = await found.ledger.prices()
    fallback = prices.get("*", DEFAULT_PRICES)
    rows = []
    for info, meta in zip(infos, metas, strict=True):
        rows.append(
            ModelRow(
                info=info,
                meta=meta,
                aliases=sorted(a for a, target in aliases.items() if target == info.id),
                price=prices.get(info.id, fallback),
                custom_price=info.id in prices,
                is_default=info.id == default,
                loading=info.id in status.loading,
            )
        )
    return {
        "models": rows,
        "pulls": found.pulls.list(),
        "status": status,
        "default_price": fallback,
        "models_dir": str(found.settings.models_dir),
        "notice": "",
        "error": "",
        "confirm": None,
        **extra,
    }


def _find(found: Services, model_id: str) -> ModelInfo:
    for info in found.engine.models():
        if info.id == model_id:
            return info
    raise NotFoundError(f"There is no model '{model_id}'.")


Action = Callable[[Request[Any, Any, Any], Services], Awaitable[str]]


async def _act(request: Request[Any, Any, Any], action: Action) -> Template:
    """Run ``action``; show the page with its notice, or with the error (never a 500)."""
    found = services(request)
    try:
        notice = await action(request, found)
    except FormError as exc:
        context = await models_context(found, error=exc.message)
        return page(request, "models", context, status_code=400)
    except PullError as exc:
        return page(request, "models", await models_context(found, error=str(exc)), status_code=400)
    except ApplianceError as exc:
        status = exc.status_code if exc.status_code < 500 else 409
        context = await models_context(found, error=exc.message)
        return page(request, "models", context, status_code=status)
    return page(request, "models", await models_context(found, notice=notice))


@get("/models")
async def models_page(request: Request[Any, Any, Any]) -> Template:
    return page(request, "models", await models_context(services(request)))


async def _set_alias(request: Request[Any, Any, Any], found: Services) -> str:
    form = await read_form(request, AliasForm)
    info = _find(found, form.model)
    if any(m.id == form.alias.lower() for m in found.engine.models()):
        raise FormError(f"'{form.alias}' is already a model id; pick another alias.", "alias")
    aliases: dict[str, str] = dict(await found.owner.get("aliases", {}))
    aliases[form.alias] = info.id
    await found.owner.set("aliases", aliases)
    found.engine.configure(aliases=aliases)
    return f"'{form.alias}' now names {info.id}."


async def _remove_alias(request: Request[Any, Any, Any], found: Services) -> str:
    form = await read_form(request, AliasNameForm)
    aliases: dict[str, str] = dict(await found.owner.get("aliases", {}))
    if aliases.pop(form.alias, None) is None:
        raise FormError(f"There is no alias '{form.alias}'.", "alias")
    await found.owner.set("aliases", aliases)
    found.engine.configure(aliases=aliases)
    return f"Removed the alias '{form.alias}'."


async def _set_default(request: Request[Any, Any, Any], found: Services) -> str:
    info = _find(found, (await read_form(request, ModelForm)).model)
    await found.owner.set("default_model", info.id)
    found.engine.configure(default_model=info.id)
    return f"{info.id} is now the default model."


def _price(text: str, label: str) -> int:
    try:
        value = parse_credits(text)
    except ValueError as exc:
        raise FormError(f"{label}: {exc}.", label) from None
    if value < 0 or value > 10**18:
        raise FormError(f"{label}: must be between 0 and 1e9 credits.", label)
    return value


async def _set_price(request: Request[Any, Any, Any], found: Services) -> str:
    form = await read_form(request, PriceForm)
    info = _find(found, form.model)
    price = Price(_price(form.input, "Input price"), _price(form.output, "Output price"))
    await found.ledger.set_price(info.id, price)
    return f"Prices for {info.id} saved."


async def _load(request: Request[Any, Any, Any], found: Services) -> str:
    info = _find(found, (await read_form(request, ModelForm)).model)
    await found.engine.get(info.id)
    return f"{info.id} is loaded."


async def _unload(request: Request[Any, Any, Any], found: Services) -> str:
    info = _find(found, (await read_form(request, ModelForm)).model)
    if not await found.engine.unload(info.id):
        return f"{info.id} was not loaded."
    return f"{info.id} was unloaded."


def _files_of(info: ModelInfo) -> list[Path]:
    path = Path(info.path)
    match = _SPLIT.match(path.stem)
    if match is None:
        return [path]
    pattern = f"{match['base']}-*-of-{match['total']}.gguf"
    return sorted(p for p in path.parent.glob(pattern) if _SPLIT.match(p.stem))


async def delete_model(request: Request[Any, Any, Any], found: Services) -> str:
    form = await read_form(request, DeleteForm)
    info = _find(found, form.model)
    if info.embedded:
        raise FormError(f"{info.id} is the embedded model; it cannot be deleted.")
    status = found.engine.status()
    if info.loaded or info.id in status.loaded or info.id in status.loading:
        raise FormError(f"{info.id} is loaded; unload it first.")
    models_dir = found.settings.models_dir.resolve()
    files = _files_of(info)
    # The files' own directory (a symlinked model loses only its link, never the target).
    if any(p.parent.resolve() != models_dir for p in files):
        raise FormError(f"{info.id} is not a file in the models directory.")
    for path in files:
        await asyncio.to_thread(path.unlink, missing_ok=True)
    aliases: dict[str, str] = await found.owner.get("aliases", {})
    kept = {a: t for a, t in aliases.items() if t != info.id}
    if kept != aliases:
        await found.owner.set("aliases", kept)
        found.engine.configure(aliases=kept)
    if await found.owner.get("default_model", "") == info.id:
        await found.owner.set("default_model", "")
        found.engine.configure(default_model=found.settings.default_model)
    return f"Deleted {', '.join(p.name for p in files)}."


@post("/models/alias")
async def set_alias(request: Request[Any, Any, Any]) -> Template:
    return await _act(request, _set_alias)


@post("/models/alias/remove")
async def remove_alias(request: Request[Any, Any, Any]) -> Template:
    return await _act(request, _remove_alias)


@post("/models/default")
async def set_default(request: Request[Any, Any, Any]) -> Template:
    return await _act(request, _set_default)


@post("/models/price")
async def set_price(request: Request[Any, Any, Any]) -> Template:
    return await _act(request, _set_price)


@post("/models/load")
async def load_model(request: Request[Any, Any, Any]) -> Template:
    return await _act(request, _load)


@post("/models/unload")
async def unload_model(request: Request[Any, Any, Any]) -> Template:
    return await _act(request, _unload)


@post("/models/delete")
async def delete(request: Request[Any, Any, Any]) -> Template:
    found = services(request)
    form = await read_form(request, DeleteForm)
    if form.confirm != "yes":  # first step: ask
        info = _find(found, form.model)
        row = next(r for r in (await models_context(found))["models"] if r.id == info.id)
        return page(request, "models", await models_context(found, confirm=row))
    return await _act(request, delete_model)


# -- pulls -------------------------------------------------------------------------------------
async def _start_pull(request: Request[Any, Any, Any], found: Services) -> str:
    form = await read_form(request, PullForm)
    pull = found.pulls.start(form.url, filename=form.filename, sha256=form.sha256)
    return f"Pulling {pull.filename}."


@post("/pulls")
async def start_pull(request: Request[Any, Any, Any]) -> Template:
    return await _act(request, _start_pull)


def _pull_fragment(request: Request[Any, Any, Any], pull_id: str) -> Response[Any]:
    pull = services(request).pulls.get(pull_id)
    if not is_htmx(request):
        return Redirect("/admin/models", status_code=303)
    if pull is None:
        return Response(b"", status_code=200)
    headers = {"HX-Trigger-After-Settle": "models-changed"} if pull.status == "done" else None
    return Template(template_name="_pull.html", context={"pull": pull}, headers=headers)


@get("/pulls/{pull_id:str}")
async def pull_progress(request: Request[Any, Any, Any], pull_id: str) -> Response[Any]:
    return _pull_fragment(request, pull_id)


@post("/pulls/{pull_id:str}/cancel")
async def cancel_pull(request: Request[Any, Any, Any], pull_id: str) -> Response[Any]:
    await services(request).pulls.cancel(pull_id)
    return _pull_fragment(request, pull_id)


@post("/pulls/{pull_id:str}/retry")
async def retry_pull(request: Request[Any, Any, Any], pull_id: str) -> Response[Any]:
    try:
        services(request).pulls.retry(pull_id)
    except PullError as exc:
        found = services(request)
        return page(request, "models", await models_context(found, error=str(exc)), status_code=400)
    return _pull_fragment(request, pull_id)


@post("/pulls/{pull_id:str}/dismiss")
async def dismiss_pull(request: Request[Any, Any, Any], pull_id: str) -> Response[Any]:
    services(request).pulls.dismiss(pull_id)
    return _pull_fragment(request, pull_id)


ROUTES = [
    models_page,
    set_alias,
    remove_alias,
    set_default,
    set_price,
    load_model,
    unload_model,
    delete,
    start_pull,
    pull_progress,
    cancel_pull,
    retry_pull,
    dismiss_pull,
]
