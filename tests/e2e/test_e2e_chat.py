"""E2E: chat completions on the real engine, through the official openai SDK and raw HTTP."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import CTX_SIZE, E2EServer
from tests.helpers import parse_sse
from tests.support.openai_schema import validate

pytestmark = pytest.mark.e2e

STORY = [{"role": "user", "content": "Write a very long story about a dragon."}]


def greedy(sdk: openai.OpenAI, model: str, max_tokens: int = 40, **extra: Any) -> Any:
    return sdk.chat.completions.create(
        model=model, messages=STORY, temperature=0, max_tokens=max_tokens, **extra
    )


def raw_stream(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks, done = parse_sse(response.iter_lines())
    assert done, "no data: [DONE]"
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return chunks


def test_non_stream_completion(
    sdk: openai.OpenAI, http: httpx.Client, e2e_server: E2EServer
) -> None:
    completion = sdk.chat.completions.create(
        model=e2e_server.model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=24,
    )
    assert completion.object == "chat.completion"
    assert completion.model == e2e_server.model
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    raw = http.post(
        "/v1/chat/completions",
        json={
            "model": e2e_server.model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
        },
    )
    assert raw.status_code == 200
    validate(raw.json(), "CreateChatCompletionResponse")


def test_default_model_when_none_is_named(http: httpx.Client, e2e_server: E2EServer) -> None:
    response = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert response.status_code == 200
    assert response.json()["model"] == e2e_server.model


def test_stream_with_usage_raw(http: httpx.Client, e2e_server: E2EServer) -> None:
    chunks = raw_stream(
        http,
        {
            "model": e2e_server.model,
            "messages": STORY,
            "max_tokens": 16,
            "temperature": 0,
            "stream_options": {"include_usage": True},
        },
    )
    first = chunks[0]
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {
        (first["id"], first["created"], e2e_server.model)
    }
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1
    assert finishing[0]["choices"][0]["finish_reason"] == "length"
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 16
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text


def test_stream_with_usage_sdk(sdk: openai.OpenAI, e2e_server: E2EServer) -> None:
    stream = sdk.chat.completions.create(
        model=e2e_server.model,
        messages=STORY,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    validate(
        json.loads(chunks[0].model_dump_json(exclude_unset=True)),
        "CreateChatCompletionStreamResponse",
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons.count("length") == 1 and reasons[-1] == "length"


def test_greedy_stream_equals_non_stream(sdk: openai.OpenAI, e2e_server: E2EServer) -> None:
    whole = greedy(sdk, e2e_server.model, 48)
    stream = greedy(sdk, e2e_server.model, 48, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == whole.choices[0].message.content
    again = greedy(sdk, e2e_server.model, 48)
    assert again.choices[0].message.content == whole.choices[0].message.content


def _cut_point(text: str) -> str:
    """A word from the middle of ``text`` whose first occurrence is well after the start."""
    for word in text.split()[4:]:
        word = word.strip(".,!?\"'")
        if len(word) >= 4 and text.find(word) > 10:
            return word
    raise AssertionError(f"no usable stop word in {text!r}")


@pytest.mark.parametrize("as_list", [False, True], ids=["string", "list"])
def test_stop(sdk: openai.OpenAI, e2e_server: E2EServer, as_list: bool) -> None:
    full = greedy(sdk, e2e_server.model, 48).choices[0].message.content
    assert full
    word = _cut_point(full)
    stop: str | list[str] = ["#never#", word] if as_list else word
    for stream in (False, True):
        result = greedy(sdk, e2e_server.model, 48, stop=stop, stream=stream)
        if stream:
            chunks = list(result)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            text, reason = result.choices[0].message.content, result.choices[0].finish_reason
        assert word not in text
        assert text == full[: full.find(word)]
        assert reason == "stop"


def test_length_finish(sdk: openai.OpenAI, e2e_server: E2EServer) -> None:
    result = greedy(sdk, e2e_server.model, 5)
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 5


def test_max_completion_tokens(sdk: openai.OpenAI, e2e_server: E2EServer) -> None:
    result = sdk.chat.completions.create(
        model=e2e_server.model, messages=STORY, temperature=0, max_completion_tokens=7
    )
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 7
    both = sdk.chat.completions.create(
        model=e2e_server.model,
        messages=STORY,
        temperature=0,
        max_tokens=30,
        max_completion_tokens=3,
    )
    assert both.usage is not None and both.usage.completion_tokens == 3


def test_penalties_and_sampling_knobs_complete_and_server_keeps_serving(
    sdk: openai.OpenAI, e2e_server: E2EServer
) -> None:
    """Penalised sampling runs on the real engine (it once crashed the scheduler thread)."""
    knobs: list[dict[str, Any]] = [
        {"frequency_penalty": 0.8},
        {"presence_penalty": 0.6},
        {"extra_body": {"repeat_penalty": 1.3}},
        {
            "frequency_penalty": 0.5,
            "presence_penalty": 0.5,
            "top_p": 0.9,
            "seed": 7,
            "temperature": 0.7,
            "extra_body": {"repeat_penalty": 1.1, "top_k": 20, "min_p": 0.05},
        },
    ]
    for extra in knobs:
        result = sdk.chat.completions.create(
            model=e2e_server.model, messages=STORY, max_tokens=12, **{"temperature": 0, **extra}
        )
        assert result.choices[0].finish_reason in ("length", "stop"), extra
        assert result.usage is not None and 0 < result.usage.completion_tokens <= 12
        assert result.choices[0].message.content
    # The engine is still alive for everyone else.
    assert greedy(sdk, e2e_server.model, 5).usage.completion_tokens == 5


def test_ignore_eos_generates_exactly_max_tokens(sdk: openai.OpenAI, e2e_server: E2EServer) -> None:
    short = [{"role": "user", "content": "Reply with just the word yes."}]
    natural = sdk.chat.completions.create(
        model=e2e_server.model, messages=short, temperature=0, max_tokens=48
    )
    assert natural.choices[0].finish_reason == "stop"
    assert natural.usage is not None and natural.usage.completion_tokens < 48
    forced = sdk.chat.completions.create(
        model=e2e_server.model,
        messages=short,
        temperature=0,
        max_tokens=48,
        extra_body={"ignore_eos": True},
    )
    assert forced.choices[0].finish_reason == "length"
    assert forced.usage is not None and forced.usage.completion_tokens == 48
    text = forced.choices[0].message.content or ""
    assert text.startswith(natural.choices[0].message.content or "")
    assert "<|im_end|>" not in text and "<|endoftext|>" not in text


def test_seed_makes_sampling_reproducible(sdk: openai.OpenAI, e2e_server: E2EServer) -> None:
    def sample(seed: int) -> str:
        result = sdk.chat.completions.create(
            model=e2e_server.model, messages=STORY, temperature=1.0, seed=seed, max_tokens=32
        )
        return result.choices[0].message.content or ""

    first = sample(1234)
    assert first
    assert sample(1234) == first
    others = {sample(seed) for seed in (1, 2, 3)}
    assert others != {first}, "different seeds all gave the seeded text: seed is ignored?"


def test_context_overflow(sdk: openai.OpenAI, e2e_server: E2EServer) -> None:
    long = "apple banana cherry " * 1200  # far beyond 2048 tokens
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model=e2e_server.model, messages=[{"role": "user", "content": long}], max_tokens=5
        )
    error = info.value
    assert error.status_code == 400
    assert error.code == "context_length_exceeded"
    message = str(error.body["message"] if isinstance(error.body, dict) else error.message)
    assert "context" in message
    numbers = [int(n) for n in re.findall(r"\d+", message)]
    assert CTX_SIZE in numbers
    assert any(n > CTX_SIZE for n in numbers), message
    # The server keeps serving.
    assert greedy(sdk, e2e_server.model, 3).choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"messages": []}, "messages"),
    ],
)
def test_invalid_requests_are_400(
    http: httpx.Client, e2e_server: E2EServer, change: dict[str, Any], param: str
) -> None:
    body = {"model": e2e_server.model, "messages": [{"role": "user", "content": "Hi"}], **change}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()
    validate(error, "ErrorResponse")
    assert error["error"]["param"] == param


def test_text_content_parts(sdk: openai.OpenAI, e2e_server: E2EServer) -> None:
    as_parts = sdk.chat.completions.create(
        model=e2e_server.model,
        temperature=0,
        max_tokens=12,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Write a very long story "},
                    {"type": "text", "text": "about a dragon."},
                ],
            }
        ],
    )
    plain = greedy(sdk, e2e_server.model, 12)
    assert as_parts.choices[0].message.content == plain.choices[0].message.content
    assert as_parts.usage is not None and plain.usage is not None
    assert as_parts.usage.prompt_tokens == plain.usage.prompt_tokens


def test_image_parts_are_400(sdk: openai.OpenAI, e2e_server: E2EServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model=e2e_server.model,
            max_tokens=4,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this image?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                        },
                    ],
                }
            ],
        )
    assert info.value.param == "messages"
