"""Admin sign-in: a signed session cookie, a guard on every admin route, sign-in / sign-out.

The session is a Litestar session backend of our own: the session dict travels in an
``HttpOnly; SameSite=Lax`` cookie scoped to ``/admin``, signed with HMAC-SHA256 under a key
derived from ``session_secret`` (random, made once, kept in the owner settings, so sessions
survive restarts). A session is valid only while its fingerprint matches the current admin
password hash and the "session epoch": changing the password or signing out ends every
session. API keys play no part here: ``Authorization`` headers are never looked at.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from litestar import Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.datastructures.headers import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware.session.base import BaseBackendConfig, BaseSessionBackend
from litestar.response import Redirect
from litestar.types import Message, Scopes, ScopeSession

from appliance.admin.forms import LoginForm, read_form
from appliance.admin.views import is_htmx, page
from appliance.api.deps import services
from appliance.store.owner import OwnerSettings, verify_password

__all__ = [
    "SESSION_KEY_STATE",
    "SignInRequired",
    "SignedCookieBackend",
    "SignedCookieConfig",
    "derive_secrets",
    "login_form",
    "login_submit",
    "logout",
    "require_admin",
    "sign_in_redirect",
]

SESSION_COOKIE = "appliance_admin"
SESSION_KEY_STATE = "admin_session_key"
_SEVEN_DAYS = 7 * 24 * 3600


class SignInRequired(NotAuthorizedException):
    """Raised by the guard; answered with a redirect to the sign-in page."""

    not_an_error = True


# -- the session backend -----------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SignedCookieBackend(BaseSessionBackend["SignedCookieConfig"]):
    """The session dict, signed (not encrypted: it holds no secrets) in one cookie.

    The signing key is read from ``app.state.admin_session_key`` on each request (Litestar
    deep-copies routers, and with them this backend, so a key set later on the config
    object would not reach it).
    """

    @staticmethod
    def signing_key(connection: ASGIConnection[Any, Any, Any, Any]) -> bytes:
        key = getattr(connection.app.state, SESSION_KEY_STATE, b"")
        return key if isinstance(key, bytes) else b""

    @staticmethod
    def _sign(key: bytes, payload: bytes) -> str:
        return _b64(hmac.new(key, payload, hashlib.sha256).digest())

    def encode(self, key: bytes, data: dict[str, Any], now: float) -> str:
        body = json.dumps({"d": data, "exp": int(now) + self.config.max_age}).encode()
        payload = _b64(body)
        return f"{payload}.{self._sign(key, payload.encode())}"

    def decode(self, key: bytes, cookie: str, now: float) -> tuple[dict[str, Any], int] | None:
        payload, _, signature = cookie.partition(".")
        if not key or not payload:
            return None
        if not hmac.compare_digest(signature, self._sign(key, payload.encode())):
            return None
        try:
            body = json.loads(_unb64(payload))
        except ValueError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("d"), dict):
            return None
        expires = int(body.get("exp", 0))
        return (body["d"], expires) if expires > now else None

    def get_session_id(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
        return None

    async def load_from_connection(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> dict[str, Any]:
        cookie = connection.cookies.get(self.config.key)
        if not cookie:
            return {}
        found = self.decode(self.signing_key(connection), cookie, time.time())
        if found is None:
            return {}
        data, expires = found
        connection.scope.setdefault("state", {})["_admin_session"] = (dict(data), expires)
        return data

    async def store_in_message(
        self,
        scope_session: ScopeSession,
        message: Message,
        connection: ASGIConnection[Any, Any, Any, Any],
    ) -> None:
        now = time.time()
        presented = connection.cookies.get(self.config.key)
        loaded = connection.scope.get("state", {}).get("_admin_session")
        headers = MutableScopeHeaders.from_message(message)
        if not isinstance(scope_session, dict) or not scope_session:
            if presented:  # signed out (or a dead cookie): clear it
                headers.add("Set-Cookie", self._cookie("", max_age=0))
            return
        data = dict(scope_session)
        if loaded is not None:
            unchanged = loaded[0] == data
            fresh = loaded[1] - now > self.config.max_age / 2
            if unchanged and fresh:
                return  # nothing to say: the browser keeps its cookie
        value = self.encode(self.signing_key(connection), data, now)
        headers.add("Set-Cookie", self._cookie(value, self.config.max_age))

    def _cookie(self, value: str, max_age: int) -> str:
        return Cookie(
            key=self.config.key,
            value=value,
            max_age=max_age,
            path=self.config.path,
            domain=self.config.domain,
            secure=self.config.secure,
            httponly=self.config.httponly,
            samesite=self.config.samesite,
        ).to_header(header="")


@dataclass
class SignedCookieConfig(BaseBackendConfig[SignedCookieBackend]):
    """Settings of the admin session cookie (the signing key lives on ``app.state``)."""

    _backend_class = SignedCookieBackend

    key: str = SESSION_COOKIE
    max_age: int = _SEVEN_DAYS
    path: str = "/admin"
    domain: str | None = None
    secure: bool = False
    httponly: bool = True
    samesite: Literal["lax", "strict", "none"] = "lax"
    exclude: str | list[str] | None = None
    exclude_opt_key: str = "skip_session"
    scopes: Scopes = field(default_factory=lambda: {ScopeType.HTTP})


async def derive_secrets(owner: OwnerSettings) -> tuple[bytes, str]:
    """(session signing key, CSRF secret), both derived from the stored ``session_secret``."""
    secret = await owner.get("session_secret")
    if not isinstance(secret, str) or len(secret) < 32:
        secret = secrets.token_hex(32)
        await owner.set("session_secret", secret)
    root = secret.encode()
    session_key = hmac.new(root, b"admin session", hashlib.sha256).digest()
    csrf_secret = hmac.new(root, b"admin csrf", hashlib.sha256).hexdigest()
    return session_key, csrf_secret


# -- the guard ---------------------------------------------------------------------------------
async def _fingerprint(owner: OwnerSettings) -> str:
    stored = await owner.get("admin_password", "")
    epoch = await owner.get("session_epoch", 0)
    return hashlib.sha256(f"{stored}|{epoch}".encode()).hexdigest()[:32]


async def require_admin(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """Guard: every admin route but the sign-in page needs a live admin session."""
    if handler.opt.get("public"):
        return
    session = connection.scope.get("session")
    if not isinstance(session, dict) or not session.get("admin"):
        raise SignInRequired()
    found = connection.app.state.services
    if not hmac.compare_digest(str(session.get("fp", "")), await _fingerprint(found.owner)):
        raise SignInRequired()


def _safe_next(target: str | None) -> str:
    """Only paths inside the admin page: never another host (no open redirect)."""
    if not target:
        return "/admin"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target or not parts.path.startswith("/admin"):
        return "/admin"
    if parts.path.startswith(("/admin/login", "/admin/logout", "/admin/static")):
        return "/admin"
    return target


def sign_in_redirect(request: Request[Any, Any, Any], _: Exception) -> Response[Any]:
    """303 to the sign-in page; for htmx, ``HX-Redirect`` (an XHR would follow a 303 itself)."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if is_htmx(request):
        current = request.headers.get("hx-current-url", "")
        parts = urlsplit(current)
        here = parts.path + (f"?{parts.query}" if parts.query else "")
    elif request.method != "GET":
        here = ""
    target = "/admin/login"
    if _safe_next(here) != "/admin":
        target += "?next=" + quote(here, safe="/")
    headers = {"Cache-Control": "no-store"}
    if is_htmx(request):
        return Response(b"", status_code=401, headers={**headers, "HX-Redirect": target})
    return Redirect(target, status_code=303, headers=headers)


