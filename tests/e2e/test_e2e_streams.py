"""E2E: client disconnects free the engine and are billed; concurrent streams; usage in the CLI."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import E2EServer
from tests.helpers import parse_sse, wait_for
from tests.support.openai_schema import validate

pytestmark = pytest.mark.e2e


def test_disconnect_cancels_and_bills_what_was_generated(e2e_server: E2EServer) -> None:
    key = e2e_server.create_key("disconnect")
    body = {
        "model": e2e_server.model,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "temperature": 0,
        "max_tokens": 400,
        "stream": True,
    }
    content_chunks = 0
    client = httpx.Client(base_url=e2e_server.base_url, headers=e2e_server.headers(key),
                          timeout=60)
    with client, client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    content_chunks += 1
            if content_chunks >= 2:
                break
    # Leaving the block closed the connection mid-stream.
    closed_at = time.monotonic()
    assert content_chunks == 2

    # The engine is free at once: a new request is served promptly.
    with e2e_server.sdk() as sdk:
        started = time.monotonic()
        quick = sdk.chat.completions.create(
            model=e2e_server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert quick.choices[0].finish_reason in ("stop", "length")
        assert time.monotonic() - started < 5.0

    # The cut stream was billed through on_finish, for the tokens generated before the cut.
    events = wait_for(lambda: e2e_server.usage_events("disconnect"), timeout=10,
                      what="the cancelled stream's usage row")
    billed_after = time.monotonic() - closed_at
    (event,) = events
    assert event["status"] == "cancelled"
    assert 0 < event["completion_tokens"] < 400
    assert event["prompt_tokens"] > 0
    assert billed_after < 10
    summary = e2e_server.keys()["disconnect"]
    assert summary["requests"] == 1
    assert summary["completion_tokens"] == event["completion_tokens"]
    assert summary["prompt_tokens"] == event["prompt_tokens"]


def test_two_concurrent_streams_both_complete(e2e_server: E2EServer) -> None:
    prompts = ["Write a very long story about a dragon.",
               "Write a very long story about a brave knight and a castle."]
    max_tokens = 48
    barrier = threading.Barrier(len(prompts))
    results: list[dict[str, Any]] = [{} for _ in prompts]

    def run(index: int) -> None:
        result = results[index]
        try:
            body = {
                "model": e2e_server.model,
                "messages": [{"role": "user", "content": prompts[index]}],
                "temperature": 0, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True},
            }
            with httpx.Client(base_url=e2e_server.base_url, headers=e2e_server.headers(),
                              timeout=120) as client:
                barrier.wait(timeout=30)
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    result["status"] = response.status_code
                    lines = []
                    for line in response.iter_lines():
                        if '"content":"' in line and "first" not in result:
                            result["first"] = time.monotonic()
                        lines.append(line)
                    result["done_at"] = time.monotonic()
            result["chunks"], result["done"] = parse_sse(lines)
        except Exception as exc:  # reported by the main thread
            result["error"] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for result in results:
        assert "error" not in result, result.get("error")
        assert result["status"] == 200
        assert result["done"], "a stream ended without [DONE]"
        chunks = result["chunks"]
        for chunk in chunks:
            validate(chunk, "CreateChatCompletionStreamResponse")
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert [r for r in reasons if r] == ["length"]
        assert chunks[-1]["usage"]["completion_tokens"] == max_tokens
        assert "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in chunks if c["choices"])
    # They ran side by side (continuous batching), not one after the other.
    assert max(r["first"] for r in results) < min(r["done_at"] for r in results)
    # Each one says what it says alone.
    with e2e_server.sdk() as sdk:
        for prompt, result in zip(prompts, results, strict=True):
            alone = sdk.chat.completions.create(
                model=e2e_server.model, messages=[{"role": "user", "content": prompt}],
                temperature=0, max_tokens=max_tokens,
            )
            text = "".join(c["choices"][0]["delta"].get("content") or ""
                           for c in result["chunks"] if c["choices"])
            assert text == alone.choices[0].message.content


def test_usage_appears_in_keys_list(e2e_server: E2EServer) -> None:
    key = e2e_server.create_key("usage")
    with e2e_server.sdk(key) as sdk:
        one = sdk.chat.completions.create(
            model=e2e_server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6
        )
        stream = sdk.chat.completions.create(
            model=e2e_server.model, messages=[{"role": "user", "content": "Hello there"}],
            max_tokens=6, stream=True, stream_options={"include_usage": True},
        )
        two = [c for c in stream][-1]
    assert one.usage is not None and two.usage is not None
    summary = wait_for(
        lambda: (k := e2e_server.keys()["usage"])["requests"] == 2 and k,
        timeout=10, interval=0.2, what="two billed requests",
    )
    assert summary["prompt_tokens"] == one.usage.prompt_tokens + two.usage.prompt_tokens
    assert summary["completion_tokens"] == (
        one.usage.completion_tokens + two.usage.completion_tokens
    )
    assert summary["revoked"] is False
    assert summary["balance"] is None
    assert summary["last_used"] is not None


def test_bad_requests_do_not_hurt_the_server(e2e_server: E2EServer, sdk: openai.OpenAI) -> None:
    with httpx.Client(base_url=e2e_server.base_url, headers=e2e_server.headers(),
                      timeout=30) as client:
        for raw in (b"{", b"[]", b'{"messages": "x"}', b"\x00\xff"):
            response = client.post("/v1/chat/completions", content=raw,
                                   headers={"Content-Type": "application/json"})
            assert response.status_code == 400
            validate(response.json(), "ErrorResponse")
    result = sdk.chat.completions.create(
        model=e2e_server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert result.choices[0].message.content is not None
