"""Every client error is an exact OpenAI error object, and the server keeps serving after it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from appliance.app import create_app
from appliance.settings import Settings
from tests.conftest import make_settings
from tests.fakes import FakeEngine
from tests.helpers import create_key, wait_for
from tests.support.openai_schema import validate

GOOD = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


def error_of(response: Any, status: int) -> dict[str, Any]:
    """Assert an OpenAI-shaped error response with ``status``; return its error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    validate(body, "ErrorResponse")
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


def still_serving(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    response = client.post("/v1/chat/completions", json=GOOD, headers=auth)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello, world! How are you?"


def with_(**changes: Any) -> dict[str, Any]:
    body = dict(GOOD)
    body.update(changes)
    return body


@pytest.mark.parametrize(
    "raw",
    [b"{", b"not json", b"", b'{"messages": [}', b"\xff\xfe"],
    ids=["truncated", "text", "empty", "broken-array", "binary"],
)
def test_malformed_json(client: TestClient[Litestar], auth: dict[str, str], raw: bytes) -> None:
    response = client.post(
        "/v1/chat/completions",
        content=raw,
        headers={**auth, "Content-Type": "application/json"},
    )
    error = error_of(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    still_serving(client, auth)


def test_body_that_is_not_an_object(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    error = error_of(client.post("/v1/chat/completions", json=[GOOD], headers=auth), 400)
    assert error["type"] == "invalid_request_error"
    still_serving(client, auth)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (with_(messages="Hi"), "messages"),
        (with_(messages={"role": "user", "content": "Hi"}), "messages"),
        (with_(messages=[]), "messages"),
        ({"model": "fake-model"}, None),  # missing: msgspec names it in the message
        (with_(messages=[{"role": "wizard", "content": "Hi"}]), "messages[0].role"),
        (with_(messages=[{"content": "Hi"}]), "messages[0]"),
        (with_(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (with_(temperature="hot"), "temperature"),
        (with_(temperature=3), "temperature"),
        (with_(temperature=-0.1), "temperature"),
        (with_(top_p=2), "top_p"),
        (with_(max_tokens=0), "max_tokens"),
        (with_(max_tokens=-5), "max_tokens"),
        (with_(max_tokens="many"), "max_tokens"),
        (with_(max_completion_tokens=0), "max_completion_tokens"),
        (with_(n=2), "n"),
        (with_(n=0), "n"),
        (with_(presence_penalty=5), "presence_penalty"),
        (with_(frequency_penalty=-3), "frequency_penalty"),
        (with_(stream="yes"), "stream"),
        (with_(ignore_eos="yes"), "ignore_eos"),
        (with_(ignore_eos=1), "ignore_eos"),
        (with_(stop=[1, 2]), "stop"),
        (with_(model=7), "model"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_fields_name_the_param(
    client: TestClient[Litestar], auth: dict[str, str], body: dict[str, Any], param: str | None
) -> None:
    error = error_of(client.post("/v1/chat/completions", json=body, headers=auth), 400)
    assert error["type"] == "invalid_request_error"
    if param is None:
        assert "messages" in error["message"]
    else:
        assert error["param"] is not None
        assert error["param"].startswith(param), error
        top = param.split("[")[0].split(".")[0]
        assert top in error["message"]
    still_serving(client, auth)


def test_unknown_model_is_404(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    error = error_of(
        client.post("/v1/chat/completions", json=with_(model="gpt-17"), headers=auth), 404
    )
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"
    assert "gpt-17" in error["message"]
    still_serving(client, auth)


def test_unknown_model_retrieve_is_404(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    error = error_of(client.get("/v1/models/gpt-17", headers=auth), 404)
    assert error["code"] == "model_not_found"
    still_serving(client, auth)


def test_unknown_route_is_json_404(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    for path in ("/v1/nope", "/", "/v1/completions/x"):
        error = error_of(client.get(path, headers=auth), 404)
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "not_found"
    error = error_of(client.post("/v1/audio/speech", json={"input": "x"}, headers=auth), 404)
    still_serving(client, auth)


def test_wrong_method_is_json_error(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    error = error_of(client.get("/v1/chat/completions", headers=auth), 405)
    assert error["code"] == "method_not_allowed"
    still_serving(client, auth)


@pytest.fixture
def small_body_client(tmp_path: Any) -> Any:
    settings = make_settings(tmp_path, max_body_bytes=2048)
    engine = FakeEngine()
    key = create_key(settings.data_dir, "small")
    with TestClient(create_app(settings, engine_factory=lambda _: engine)) as client:
        wait_for(lambda: engine.ready)
        yield client, {"Authorization": f"Bearer {key}"}


def test_body_over_limit_is_413(small_body_client: Any) -> None:
    client, auth = small_body_client
    big = with_(messages=[{"role": "user", "content": "x" * 4096}])
    error = error_of(client.post("/v1/chat/completions", json=big, headers=auth), 413)
    assert error["code"] == "request_too_large"
    assert error["type"] == "invalid_request_error"
    still_serving(client, auth)


def test_body_over_limit_without_content_length_is_413(small_body_client: Any) -> None:
    client, auth = small_body_client
    payload = json.dumps(with_(messages=[{"role": "user", "content": "x" * 4096}])).encode()

    def chunks() -> Any:
        for i in range(0, len(payload), 512):
            yield payload[i : i + 512]

    response = client.post(
        "/v1/chat/completions",
        content=chunks(),
        headers={**auth, "Content-Type": "application/json"},
    )
    error = error_of(response, 413)
    assert error["code"] == "request_too_large"
    still_serving(client, auth)


def test_body_just_under_limit_is_served(small_body_client: Any) -> None:
    client, auth = small_body_client
    body = with_(messages=[{"role": "user", "content": "x" * 1500}])
    assert len(json.dumps(body)) < 2048
    assert client.post("/v1/chat/completions", json=body, headers=auth).status_code == 200


def test_context_overflow_is_400(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine
) -> None:
    window = engine.default.context_length
    long = with_(messages=[{"role": "user", "content": "x" * (window + 10)}])
    error = error_of(client.post("/v1/chat/completions", json=long, headers=auth), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    assert str(window) in error["message"]
    assert "context" in error["message"]
    assert engine.default.requests == []  # refused before generation
    still_serving(client, auth)


def test_generation_error_is_500_server_error(
    settings: Settings, tmp_path: Any, api_key: str
) -> None:
    from tests.fakes import FakeModel

    engine = FakeEngine([FakeModel(fail_with="boom")])
    with TestClient(create_app(settings, engine_factory=lambda _: engine)) as client:
        wait_for(lambda: engine.ready)
        auth = {"Authorization": f"Bearer {api_key}"}
        error = error_of(client.post("/v1/chat/completions", json=GOOD, headers=auth), 500)
        assert error["type"] == "server_error"
        assert "boom" in error["message"]