# -- routes ------------------------------------------------------------------------------------
@get("/login", opt={"public": True}, name="admin:login")
async def login_form(request: Request[Any, Any, Any], next: str = "/admin") -> Response[Any]:
    session = request.scope.get("session")
    if isinstance(session, dict) and session.get("admin"):
        fp = await _fingerprint(services(request).owner)
        if hmac.compare_digest(str(session.get("fp", "")), fp):
            return Redirect(_safe_next(next), status_code=303)
    return page(request, "login", {"next": _safe_next(next), "error": ""})


@post("/login", opt={"public": True}, status_code=303)
async def login_submit(request: Request[Any, Any, Any]) -> Response[Any]:
    form = await read_form(request, LoginForm)
    owner = services(request).owner
    stored = await owner.get("admin_password")
    ok = isinstance(stored, str) and await asyncio.to_thread(verify_password, form.password, stored)
    if not ok:
        await asyncio.sleep(0.5)  # on top of scrypt: keeps guessing slow
        context = {"next": _safe_next(form.next), "error": "Wrong password."}
        return page(request, "login", context, status_code=401)
    request.set_session({"admin": True, "fp": await _fingerprint(owner), "at": int(time.time())})
    return Redirect(_safe_next(form.next), status_code=303)


@post("/logout", status_code=303)
async def logout(request: Request[Any, Any, Any]) -> Response[Any]:
    owner = services(request).owner
    # A new epoch ends this session and any copy of its cookie.
    await owner.set("session_epoch", int(await owner.get("session_epoch", 0)) + 1)
    request.clear_session()
    if is_htmx(request):
        return Response(b"", status_code=200, headers={"HX-Redirect": "/admin/login"})
    return Redirect("/admin/login", status_code=303)
