"""Fixtures for the admin page: an in-process app over real model files and a fake engine."""

from __future__ import annotations

import html
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from appliance.app import create_app
from appliance.services import Services
from appliance.settings import Settings
from tests.admin.fake_engine import AdminFakeEngine
from tests.conftest import make_settings
from tests.helpers import wait_for
from tests.support.tiny_qwen35 import write_tiny_qwen35

T = TypeVar("T")

PASSWORD = "correct horse battery"
TINY = "tiny-qwen35"


@pytest.fixture
def admin_settings(tmp_path: Path) -> Settings:
    settings = make_settings(tmp_path)
    settings.models_dir.mkdir(parents=True)
    write_tiny_qwen35(settings.models_dir / f"{TINY}.gguf", moe=False)
    return settings


@pytest.fixture
def admin_engine(admin_settings: Settings) -> AdminFakeEngine:
    return AdminFakeEngine(admin_settings.models_dir)


@pytest.fixture
def admin_app(admin_settings: Settings, admin_engine: AdminFakeEngine) -> Litestar:
    return create_app(admin_settings, engine_factory=lambda _: admin_engine)


class AdminClient:
    """A TestClient plus the helpers admin tests need (CSRF token, services, async calls)."""

    def __init__(self, client: TestClient[Litestar]) -> None:
        self.http = client

    @property
    def services(self) -> Services:
        found: Services = self.http.app.state.services
        return found

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a coroutine function on the app's event loop."""
        return self.http.blocking_portal.call(fn, *args)

    @property
    def csrf(self) -> str:
        token = self.http.cookies.get("appliance_csrf")
        if token is None:
            self.http.get("/admin/login")
            token = self.http.cookies.get("appliance_csrf")
        assert token, "no CSRF cookie"
        return token

    def post(self, path: str, data: dict[str, Any], *, htmx: bool = True, **kw: Any) -> Any:
        headers = {"x-csrftoken": self.csrf}
        if htmx:
            headers["HX-Request"] = "true"
        return self.http.post(path, data=data, headers=headers, **kw)

    def login(self, password: str = PASSWORD, next: str = "/admin") -> Any:
        page = self.http.get("/admin/login")
        token = re.search(r'name="_csrf_token" value="([^"]+)"', page.text)
        assert token, page.text
        return self.http.post(
            "/admin/login",
            data={"password": password, "_csrf_token": token.group(1), "next": next},
            follow_redirects=False,
        )


@pytest.fixture
def anon(admin_app: Litestar, admin_engine: AdminFakeEngine) -> Iterator[AdminClient]:
    """Not signed in (the admin password is set)."""
    with TestClient(admin_app, raise_server_exceptions=False) as client:
        wait_for(lambda: admin_engine.ready, what="the fake engine to start")
        found = AdminClient(client)
        found.call(found.services.owner.set_admin_password, PASSWORD)
        yield found


@pytest.fixture
def admin(anon: AdminClient) -> AdminClient:
    """Signed in."""
    response = anon.login()
    assert response.status_code == 303, response.text
    return anon


def flash_error(text: str) -> str:
    match = re.search(r'class="flash error"[^>]*>(.*?)</p>', text, re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", match.group(1))).strip() if match else ""
