"""Wire the admin page into the app: its router, static files, templates, CSRF and session.

``create_app`` calls ``build_admin`` once and passes the pieces to ``Litestar(...)``; the
lifespan calls ``AdminSetup.start`` when the database is open, which fills in the secrets
derived from the stored ``session_secret``: the session key goes on ``app.state`` and the
CSRF secret into the CSRF config (both are read on every request).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from litestar import Litestar, Request, Router, get
from litestar.config.csrf import CSRFConfig
from litestar.datastructures import CacheControlHeader
from litestar.response import Redirect
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig
from litestar.types import ControllerRouterHandler

from appliance.admin import routes_keys, routes_live, routes_models, routes_usage
from appliance.admin.auth import (
    SESSION_KEY_STATE,
    SignedCookieConfig,
    SignInRequired,
    derive_secrets,
    login_form,
    login_submit,
    logout,
    require_admin,
    sign_in_redirect,
)
from appliance.admin.live import record_exception
from appliance.admin.views import add_security_headers, admin_exception_handlers, template_config
from appliance.services import Services
from appliance.webassets import web_root

__all__ = ["CSRF_EXCLUDE", "AdminSetup", "build_admin", "record_exception"]

# Bearer-key and probe routes never carry a CSRF token (and need none: no cookies).
CSRF_EXCLUDE = ["^/v1(/|$)", "^/health$", "^/metrics$", "^/admin/static/"]


@get("/", name="admin:index")
async def index(request: Request[Any, Any, Any]) -> Redirect:
    return Redirect("/admin/live", status_code=303)


@dataclass(slots=True)
class AdminSetup:
    route_handlers: list[ControllerRouterHandler]
    template_config: TemplateConfig[Any]
    csrf_config: CSRFConfig
    session_config: SignedCookieConfig

    async def start(self, app: Litestar, services: Services) -> None:
        """Install the secrets derived from the stored ``session_secret``."""
        session_key, csrf_secret = await derive_secrets(services.owner)
        setattr(app.state, SESSION_KEY_STATE, session_key)
        # The CSRF middleware holds this very config object and reads .secret per request.
        self.csrf_config.secret = csrf_secret


def build_admin() -> AdminSetup:
    session = SignedCookieConfig()
    csrf = CSRFConfig(
        secret=secrets.token_hex(32),  # replaced by the stored secret in start()
        cookie_name="appliance_csrf",
        cookie_path="/admin",
        header_name="x-csrftoken",
        cookie_httponly=True,
        cookie_samesite="lax",
        exclude=CSRF_EXCLUDE,
    )
    router = Router(
        path="/admin",
        route_handlers=[
            index,
            login_form,
            login_submit,
            logout,
            *routes_live.ROUTES,
            *routes_models.ROUTES,
            *routes_keys.ROUTES,
            *routes_usage.ROUTES,
        ],
        guards=[require_admin],
        middleware=[session.middleware],
        exception_handlers={SignInRequired: sign_in_redirect, **admin_exception_handlers},
        after_request=add_security_headers,
        include_in_schema=False,
    )
    static = create_static_files_router(
        path="/admin/static",
        directories=[web_root() / "static"],
        name="admin-static",
        # URLs carry a content hash (?v=...), so browsers may keep files for a year.
        cache_control=CacheControlHeader(max_age=31_536_000, public=True),
        include_in_schema=False,
    )
    return AdminSetup(
        route_handlers=[router, static],
        template_config=template_config(),
        csrf_config=csrf,
        session_config=session,
    )
