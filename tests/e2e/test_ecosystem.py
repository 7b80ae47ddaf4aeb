"""The appliance fits the ecosystem: Prometheus scrapes, legacy /v1/completions and
/v1/embeddings clients, against a real server subprocess on loopback serving SmolLM2.

Schemas: responses are checked against OpenAI's published ``CreateCompletionResponse`` and
``CreateEmbeddingResponse`` (tests/support/openai_schema). Two documented gaps of that
spec are bridged explicitly rather than loosened globally:

* stream chunks of ``/v1/completions`` carry ``finish_reason: null`` until the last choice
  (what OpenAI itself streams; clients look for the first non-null one), while the spec
  describes only whole responses: chunks are validated with the null filled in, after
  asserting it is null exactly on the non-final chunks;
* ``encoding_format: "base64"`` returns the vector as a base64 string (as OpenAI does) but the
  spec only types the float form: base64 responses are validated after decoding.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.openwebui_support import ApplianceServer, appliance_server, http_json
from tests.helpers import parse_sse, wait_for
from tests.support.models import smollm2_path
from tests.support.openai_schema import validate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "smollm2"
CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three colours of the rainbow, one per line."},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceServer]:
    root = tmp_path_factory.mktemp("ecosystem")
    with appliance_server(root, {f"{MODEL}.gguf": smollm2_path()}) as running:
        yield running


@pytest.fixture(scope="module")
def vocab() -> Any:
    """SmolLM2's tokenizer in this process (vocab only), to build token-id prompts."""
    import llama_cpp

    return llama_cpp.Llama(str(smollm2_path()), vocab_only=True, verbose=False)


def tokens_of(vocab: Any, text: str) -> list[int]:
    return [int(t) for t in vocab.tokenize(text.encode(), add_bos=True, special=True)]


