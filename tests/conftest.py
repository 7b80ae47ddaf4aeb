"""Shared fixtures: settings in a tmp data dir, a fake engine, and an in-process app client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from appliance.app import create_app
from appliance.settings import ENV_PREFIX, Settings
from tests.fakes import FakeEngine
from tests.helpers import create_key, wait_for


@pytest.fixture(autouse=True)
def _clean_appliance_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``APPLIANCE_<SETTING>`` variable from the developer's shell leaks into a test.

    Only settings are removed: test switches such as ``APPLIANCE_TEST_CACHE`` stay.
    """
    for field in Settings.__struct_fields__:
        monkeypatch.delenv(ENV_PREFIX + field.upper(), raising=False)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "models_dir": tmp_path / "models",
        "threads": 1,
        "ctx_size": 2048,
        "parallel": 2,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def app(settings: Settings, engine: FakeEngine) -> Litestar:
    return create_app(settings, engine_factory=lambda _: engine)


@pytest.fixture
def client(app: Litestar, engine: FakeEngine) -> Iterator[TestClient[Litestar]]:
    """The app running in-process (lifespan included), its fake engine ready."""
    with TestClient(app, raise_server_exceptions=False) as test_client:
        wait_for(lambda: engine.ready, what="the fake engine to start")
        yield test_client
    assert engine.closed, "the lifespan did not close the engine"


@pytest.fixture
def api_key(settings: Settings) -> str:
    return create_key(settings.data_dir, "test")


@pytest.fixture
def auth(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}
