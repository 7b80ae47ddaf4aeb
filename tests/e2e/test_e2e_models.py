"""E2E: the model endpoints and authentication through the official openai SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import CTX_SIZE, E2EServer
from tests.support.openai_schema import validate

pytestmark = pytest.mark.e2e


def test_health_is_ok_without_a_key(e2e_server: E2EServer) -> None:
    response = httpx.get(e2e_server.base_url + "/health", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_models_list(sdk: openai.OpenAI, http: httpx.Client, e2e_server: E2EServer) -> None:
    ids = [m.id for m in sdk.models.list()]
    assert e2e_server.model in ids
    raw = http.get("/v1/models")
    assert raw.status_code == 200
    body = raw.json()
    validate(body, "ListModelsResponse")
    card = next(m for m in body["data"] if m["id"] == e2e_server.model)
    validate(card, "Model")
    assert card["object"] == "model"
    assert card["context_length"] == CTX_SIZE  # loaded: the per-sequence window
    assert card["loaded"] is True


def test_models_retrieve(sdk: openai.OpenAI, http: httpx.Client, e2e_server: E2EServer) -> None:
    model = sdk.models.retrieve(e2e_server.model)
    assert model.id == e2e_server.model
    assert model.object == "model"
    assert model.model_extra is not None
    assert model.model_extra["context_length"] == CTX_SIZE
    raw = http.get(f"/v1/models/{e2e_server.model}").json()
    validate(raw, "Model")
    assert raw["context_length"] == CTX_SIZE


def test_unknown_model_is_not_found(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("no-such-model")
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    validate({"error": info.value.body}, "ErrorResponse")


def test_bad_keys_are_authentication_errors(e2e_server: E2EServer) -> None:
    valid_looking = "apl_" + "A" * 38
    for key in ("sk-not-ours", valid_looking, e2e_server.key[:-1] + "0"):
        if key == e2e_server.key:
            continue
        with e2e_server.sdk(key) as client:
            with pytest.raises(openai.AuthenticationError) as info:
                client.models.list()
            assert info.value.status_code == 401
            assert info.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(
                    model=e2e_server.model, messages=[{"role": "user", "content": "Hi"}]
                )


def test_revoked_key_is_an_authentication_error(e2e_server: E2EServer) -> None:
    key = e2e_server.create_key("to-revoke")
    with e2e_server.sdk(key) as client:
        assert client.models.list().data
        result = e2e_server.cli("keys", "revoke", "to-revoke")
        assert result.returncode == 0, result.stderr
        with pytest.raises(openai.AuthenticationError, match="revoked"):
            client.models.list()


def test_unknown_route_is_json_404(http: httpx.Client) -> None:
    response = http.get("/v1/does-not-exist")
    assert response.status_code == 404
    validate(response.json(), "ErrorResponse")