def stream(server: ApplianceServer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream(
        "POST", server.base_url + path, json=body, headers=server.auth, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events, done = parse_sse(response.iter_lines())
    assert done, "the stream did not end with [DONE]"
    return events


def scrape(server: ApplianceServer, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(server.base_url + "/metrics", headers=headers, timeout=30)
    return response.status_code, response.text


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample by sample name (``_total``, ``_count``, ``_bucket`` suffixes kept)."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matching = [
        v for lab, v in found.get(name, []) if all(lab.get(k) == want for k, want in labels.items())
    ]
    assert matching, f"no sample {name}{labels} in the scrape; have {sorted(found)}"
    return sum(matching)


def unit_norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


# -- /health ------------------------------------------------------------------------------


def test_health_named_the_loading_model_while_it_loaded(server: ApplianceServer) -> None:
    loading = [json.loads(body) for status, body in server.health_seen if status == 503]
    assert loading, f"/health never answered 503 while the model loaded: {server.health_seen}"
    for body in loading:
        assert body["status"] == "loading" and body["loading"] == [MODEL], loading
        assert set(body) <= {"status", "loading", "progress"}, body
        assert set(body.get("progress", {})) <= {MODEL}, body
    # llama.cpp's load progress (0..1), once it has reported some, only grows.
    fractions = [b["progress"][MODEL] for b in loading if MODEL in b.get("progress", {})]
    assert fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions), loading
    assert server.health_seen[-1][0] == 200


# -- /v1/completions ----------------------------------------------------------------------


def test_completion_non_stream_matches_openai_schema(server: ApplianceServer) -> None:
    status, body = server.post(
        "/v1/completions",
        {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0},
    )
    assert status == 200, body
    validate(body, "CreateCompletionResponse")
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["text"].strip(), body
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6


def test_completion_stream_with_usage_matches_openai_schema(server: ApplianceServer) -> None:
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = stream(server, "/v1/completions", body)
    *text_chunks, usage_chunk = events
    assert text_chunks, events
    for i, chunk in enumerate(text_chunks):
        final = i == len(text_chunks) - 1
        assert "usage" not in chunk, chunk
        assert len(chunk["choices"]) == 1
        reason = chunk["choices"][0]["finish_reason"]
        assert (reason is not None) == final, (i, chunk)
        filled = {**chunk, "choices": [{**chunk["choices"][0], "finish_reason": "length"}]}
        validate(filled, "CreateCompletionResponse")
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    validate(usage_chunk, "CreateCompletionResponse")
    assert usage_chunk["usage"]["completion_tokens"] == 8
    assert {c["id"] for c in events} == {events[0]["id"]}

    # The streamed text is exactly the non-streamed text (greedy).
    streamed = "".join(c["choices"][0]["text"] for c in text_chunks)
    status, whole = server.post("/v1/completions", {**body, "stream": False})
    assert status == 200, whole
    assert streamed == whole["choices"][0]["text"]


def test_completion_stream_without_usage_has_no_usage(server: ApplianceServer) -> None:
    events = stream(
        server, "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "stream": True}
    )
    assert events and all("usage" not in e for e in events), events
    assert all(len(e["choices"]) == 1 for e in events)


def test_completion_echo_stop_and_token_ids(server: ApplianceServer, vocab: Any) -> None:
    prompt = "The capital of France is"
    base = {"max_tokens": 8, "temperature": 0}
    _, plain = server.post("/v1/completions", {**base, "prompt": prompt})
    status, echoed = server.post("/v1/completions", {**base, "prompt": prompt, "echo": True})
    assert status == 200, echoed
    validate(echoed, "CreateCompletionResponse")
    assert echoed["choices"][0]["text"] == prompt + plain["choices"][0]["text"]

    # A token-id prompt is the same prompt: same greedy completion, same billing.
    ids = tokens_of(vocab, prompt)
    status, by_ids = server.post("/v1/completions", {**base, "prompt": ids, "echo": True})
    assert status == 200, by_ids
    assert by_ids["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] == len(ids)
    assert by_ids["choices"][0]["text"].endswith(prompt + plain["choices"][0]["text"])

    # Streamed echo comes first.
    events = stream(server, "/v1/completions", {**base, "prompt": prompt, "echo": True,
                                                 "stream": True})  # fmt: skip
    assert events[0]["choices"][0]["text"] == prompt
    assert "".join(e["choices"][0]["text"] for e in events) == echoed["choices"][0]["text"]

    # A stop string ends the text before it (and is not included).
    full = plain["choices"][0]["text"]
    cut = full.strip().split()[1] if len(full.strip().split()) > 1 else full.strip()
    status, stopped = server.post("/v1/completions", {**base, "prompt": prompt, "stop": [cut]})
    assert status == 200, stopped
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == full[: full.index(cut)]
    assert cut not in stopped["choices"][0]["text"]


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        (5, "prompt"),
        ({"text": "hi"}, "prompt"),
        (None, "prompt"),
        ("", "empty"),
        ([], "prompt"),
        (["one", "two"], "one prompt"),
        ([[1, 2], [3, 4]], "one prompt"),
        (["text", 3], "must be a string"),
        ([1, -2], "negative"),
        ([1, 10**9], "vocabulary"),
        ([[]], "empty"),
    ],
)
def test_completion_bad_prompts_are_400(
    server: ApplianceServer, prompt: Any, fragment: str
) -> None:
    status, body = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 2})
    assert status == 400, body
    error = body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "prompt"
    assert fragment in error["message"], error


def test_completion_without_prompt_is_400(server: ApplianceServer) -> None:
    status, body = server.post("/v1/completions", {"max_tokens": 2})
    assert status == 400, body
    assert "prompt" in body["error"]["message"]


def test_a_bad_token_id_does_not_fail_other_requests(server: ApplianceServer) -> None:
    """Out-of-vocabulary ids are refused at admission: llama.cpp would otherwise fail the
    whole decode batch, and with it every request generating alongside."""
    result: dict[str, tuple[int, Any]] = {}

    def long_generation() -> None:
        result["good"] = server.post(
            "/v1/completions",
            {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 48, "temperature": 0},
        )

    worker = threading.Thread(target=long_generation)
    worker.start()
    bad_results = [
        server.post("/v1/completions", {"prompt": [1, 2, 49152 + n], "max_tokens": 4})
        for n in range(3)
    ]
    worker.join(timeout=300)
    assert all(status == 400 for status, _ in bad_results), bad_results
    status, body = result["good"]
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 48


# -- /v1/embeddings -----------------------------------------------------------------------


