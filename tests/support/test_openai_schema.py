"""Tests for ``tests.support.openai_schema``: valid OpenAI bodies pass, broken ones fail."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.support.extract_openai_schemas import REF_PREFIX, ROOTS
from tests.support.openai_schema import SCHEMAS_PATH, components, schema_names, validate


def _chat_completion() -> dict[str, Any]:
    """A complete non-streaming chat.completion, as the OpenAI API returns it."""
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "smollm2-135m-instruct",
        "system_fingerprint": "fp_appliance",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }


def _chunk() -> dict[str, Any]:
    """A streaming chat.completion.chunk carrying content, with ``usage: null``."""
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "smollm2-135m-instruct",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "Hel"},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": None,
    }


def _error() -> dict[str, Any]:
    """An OpenAI error body."""
    return {
        "error": {
            "message": "The model `nope` does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_extracted_file_has_roots_and_closed_refs() -> None:
    """Every root schema is present and every ``$ref`` resolves inside the copy."""
    raw = json.loads(SCHEMAS_PATH.read_text(encoding="utf-8"))
    names = set(raw["components"]["schemas"])
    assert set(ROOTS) <= names
    refs: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    refs.add(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(raw)
    assert refs, "expected the copy to contain references"
    for ref in refs:
        assert ref.startswith(REF_PREFIX), ref
        assert ref.removeprefix(REF_PREFIX) in names, ref


def _nullable_sites(node: Any, path: str = "$") -> list[str]:
    """Paths of every object carrying a boolean ``nullable`` key."""
    sites: list[str] = []
    if isinstance(node, dict):
        if isinstance(node.get("nullable"), bool):
            sites.append(path)
        for key, value in node.items():
            sites += _nullable_sites(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            sites += _nullable_sites(item, f"{path}/{index}")
    return sites


def test_adapted_schemas_are_valid_2020_12() -> None:
    """The copy uses ``nullable``; after the rewrite none is left and all schemas check."""
    raw = json.loads(SCHEMAS_PATH.read_text(encoding="utf-8"))
    assert _nullable_sites(raw), "the spec copy was expected to use OpenAPI nullable"
    schemas = components()["components"]["schemas"]
    assert _nullable_sites(schemas) == []
    for name in schema_names():
        Draft202012Validator.check_schema(schemas[name])


def test_valid_chat_completion() -> None:
    """A full chat.completion with usage conforms."""
    validate(_chat_completion(), "CreateChatCompletionResponse")


def test_valid_chat_completion_with_tool_calls() -> None:
    """An assistant message with a function tool call (oneOf + discriminator) conforms."""
    body = _chat_completion()
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    body["choices"][0]["finish_reason"] = "tool_calls"
    validate(body, "CreateChatCompletionResponse")


def test_valid_stream_chunk_with_null_usage() -> None:
    """A content chunk with ``usage: null`` and ``finish_reason: null`` conforms."""
    validate(_chunk(), "CreateChatCompletionStreamResponse")


def test_valid_final_usage_chunk() -> None:
    """The ``stream_options.include_usage`` trailer: no choices, usage set."""
    chunk = _chunk()
    chunk["choices"] = []
    chunk["usage"] = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    validate(chunk, "CreateChatCompletionStreamResponse")


def test_valid_models_list() -> None:
    """``GET /v1/models`` output conforms, and a single model does too."""
    model = {"id": "smollm2", "object": "model", "created": 1_700_000_000, "owned_by": "me"}
    validate({"object": "list", "data": [model]}, "ListModelsResponse")
    validate({"object": "list", "data": []}, "ListModelsResponse")
    validate(model, "Model")


def test_valid_error_body() -> None:
    """An error body with string and null ``param``/``code`` conforms."""
    validate(_error(), "ErrorResponse")
    body = _error()
    body["error"]["param"] = None
    body["error"]["code"] = None
    validate(body, "ErrorResponse")


def test_valid_completion_and_embedding() -> None:
    """Legacy text_completion and embeddings list bodies conform."""
    validate(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1_700_000_000,
            "model": "m",
            "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        },
        "CreateCompletionResponse",
    )
    validate(
        {
            "object": "list",
            "model": "m",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
            "usage": {"prompt_tokens": 2, "total_tokens": 2},
        },
        "CreateEmbeddingResponse",
    )


def test_rejects_missing_choices() -> None:
    """A chat.completion without ``choices`` is reported with its path and reason."""
    body = _chat_completion()
    del body["choices"]
    with pytest.raises(AssertionError, match=r"'choices' is a required property"):
        validate(body, "CreateChatCompletionResponse")


def test_rejects_wrong_object() -> None:
    """A chunk labelled as a chat.completion is rejected at ``$.object``."""
    chunk = _chunk()
    chunk["object"] = "chat.completion"
    with pytest.raises(AssertionError, match=r"\$\.object: 'chat\.completion' is not one of"):
        validate(chunk, "CreateChatCompletionStreamResponse")
    body = _chat_completion()
    body["object"] = "chat.completion.chunk"
    with pytest.raises(AssertionError, match=r"\$\.object"):
        validate(body, "CreateChatCompletionResponse")


def test_rejects_error_without_code() -> None:
    """``code`` must be present (it may be null, but not absent)."""
    body = _error()
    del body["error"]["code"]
    with pytest.raises(AssertionError, match=r"\$\.error: 'code' is a required property"):
        validate(body, "ErrorResponse")


def test_rejects_null_where_not_nullable() -> None:
    """``nullable`` is honoured only where the spec says so: chat.completion usage isn't."""
    body = _chat_completion()
    body["usage"] = None
    with pytest.raises(AssertionError, match=r"\$\.usage"):
        validate(body, "CreateChatCompletionResponse")
    chunk = _chunk()
    chunk["choices"][0]["finish_reason"] = "bogus"
    with pytest.raises(AssertionError, match=r"finish_reason"):
        validate(chunk, "CreateChatCompletionStreamResponse")


def test_rejects_message_missing_refusal_and_bad_finish_reason() -> None:
    """Nested failures name the nested path; every top-level error is listed."""
    body = _chat_completion()
    choice = body["choices"][0]
    del choice["message"]["refusal"]
    choice["finish_reason"] = None
    with pytest.raises(AssertionError) as excinfo:
        validate(copy.deepcopy(body), "CreateChatCompletionResponse")
    text = str(excinfo.value)
    assert "$.choices[0].message: 'refusal' is a required property" in text
    assert "$.choices[0].finish_reason" in text
    assert "3 top-level error(s)" in text  # type + enum + required


def test_unknown_schema_name() -> None:
    """A typo in the schema name is a ValueError, not a silent pass."""
    with pytest.raises(ValueError, match="unknown OpenAI schema"):
        validate({}, "CreateChatCompletionResponses")
