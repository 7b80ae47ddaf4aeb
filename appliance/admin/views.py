"""Rendering for the admin page: one handler serves the full page or its htmx fragment.

Every page ``X`` has ``X.html`` (the whole document, extending ``base.html``) and
``_X.html`` (what goes into ``<main>``); ``page`` picks one from the ``HX-Request`` header.
Errors are HTML too: a fragment for htmx, a page otherwise, never a JSON body or a 500
traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Template
from litestar.template.config import TemplateConfig
from litestar.types import ExceptionHandlersMap

from appliance.admin.forms import FormError
from appliance.admin.modelinfo import format_params
from appliance.errors import ApplianceError
from appliance.store.money import format_credits
from appliance.webassets import web_root

__all__ = [
    "SECURITY_HEADERS",
    "add_security_headers",
    "admin_exception_handlers",
    "error_response",
    "is_htmx",
    "page",
    "template_config",
]

_log = logging.getLogger(__name__)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Vary": "HX-Request",
}


def is_htmx(request: Request[Any, Any, Any]) -> bool:
    """An htmx swap (wants a fragment), not a history restore (wants the whole page)."""
    headers = request.headers
    return headers.get("hx-request") == "true" and headers.get("hx-history-restore-request") != (
        "true"
    )


def page(
    request: Request[Any, Any, Any],
    name: str,
    context: dict[str, Any],
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Template:
    template = f"_{name}.html" if is_htmx(request) else f"{name}.html"
    return Template(
        template_name=template,
        context={"active": name, "fragment": is_htmx(request), **context},
        status_code=status_code,
        headers=headers,
    )


def error_response(request: Request[Any, Any, Any], status: int, message: str) -> Template:
    return page(request, "error", {"status": status, "message": message}, status_code=status)


async def add_security_headers(response: Response[Any]) -> Response[Any]:
    """``after_request`` hook of the admin router."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


# -- exception handlers (admin router only; the API keeps its JSON errors) ---------------------
def _form_error(request: Request[Any, Any, Any], exc: FormError) -> Response[Any]:
    return error_response(request, 400, exc.message)


def _appliance_error(request: Request[Any, Any, Any], exc: ApplianceError) -> Response[Any]:
    return error_response(request, exc.status_code, exc.message)


def _stale_csrf_cookie(request: Request[Any, Any, Any]) -> str | None:
    """The CSRF cookie's name when it was signed with another secret (a reload cannot help)."""
    config = request.app.csrf_config
    if config is None:
        return None
    token = request.cookies.get(config.cookie_name, "")
    if not token:
        return None
    expected = hmac.new(config.secret.encode(), token[:64].encode(), hashlib.sha256).hexdigest()
    return None if hmac.compare_digest(token[64:], expected) else config.cookie_name


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    if status == 403 and "CSRF" in str(exc.detail):
        message = "This form has expired (its security token is missing or stale). Reload the page."
        response = error_response(request, status, message)
        stale = _stale_csrf_cookie(request)
        if stale:  # e.g. a new data directory: drop it so the reload gets a fresh one
            response.delete_cookie(stale, path="/admin")
        return response
    elif status == 404:
        message = "Not found."
    elif status == 405:
        message = "That action is not available here."
    elif status < 500:
        message = str(exc.detail or "The request was not understood.")
    else:
        message = "Something went wrong on the server; the details are in its log."
    return error_response(request, status, message)


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    _log.exception("admin page error", exc_info=exc)
    return error_response(request, 500, "Something went wrong on the server; see its log.")


admin_exception_handlers: ExceptionHandlersMap = {
    FormError: _form_error,
    ApplianceError: _appliance_error,
    HTTPException: _http_error,
    Exception: _unexpected,
}


# -- templates -------------------------------------------------------------------------------
def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def number(n: int | float | None) -> str:
    if n is None:
        return "—"
    return f"{n:,.0f}" if float(n) == int(n) else f"{n:,.1f}"


def credits(value: Decimal | int | None, nano: bool = False) -> str:
    """Decimal credits (or nano-credits with ``nano``) as text; None is unlimited."""
    if value is None:
        return "unlimited"
    amount = format_credits(value) if nano and isinstance(value, int) else Decimal(value)
    assert amount is not None
    text = f"{amount:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def when(iso: str | None) -> str:
    """An ISO time as 'YYYY-MM-DD HH:MM' UTC."""
    if not iso:
        return "—"
    try:
        moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def clock(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%H:%M:%S")


def _static_versions(static: Path) -> dict[str, str]:
    versions = {}
    for path in static.glob("*"):
        if path.is_file() and not path.name.startswith("."):
            versions[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    return versions


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    root = web_root()
    env = Environment(
        loader=FileSystemLoader(root / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    versions = _static_versions(root / "static")

    def static(name: str) -> str:
        return f"/admin/static/{name}?v={versions.get(name, '0')}"

    env.globals["static"] = static
    env.filters.update(
        bytes=human_bytes,
        number=number,
        credits=credits,
        duration=duration,
        when=when,
        clock=clock,
        params=format_params,
    )
    return TemplateConfig(instance=JinjaTemplateEngine.from_environment(env))