def test_embeddings_forms_normalised_and_schema(server: ApplianceServer, vocab: Any) -> None:
    status, one = server.post("/v1/embeddings", {"model": MODEL, "input": "a red apple"})
    assert status == 200, one
    validate(one, "CreateEmbeddingResponse")
    vector = one["data"][0]["embedding"]
    assert len(vector) > 64
    assert unit_norm(vector) == pytest.approx(1.0, abs=1e-6)
    assert one["usage"]["prompt_tokens"] == one["usage"]["total_tokens"] > 0

    status, many = server.post("/v1/embeddings", {"input": ["a red apple", "a blue sky", "x"]})
    assert status == 200, many
    validate(many, "CreateEmbeddingResponse")
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    assert many["data"][0]["embedding"] == pytest.approx(vector, abs=1e-6)
    assert many["data"][1]["embedding"] != many["data"][0]["embedding"]
    for item in many["data"]:
        assert item["object"] == "embedding"
        assert unit_norm(item["embedding"]) == pytest.approx(1.0, abs=1e-6)

    ids = tokens_of(vocab, "a red apple")
    status, by_ids = server.post("/v1/embeddings", {"input": ids})
    assert status == 200, by_ids
    assert by_ids["usage"]["prompt_tokens"] == len(ids) == one["usage"]["prompt_tokens"]
    assert by_ids["data"][0]["embedding"] == pytest.approx(vector, abs=1e-6)

    status, lists = server.post("/v1/embeddings", {"input": [ids, ids[:2]]})
    assert status == 200, lists
    assert len(lists["data"]) == 2
    assert lists["data"][0]["embedding"] == pytest.approx(vector, abs=1e-6)


def test_embeddings_base64_decodes_to_the_float_vector(server: ApplianceServer) -> None:
    _, floats = server.post("/v1/embeddings", {"input": ["tea", "coffee"]})
    status, encoded = server.post(
        "/v1/embeddings", {"input": ["tea", "coffee"], "encoding_format": "base64"}
    )
    assert status == 200, encoded
    for as_float, as_b64 in zip(floats["data"], encoded["data"], strict=True):
        raw = base64.b64decode(as_b64["embedding"], validate=True)
        assert len(raw) == 4 * len(as_float["embedding"])  # little-endian float32, like OpenAI
        decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        assert decoded == pytest.approx(as_float["embedding"], abs=1e-6)
        as_b64["embedding"] = decoded
    validate(encoded, "CreateEmbeddingResponse")


def test_embeddings_dimensions_truncate_and_renormalise(server: ApplianceServer) -> None:
    _, full = server.post("/v1/embeddings", {"input": "sunrise"})
    status, short = server.post("/v1/embeddings", {"input": "sunrise", "dimensions": 16})
    assert status == 200, short
    validate(short, "CreateEmbeddingResponse")
    head = full["data"][0]["embedding"][:16]
    vector = short["data"][0]["embedding"]
    assert len(vector) == 16
    assert unit_norm(vector) == pytest.approx(1.0, abs=1e-6)
    scale = unit_norm(head)
    assert vector == pytest.approx([v / scale for v in head], abs=1e-6)


def test_embeddings_bill_the_key(server: ApplianceServer) -> None:
    before = server.keys()[server.key_name]
    status, body = server.post("/v1/embeddings", {"input": ["billing one", "billing two"]})
    assert status == 200, body
    after = server.keys()[server.key_name]
    billed = body["usage"]["prompt_tokens"]
    assert billed > 0
    assert after["prompt_tokens"] - before["prompt_tokens"] == billed
    assert after["completion_tokens"] == before["completion_tokens"]
    assert after["requests"] == before["requests"] + 1


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"input": ""}, "empty"),
        ({"input": []}, "input"),
        ({"input": 7}, "input"),
        ({"input": {"text": "x"}}, "input"),
        ({"input": ["ok", 5]}, "must be a string"),
        ({"input": [[]]}, "empty"),
        ({"input": [3, 10**9]}, "vocabulary"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({}, "input"),
    ],
)
def test_embeddings_bad_input_is_400(
    server: ApplianceServer, payload: dict[str, Any], fragment: str
) -> None:
    status, body = server.post("/v1/embeddings", payload)
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error"
    assert fragment in body["error"]["message"], body


def test_embeddings_too_long_is_context_length_exceeded(server: ApplianceServer) -> None:
    before = server.keys()[server.key_name]
    status, body = server.post("/v1/embeddings", {"input": ["short", "word " * 3000]})
    assert status == 400, body
    assert body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "input"
    after = server.keys()[server.key_name]
    assert after["prompt_tokens"] == before["prompt_tokens"], "a refused input was billed"


# -- /metrics -----------------------------------------------------------------------------


