"""POST /v1/chat/completions against the fake engine: shapes, streaming, limits, billing."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from appliance.app import create_app
from appliance.engine.protocol import SamplingParams
from appliance.settings import Settings
from appliance.store.db import DB_FILENAME
from tests.fakes import FakeEngine, FakeModel
from tests.helpers import create_key, list_keys, parse_sse, wait_for
from tests.support.openai_schema import validate

HELLO = "Hello, world! How are you?"
GOOD: dict[str, Any] = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


def chat(client: TestClient[Litestar], auth: dict[str, str], **changes: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json={**GOOD, **changes}, headers=auth)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    validate(body, "CreateChatCompletionResponse")
    return body


def stream(
    client: TestClient[Litestar], auth: dict[str, str], **changes: Any
) -> tuple[list[dict[str, Any]], Any]:
    body = {**GOOD, "stream": True, **changes}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get("cache-control") == "no-cache"
        chunks, done = parse_sse(response.iter_lines())
    assert done, "the stream did not end with data: [DONE]"
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return chunks, response


def check_stream(chunks: list[dict[str, Any]], *, include_usage: bool) -> dict[str, Any]:
    """The invariants every stream keeps; return the usage chunk (or {})."""
    assert chunks
    first = chunks[0]
    assert first["id"].startswith("chatcmpl-")
    assert first["object"] == "chat.completion.chunk"
    for chunk in chunks:
        assert chunk["id"] == first["id"]
        assert chunk["created"] == first["created"]
        assert chunk["model"] == first["model"]
        assert chunk["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"].get("role") == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1, "exactly one chunk carries finish_reason"
    usage_chunk: dict[str, Any] = {}
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == []
        assert last["usage"] is not None
        usage_chunk = last
        assert chunks[-2] is finishing[0]
        for chunk in chunks[:-1]:
            assert "usage" in chunk and chunk["usage"] is None
    else:
        assert chunks[-1] is finishing[0]
        assert all(c["choices"] for c in chunks)
        assert all(c.get("usage") is None for c in chunks)
    return usage_chunk


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# -- non-streaming ---------------------------------------------------------------------------


def test_completion_shape(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine
) -> None:
    body = chat(client, auth)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": HELLO, "refusal": None}
    assert choice["logprobs"] is None
    usage = body["usage"]
    prompt = engine.default.prompts[-1]
    assert usage["prompt_tokens"] == len(prompt)
    assert usage["completion_tokens"] == len(engine.default.script)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # The model's chat template (ChatML for a template-less model) rendered the prompt.
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_ids_are_unique(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    assert len({chat(client, auth)["id"] for _ in range(5)}) == 5


def test_default_model_when_none_named(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    body = chat(client, auth, model="")
    assert body["model"] == "fake-model"
    response = client.post(
        "/v1/chat/completions", json={"messages": GOOD["messages"]}, headers=auth
    )
    assert response.status_code == 200
    assert response.json()["model"] == "fake-model"


def test_max_tokens_gives_length(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine
) -> None:
    body = chat(client, auth, max_tokens=3)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == "Hello, world"
    assert body["usage"]["completion_tokens"] == 3
    assert engine.default.requests[-1].max_tokens == 3


def test_max_completion_tokens_wins_over_max_tokens(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine
) -> None:
    body = chat(client, auth, max_tokens=6, max_completion_tokens=2)
    assert body["usage"]["completion_tokens"] == 2
    assert body["choices"][0]["finish_reason"] == "length"
    assert engine.default.requests[-1].max_tokens == 2


def test_max_tokens_default_fills_the_context(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine
) -> None:
    chat(client, auth)
    prompt_len = len(engine.default.prompts[-1])
    assert engine.default.requests[-1].max_tokens == engine.default.context_length - prompt_len


def test_max_tokens_is_capped_by_the_room_left(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine
) -> None:
    chat(client, auth, max_tokens=10**6)
    prompt_len = len(engine.default.prompts[-1])
    assert engine.default.requests[-1].max_tokens == engine.default.context_length - prompt_len


@pytest.mark.parametrize("stop", [" world", [" world"], ["zzz", " world"]])
def test_stop_strings(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine, stop: Any
) -> None:
    body = chat(client, auth, stop=stop)
    assert body["choices"][0]["message"]["content"] == "Hello,"
    assert body["choices"][0]["finish_reason"] == "stop"
    expected = (stop,) if isinstance(stop, str) else tuple(stop)
    assert engine.default.requests[-1].stop == expected


def test_sampling_parameters_reach_the_engine(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine
) -> None:
    chat(
        client,
        auth,
        temperature=0.3,
        top_p=0.5,
        top_k=7,
        min_p=0.1,
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repeat_penalty=1.1,
    )
    assert engine.default.requests[-1].sampling == SamplingParams(
        temperature=0.3,
        top_p=0.5,
        top_k=7,
        min_p=0.1,
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repeat_penalty=1.1,
    )
    chat(client, auth)
    assert engine.default.requests[-1].sampling == SamplingParams()


def test_unknown_fields_are_ignored(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    # What Open WebUI and the SDKs send besides the fields the appliance uses.
    body = chat(
        client,
        auth,
        user="someone@example.com",
        metadata={"chat_id": "abc", "message_id": "def"},
        logit_bias={"50256": -100},
        logprobs=False,
        top_logprobs=None,
        stream_options=None,
        store=False,
        service_tier="auto",
        reasoning_effort="low",
        parallel_tool_calls=None,
        foo={"bar": [1, 2, 3]},
        messages=[{"role": "user", "content": "Hi", "id": "m1", "timestamp": 1}],
    )
    assert body["choices"][0]["message"]["content"] == HELLO


def test_explicit_nulls_are_accepted(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    body = chat(
        client,
        auth,
        temperature=None,
        top_p=None,
        max_tokens=None,
        stop=None,
        seed=None,
        n=None,
        stream=None,
        stream_options=None,
        tools=None,
        tool_choice=None,
        response_format=None,
    )
    assert body["choices"][0]["message"]["content"] == HELLO


def test_text_content_parts(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine
) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
        },
    ]
    body = chat(client, auth, messages=messages)
    assert body["choices"][0]["message"]["content"] == HELLO
    prompt = engine.default.prompts[-1]
    assert "<|im_start|>system\nBe brief.<|im_end|>" in prompt
    assert "<|im_start|>user\nHello there<|im_end|>" in prompt


def test_conversation_roles(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine
) -> None:
    messages = [
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"},
    ]
    chat(client, auth, messages=messages)
    prompt = engine.default.prompts[-1]
    assert prompt.index("system\nRules.") < prompt.index("user\nOne")
    assert prompt.index("assistant\nTwo") < prompt.index("user\nThree")
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ],
)
def test_non_text_content_parts_are_400(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine, part: Any
) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    response = client.post(
        "/v1/chat/completions", json={**GOOD, "messages": messages}, headers=auth
    )
    assert response.status_code == 400, response.text
    body = response.json()
    validate(body, "ErrorResponse")
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "messages"
    assert part["type"] in body["error"]["message"]
    assert engine.default.requests == []
    assert chat(client, auth)["choices"][0]["message"]["content"] == HELLO


# -- streaming -------------------------------------------------------------------------------


def test_stream_shape(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    chunks, _ = stream(client, auth)
    check_stream(chunks, include_usage=False)
    assert text_of(chunks) == HELLO
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["delta"] == {}
    # One content chunk per token: the stream is incremental, not one blob at the end.
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) == 8


def test_stream_include_usage(
    client: TestClient[Litestar], auth: dict[str, str], engine: FakeEngine
) -> None:
    chunks, _ = stream(client, auth, stream_options={"include_usage": True})
    usage = check_stream(chunks, include_usage=True)["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["prompt_tokens"] == len(engine.default.prompts[-1])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    validate(usage, "CompletionUsage")


def test_stream_include_usage_false(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    chunks, _ = stream(client, auth, stream_options={"include_usage": False})
    check_stream(chunks, include_usage=False)


def test_stream_length_and_stop(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    chunks, _ = stream(client, auth, max_tokens=2, stream_options={"include_usage": True})
    usage = check_stream(chunks, include_usage=True)["usage"]
    assert text_of(chunks) == "Hello,"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert usage["completion_tokens"] == 2

    chunks, _ = stream(client, auth, stop=["!"])
    check_stream(chunks, include_usage=False)
    assert text_of(chunks) == "Hello, world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_equals_non_stream(client: TestClient[Litestar], auth: dict[str, str]) -> None:
    chunks, _ = stream(client, auth, stream_options={"include_usage": True})
    body = chat(client, auth)
    assert text_of(chunks) == body["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]
    assert chunks[-1]["usage"]["prompt_tokens"] == body["usage"]["prompt_tokens"]


def test_stream_errors_before_first_byte_are_plain_http_errors(
    client: TestClient[Litestar], auth: dict[str, str]
) -> None:
    response = client.post(
        "/v1/chat/completions", json={**GOOD, "stream": True, "model": "nope"}, headers=auth
    )
    assert response.status_code == 404
    validate(response.json(), "ErrorResponse")


def test_stream_generation_error_becomes_error_event(settings: Settings, api_key: str) -> None:
    engine = FakeEngine([FakeModel(fail_with="boom")])
    with TestClient(create_app(settings, engine_factory=lambda _: engine)) as client:
        wait_for(lambda: engine.ready)
        body = {**GOOD, "stream": True}
        auth = {"Authorization": f"Bearer {api_key}"}
        with client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as response:
            assert response.status_code == 200
            events, done = parse_sse(response.iter_lines())
    assert done
    validate(events[-1], "ErrorResponse")
    assert "boom" in events[-1]["error"]["message"]


# -- billing ---------------------------------------------------------------------------------


def test_usage_is_billed_to_the_key(
    client: TestClient[Litestar], auth: dict[str, str], settings: Settings
) -> None:
    a = chat(client, auth)["usage"]
    b = chat(client, auth, max_tokens=3)["usage"]
    chunks, _ = stream(client, auth, stream_options={"include_usage": True})
    c = chunks[-1]["usage"]
    expected_prompt = a["prompt_tokens"] + b["prompt_tokens"] + c["prompt_tokens"]
    expected_completion = a["completion_tokens"] + b["completion_tokens"] + c["completion_tokens"]

    def billed() -> Any:
        summary = list_keys(settings.data_dir)["test"]
        return summary if summary.requests == 3 else None

    summary = wait_for(billed, what="three usage records")
    assert summary.prompt_tokens == expected_prompt
    assert summary.completion_tokens == expected_completion
    assert summary.last_used is not None


def test_keys_are_billed_separately(
    client: TestClient[Litestar], auth: dict[str, str], settings: Settings
) -> None:
    other = create_key(settings.data_dir, "other")
    chat(client, auth)
    chat(client, {"Authorization": f"Bearer {other}"}, max_tokens=1)
    chat(client, {"Authorization": f"Bearer {other}"}, max_tokens=1)

    def billed() -> Any:
        keys = list_keys(settings.data_dir)
        return keys if keys["test"].requests == 1 and keys["other"].requests == 2 else None

    keys = wait_for(billed)
    assert keys["test"].completion_tokens == 8
    assert keys["other"].completion_tokens == 2


# -- disconnects (raw ASGI, so the client can leave mid-stream) ------------------------------


async def _stream_then_disconnect(app: Litestar, key: str, after_chunks: int) -> list[bytes]:
    """POST a stream, read ``after_chunks`` body messages, then report the client gone."""
    body = json.dumps({**GOOD, "stream": True}).encode()
    gone = asyncio.Event()
    if after_chunks == 0:
        gone.set()  # the client is gone before the server sends anything
    received: list[bytes] = []
    request_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200
        elif message["type"] == "http.response.body" and message.get("body"):
            received.append(message["body"])
            if len(received) >= after_chunks:
                gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"authorization", f"Bearer {key}".encode()),
        ],
        "client": ("127.0.0.1", 12345),
        "server": ("testserver", 80),
        "state": {},
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=5)  # type: ignore[arg-type]
    return received


def test_disconnect_cancels_generation_and_bills_what_was_made(
    settings: Settings, api_key: str
) -> None:
    model = FakeModel(endless=True, delay=0.01)
    engine = FakeEngine([model])
    app = create_app(settings, engine_factory=lambda _: engine)
    with TestClient(app) as client:
        wait_for(lambda: engine.ready)
        # Drive the ASGI app on its own loop (the portal's), as a server would.
        received = client.blocking_portal.call(_stream_then_disconnect, app, api_key, 3)
        assert len(received) >= 3
        assert b"[DONE]" not in b"".join(received)

        wait_for(lambda: model.cancellations, what="the fake model to see the cancellation")
        (cancelled,) = model.cancellations
        assert 0 < cancelled.completion_tokens < 50
        assert model.finishes[-1].reason == "cancelled"

        # The server still serves, and the cut stream was billed for what it generated.
        auth = {"Authorization": f"Bearer {api_key}"}
        response = client.post("/v1/chat/completions", json={**GOOD, "max_tokens": 2}, headers=auth)
        assert response.status_code == 200
        summary = wait_for(
            lambda: (k := list_keys(settings.data_dir)["test"]).requests == 2 and k,
            interval=0.05,
            what="both requests to be billed",
        )
        assert summary.completion_tokens == cancelled.completion_tokens + 2


def test_client_gone_before_the_first_byte_leaves_no_hold(settings: Settings, api_key: str) -> None:
    """Clients that leave before any byte: every hold ends settled or voided, none pending."""
    model = FakeModel(endless=True, delay=0.01)
    engine = FakeEngine([model])
    app = create_app(settings, engine_factory=lambda _: engine)

    def count(status: str) -> int:
        with sqlite3.connect(settings.data_dir / DB_FILENAME) as conn:
            row = conn.execute("SELECT count(*) FROM reservations WHERE status = ?", (status,))
            return int(row.fetchone()[0])

    with TestClient(app) as client:
        wait_for(lambda: engine.ready)
        for _ in range(3):
            received = client.blocking_portal.call(_stream_then_disconnect, app, api_key, 0)
            assert b"[DONE]" not in b"".join(received)
        wait_for(lambda: count("pending") == 0, what="the holds to be released")
        assert count("settled") + count("voided") == 3
        assert all(f.reason == "cancelled" for f in model.finishes)
        auth = {"Authorization": f"Bearer {api_key}"}
        response = client.post("/v1/chat/completions", json={**GOOD, "max_tokens": 2}, headers=auth)
        assert response.status_code == 200
