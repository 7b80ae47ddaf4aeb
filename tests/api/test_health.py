"""GET /health: 503 while the default model loads, 200 once it can serve; never needs a key."""

from __future__ import annotations

from litestar import Litestar
from litestar.testing import TestClient

from appliance.app import create_app
from appliance.settings import Settings
from tests.fakes import FakeEngine
from tests.helpers import wait_for


def test_health_loading_then_ok(settings: Settings) -> None:
    engine = FakeEngine(hold=True)
    app = create_app(settings, engine_factory=lambda _: engine)
    with TestClient(app) as client:
        wait_for(lambda: engine.started, what="engine.start() to be called by the lifespan")
        for fraction in (0.0, 0.25, 0.5):
            engine.load_progress = fraction
            response = client.get("/health")
            assert response.status_code == 503
            assert response.headers["content-type"].startswith("application/json")
            assert response.json() == {
                "status": "loading",
                "loading": [engine.default.id],
                "progress": {engine.default.id: fraction},
            }
            assert "Retry-After" in response.headers

        engine.release.set()
        wait_for(lambda: engine.ready, what="the fake engine to become ready")
        response = client.get("/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


def test_health_needs_no_key_and_ignores_a_bad_one(client: TestClient[Litestar]) -> None:
    assert client.get("/health").status_code == 200
    bad = {"Authorization": "Bearer apl_not-a-key"}
    response = client.get("/health", headers=bad)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_lifespan_closes_engine(settings: Settings) -> None:
    engine = FakeEngine()
    with TestClient(create_app(settings, engine_factory=lambda _: engine)):
        wait_for(lambda: engine.ready)
        assert not engine.closed
    assert engine.closed