def test_metrics_after_real_traffic(server: ApplianceServer) -> None:
    # Chat twice with the same conversation (the second reuses the prefix cache), once
    # streaming; a text completion; an embedding; one failed request.
    for _ in range(2):
        status, body = server.post(
            "/v1/chat/completions", {"messages": CHAT, "max_tokens": 8, "temperature": 0}
        )
        assert status == 200, body
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    events = stream(server, "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 12, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    })  # fmt: skip
    assert events[-1]["usage"]["completion_tokens"] > 1
    status, _ = server.post("/v1/completions", {"prompt": "One, two,", "max_tokens": 4})
    assert status == 200
    status, _ = server.post("/v1/embeddings", {"input": "metrics"})
    assert status == 200
    too_long = [{"role": "user", "content": "word " * 2000}]
    status, body = server.post("/v1/chat/completions", {"messages": too_long})
    assert status == 400, body
    assert body["error"]["code"] == "context_length_exceeded"
    status, _ = server.post("/v1/chat/completions", {"model": "no-such-model-xyz",
                                                     "messages": CHAT})  # fmt: skip
    assert status == 404

    status, text = scrape(server)
    assert status == 200, text
    found = samples(text)  # parses cleanly, or raises

    for endpoint in ("chat", "completions", "embeddings"):
        assert value(found, "appliance_requests_total", endpoint=endpoint, model=MODEL,
                     status="200") >= 1  # fmt: skip
    assert value(found, "appliance_requests_total", endpoint="chat", status="400") >= 1
    # Made-up model names never become label values.
    assert value(found, "appliance_requests_total", endpoint="chat", model="-",
                 status="404") >= 1  # fmt: skip
    assert "no-such-model-xyz" not in text

    assert value(found, "appliance_prompt_tokens_total", model=MODEL) > 0
    assert value(found, "appliance_completion_tokens_total", model=MODEL) > 0
    assert value(found, "appliance_time_to_first_token_seconds_count", model=MODEL) >= 4
    assert value(found, "appliance_time_to_first_token_seconds_sum", model=MODEL) > 0
    assert value(found, "appliance_inter_token_latency_seconds_count", model=MODEL) > 0
    buckets = [v for lab, v in found["appliance_inter_token_latency_seconds_bucket"]
               if lab.get("le") == "+Inf"]  # fmt: skip
    assert buckets and buckets[0] == value(
        found, "appliance_inter_token_latency_seconds_count", model=MODEL
    )

    assert value(found, "appliance_queue_depth", model=MODEL) == 0
    assert value(found, "appliance_running_sequences", model=MODEL) == 0
    assert 0 < value(found, "appliance_prefix_cache_hit_ratio", model=MODEL) <= 1
    assert 0 < value(found, "appliance_kv_cache_usage_ratio", model=MODEL) <= 1
    memory = value(found, "appliance_model_memory_bytes", model=MODEL)
    size = smollm2_path().stat().st_size
    assert 0.5 * size < memory <= size, (memory, size)
    assert value(found, "appliance_models_loaded") == 1

    # Per-key counters carry the key's display prefix, never the secret.
    key = server.keys()[server.key_name]
    prefix = key["prefix"]
    assert server.api_key.startswith(prefix) and len(prefix) < len(server.api_key)
    assert value(found, "appliance_key_tokens_total", key=prefix, kind="prompt") > 0
    assert value(found, "appliance_key_tokens_total", key=prefix, kind="completion") > 0
    assert server.api_key not in text
    assert server.api_key[len(prefix) :] not in text
    # The scrape and the ledger agree on the key's usage (usage writes may trail a stream).
    counted = (
        value(found, "appliance_key_tokens_total", key=prefix, kind="prompt"),
        value(found, "appliance_key_tokens_total", key=prefix, kind="completion"),
    )

    def ledger() -> tuple[int, int]:
        row = server.keys()[server.key_name]
        return row["prompt_tokens"], row["completion_tokens"]

    wait_for(lambda: ledger() == counted, timeout=10, what=f"ledger {ledger()} == {counted}")


def test_metrics_need_no_api_key_from_loopback(server: ApplianceServer) -> None:
    response = httpx.get(server.base_url + "/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")


def test_metrics_token_is_enforced(tmp_path: Path) -> None:
    token = "scrape-secret-0123456789"
    with appliance_server(
        tmp_path, {f"{MODEL}.gguf": smollm2_path()}, extra_args=["--metrics-token", token]
    ) as guarded:
        status, body = http_json("GET", guarded.base_url + "/metrics")
        assert status == 401, body
        assert body["error"]["type"] == "authentication_error"
        status, _ = scrape(guarded, token="wrong-token")
        assert status == 401
        status, _ = scrape(guarded, token=guarded.api_key)  # an API key is not the token
        assert status == 401
        status, text = scrape(guarded, token=token)
        assert status == 200, text
        assert samples(text)["appliance_models_loaded"][0][1] == 1
        assert token not in text
