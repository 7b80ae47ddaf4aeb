"""GET /v1/models and /v1/models/{id} against the fake engine."""

from __future__ import annotations

import asyncio

from litestar import Litestar
from litestar.testing import TestClient

from appliance.app import create_app
from appliance.settings import Settings
from appliance.store.db import Database
from appliance.store.owner import OwnerSettings
from tests.fakes import FakeEngine, FakeModel
from tests.helpers import wait_for
from tests.support.openai_schema import validate


def test_list_models(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine
) -> None:
    response = client.get("/v1/models", headers=auth)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    validate(body, "ListModelsResponse")
    assert body["object"] == "list"
    (card,) = body["data"]
    validate(card, "Model")
    assert card["id"] == "fake-model"
    assert card["object"] == "model"
    assert card["owned_by"]
    assert isinstance(card["created"], int)
    assert card["context_length"] == engine.default.context_length
    assert card["max_model_len"] == engine.default.context_length


def test_retrieve_model(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    response = client.get("/v1/models/fake-model", headers=auth)
    assert response.status_code == 200
    card = response.json()
    validate(card, "Model")
    assert card["id"] == "fake-model"
    assert card["context_length"] == 4096


def _set_owner_setting(settings: Settings, name: str, value: object) -> None:
    async def go() -> None:
        db = await Database.open(settings.data_dir)
        try:
            await OwnerSettings(db).set(name, value)
        finally:
            await db.close()

    asyncio.run(go())


def test_several_models_and_owner_aliases(settings: Settings, api_key: str) -> None:
    # The owner's aliases live in SQLite; the lifespan hands them to the engine.
    _set_owner_setting(settings, "aliases", {"gpt-4o": "beta"})
    engine = FakeEngine(
        [FakeModel("alpha", context_length=1024), FakeModel("beta", script=("B",))]
    )
    auth = {"Authorization": f"Bearer {api_key}"}
    with TestClient(create_app(settings, engine_factory=lambda _: engine)) as client:
        wait_for(lambda: engine.ready)
        cards = {m["id"]: m for m in client.get("/v1/models", headers=auth).json()["data"]}
        assert set(cards) == {"alpha", "beta"}
        assert cards["alpha"]["context_length"] == 1024
        assert cards["beta"]["aliases"] == ["gpt-4o"]
        # An alias resolves to its model, for retrieval and for chat.
        assert client.get("/v1/models/gpt-4o", headers=auth).json()["id"] == "beta"
        response = client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]},
            headers=auth,
        )
        assert response.status_code == 200
        assert response.json()["model"] == "beta"
        assert response.json()["choices"][0]["message"]["content"] == "B"
        # No model named: the default (first) one.
        response = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}]},
            headers=auth,
        )
        assert response.json()["model"] == "alpha"


def test_unknown_model_is_404(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    response = client.get("/v1/models/nope", headers=auth)
    assert response.status_code == 404
    body = response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["param"] == "model"
