"""The Keys page: create (the plaintext is shown once), revoke, limits, top-ups.

Keys are named by their unique name in forms. The page shows each key's prefix, never its
hash; the plaintext exists only in the response to the create request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request, get, post
from litestar.response import Template

from appliance.admin.forms import (
    FormError,
    KeyCreateForm,
    KeyLimitsForm,
    KeyNameForm,
    TopupForm,
    read_form,
)
from appliance.admin.views import page
from appliance.api.deps import services
from appliance.errors import ApplianceError
from appliance.services import Services
from appliance.store.keys import KeyLimits
from appliance.store.money import parse_credits

__all__ = ["ROUTES"]


async def keys_context(found: Services, **extra: Any) -> dict[str, Any]:
    keys = await found.keys.list()
    keys.sort(key=lambda k: (k.revoked, k.name.lower()))
    return {
        "keys": keys,
        "model_ids": [m.id for m in await asyncio.to_thread(found.engine.models)],
        "starter_credits": await found.owner.get("starter_credits"),
        "created": None,
        "notice": "",
        "error": "",
        "form": None,
        **extra,
    }


def _credits(text: str, label: str, *, allow_negative: bool = False) -> int | None:
    if not text:
        return None
    try:
        value = parse_credits(text)
    except ValueError as exc:
        raise FormError(f"{label}: {exc}.") from None
    if value < 0 and not allow_negative:
        raise FormError(f"{label}: cannot be negative.")
    if abs(value) > 10**18:
        raise FormError(f"{label}: too large.")
    return value


def _limits(form: KeyLimitsForm) -> KeyLimits:
    allowance = _credits(form.allowance, "Allowance")
    return KeyLimits(
        models=form.models or None,
        rpm=form.rpm,
        tpm=form.tpm,
        concurrency=form.concurrency,
        expires=form.expires or None,
        allowance=allowance or None,
        allowance_period=form.allowance_period if allowance else None,
    )


Action = Callable[[Request[Any, Any, Any], Services], Awaitable[dict[str, Any]]]


async def _act(request: Request[Any, Any, Any], action: Action) -> Template:
    found = services(request)
    try:
        extra = await action(request, found)
    except FormError as exc:
        return page(request, "keys", await keys_context(found, error=exc.message), status_code=400)
    except ApplianceError as exc:
        status = exc.status_code if exc.status_code < 500 else 409
        context = await keys_context(found, error=exc.message)
        return page(request, "keys", context, status_code=status)
    return page(request, "keys", await keys_context(found, **extra))


@get("/keys")
async def keys_page(request: Request[Any, Any, Any]) -> Template:
    return page(request, "keys", await keys_context(services(request)))


async def _create(request: Request[Any, Any, Any], found: Services) -> dict[str, Any]:
    form = await read_form(request, KeyCreateForm)
    limits = _limits(form)
    limits.credits = None if form.unlimited else _credits(form.credits, "Credits")
    limits.unlimited = form.unlimited
    starter = await found.owner.get("starter_credits")
    plaintext, summary = await found.keys.create(form.name, limits, starter_credits=starter)
    return {"created": {"name": summary.name, "key": plaintext}}


async def _revoke(request: Request[Any, Any, Any], found: Services) -> dict[str, Any]:
    form = await read_form(request, KeyNameForm)
    summary = await found.keys.revoke(form.name)
    return {"notice": f"Revoked '{summary.name}'; requests with it now fail."}


async def _update(request: Request[Any, Any, Any], found: Services) -> dict[str, Any]:
    form = await read_form(request, KeyLimitsForm)
    summary = await found.keys.update_limits(form.name, _limits(form))
    return {"notice": f"Saved the limits of '{summary.name}'."}


async def _topup(request: Request[Any, Any, Any], found: Services) -> dict[str, Any]:
    form = await read_form(request, TopupForm)
    amount = _credits(form.amount, "Amount", allow_negative=True)
    if not amount:
        raise FormError("Amount: enter a number of credits other than 0.")
    summary = await found.keys.topup(form.name, amount)
    return {"notice": f"'{summary.name}' now has {summary.balance} credits."}


@post("/keys")
async def create_key(request: Request[Any, Any, Any]) -> Template:
    return await _act(request, _create)


@post("/keys/revoke")
async def revoke_key(request: Request[Any, Any, Any]) -> Template:
    return await _act(request, _revoke)


@post("/keys/limits")
async def update_limits(request: Request[Any, Any, Any]) -> Template:
    return await _act(request, _update)


@post("/keys/topup")
async def topup_key(request: Request[Any, Any, Any]) -> Template:
    return await _act(request, _topup)


ROUTES = [keys_page, create_key, revoke_key, update_limits, topup_key]
