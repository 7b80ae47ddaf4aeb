"""Bearer-key authentication: every failure is the same OpenAI-shaped 401."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from appliance.settings import Settings
from appliance.store.db import Database
from appliance.store.keyformat import generate_key, is_well_formed
from tests.helpers import create_key, revoke_key
from tests.support.openai_schema import validate

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def assert_401(response: Any) -> dict[str, Any]:
    assert response.status_code == 401, response.text
    body = response.json()
    validate(body, "ErrorResponse")
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    assert error["param"] is None
    assert isinstance(error["message"], str) and error["message"]
    return error


def _corrupt_checksum(key: str) -> str:
    last = key[-1]
    bad = key[:-1] + ("A" if last != "A" else "B")
    assert not is_well_formed(bad)
    return bad


@pytest.mark.parametrize(
    ("method", "path", "json"),
    [("GET", "/v1/models", None), ("GET", "/v1/models/fake-model", None),
     ("POST", "/v1/chat/completions", CHAT)],
)
def test_every_api_route_needs_a_key(
    client: TestClient[Litestar], method: str, path: str, json: Any
) -> None:
    error = assert_401(client.request(method, path, json=json))
    assert "Authorization" in error["message"]


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token {key}",
        "{key}",
    ],
    ids=["empty", "bearer-no-token", "bearer-blank", "basic", "token-scheme", "no-scheme"],
)
def test_missing_or_wrong_scheme(
    client: TestClient[Litestar], api_key: str, header: str
) -> None:
    response = client.post(
        "/v1/chat/completions", json=CHAT, headers={"Authorization": header.format(key=api_key)}
    )
    assert_401(response)


def test_bearer_scheme_is_case_insensitive(client: TestClient[Litestar], api_key: str) -> None:
    response = client.get("/v1/models", headers={"Authorization": f"bearer {api_key}"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "make_bad",
    [
        _corrupt_checksum,
        lambda key: key[:-1],  # too short
        lambda key: key + "x",  # too long
        lambda key: "sk-" + key[4:],  # wrong prefix
        lambda key: key[:10] + "-" + key[11:],  # outside the alphabet
        lambda key: "apl_" + "0" * 38,
    ],
    ids=["bad-checksum", "short", "long", "wrong-prefix", "bad-char", "zeros"],
)
def test_malformed_key_is_refused_without_touching_the_database(
    client: TestClient[Litestar], api_key: str, monkeypatch: pytest.MonkeyPatch, make_bad: Any
) -> None:
    queries: list[str] = []

    async def no_query(self: Database, sql: str, params: Any = ()) -> Any:
        queries.append(sql)
        raise AssertionError("malformed keys must be refused before any database query")

    monkeypatch.setattr(Database, "fetchone", no_query)
    monkeypatch.setattr(Database, "fetchall", no_query)
    bad = make_bad(api_key)
    response = client.post(
        "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {bad}"}
    )
    assert_401(response)
    assert queries == []


def test_unknown_well_formed_key(client: TestClient[Litestar], api_key: str) -> None:
    other = generate_key()
    assert is_well_formed(other) and other != api_key
    error = assert_401(
        client.post("/v1/chat/completions", json=CHAT,
                    headers={"Authorization": f"Bearer {other}"})
    )
    assert other not in error["message"]


def test_revoked_key(client: TestClient[Litestar], settings: Settings) -> None:
    key = create_key(settings.data_dir, "soon-gone")
    headers = {"Authorization": f"Bearer {key}"}
    assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200

    revoke_key(settings.data_dir, "soon-gone")
    error = assert_401(client.post("/v1/chat/completions", json=CHAT, headers=headers))
    assert "revoked" in error["message"]
    assert_401(client.get("/v1/models", headers=headers))


def test_valid_key_after_failures_still_works(
    client: TestClient[Litestar], auth: dict[str, str]
) -> None:
    for _ in range(3):
        assert_401(client.post("/v1/chat/completions", json=CHAT,
                               headers={"Authorization": "Bearer nope"}))
    response = client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert response.status_code == 200
    validate(response.json(), "CreateChatCompletionResponse")
