"""The GBNF grammars that force tool calls and JSON answers compile in llama.cpp itself.

Each grammar is handed to ``llama_sampler_init_grammar`` with a real vocabulary (SmolLM2's,
loaded vocab-only: no weights, no context), which returns NULL for a grammar it cannot parse.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import llama_cpp
import pytest

from appliance.engine.parsers import ToolSpec
from appliance.errors import InvalidRequestError
from appliance.serving.grammars import json_grammar, tool_call_grammar
from tests.support.models import smollm2_path

WEATHER = ToolSpec(
    "get_weather",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"},
            "hourly": {"type": "boolean"},
        },
        "required": ["city", "unit"],
    },
)

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "$defs": {
        "point": {
            "type": "object",
            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"],
            "additionalProperties": False,
        }
    },
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["circle", "polygon"]},
        "center": {"$ref": "#/$defs/point"},
        "vertices": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 8},
        "style": {
            "type": "object",
            "properties": {
                "color": {"type": "string", "enum": ["red", "green", "blue"]},
                "width": {"type": ["integer", "null"]},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["color"],
            "additionalProperties": False,
        },
        "visible": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["name", "kind", "center", "style"],
    "additionalProperties": False,
}

SHAPE = ToolSpec("draw_shape", NESTED_SCHEMA)
NO_PARAMS = ToolSpec("get_time", {})


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """llama.cpp logs loading (and grammar errors) straight to fd 2; keep ``pytest -s`` readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@pytest.fixture(scope="module")
def vocab() -> Iterator[Any]:
    """SmolLM2's vocabulary, loaded without weights."""
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with quiet_stderr():
        model = llama_cpp.llama_model_load_from_file(str(smollm2_path()).encode(), params)
    assert model, "could not load SmolLM2's vocabulary"
    try:
        yield llama_cpp.llama_model_get_vocab(model)
    finally:
        llama_cpp.llama_model_free(model)


def assert_compiles(vocab: Any, grammar: str) -> None:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    assert sampler, f"llama.cpp rejected the grammar:\n{grammar}"
    llama_cpp.llama_sampler_free(sampler)


def test_a_broken_grammar_is_rejected(vocab: Any) -> None:
    """The negative control: the check above really parses the grammar."""
    bad = 'root ::= "a" undefined-rule\n'
    with quiet_stderr():
        assert not llama_cpp.llama_sampler_init_grammar(vocab, bad.encode(), b"root")


@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
@pytest.mark.parametrize("prefix", ["", "</think>\n\n"], ids=["plain", "after-think"])
def test_xml_tool_grammar_compiles(vocab: Any, parallel: bool, prefix: str) -> None:
    grammar = tool_call_grammar(
        [WEATHER, SHAPE, NO_PARAMS], "qwen_xml", parallel=parallel, prefix=prefix
    )
    assert_compiles(vocab, grammar)
    root = grammar.splitlines()[0]
    assert root.startswith("root ::= " + (json.dumps(prefix) if prefix else "any-call"))
    assert ('("\\n" any-call)*' in root) == parallel
    assert '"<tool_call>\\n<function=get_weather>\\n"' in grammar
    assert '"<tool_call>\\n<function=get_time>\\n" "</function>\\n</tool_call>"' in grammar


def test_xml_grammar_constrains_text_enums(vocab: Any) -> None:
    """An enum of strings is a choice of the raw values, not free text (written unquoted)."""
    grammar = tool_call_grammar([WEATHER], "qwen_xml", parallel=False)
    assert_compiles(vocab, grammar)
    assert '"<parameter=unit>\\n" ("celsius" | "fahrenheit") "\\n</parameter>\\n"' in grammar
    assert '"<parameter=city>\\n" xml-text "\\n</parameter>\\n"' in grammar
    # Optional parameters are optional, required ones are not.
    assert '("<parameter=days>\\n"' in grammar
    assert '("<parameter=city>' not in grammar


def test_xml_grammar_follows_refs_for_parameter_types(vocab: Any) -> None:
    grammar = tool_call_grammar([SHAPE], "qwen_xml", parallel=False)
    assert_compiles(vocab, grammar)
    center = next(line for line in grammar.splitlines() if line.startswith("call0 ::="))
    # "center" is an object behind a $ref: JSON, not free text.
    assert '"<parameter=center>\\n" xml-text' not in center
    assert '"<parameter=kind>\\n" ("circle" | "polygon")' in center


@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
def test_hermes_tool_grammar_compiles(vocab: Any, parallel: bool) -> None:
    grammar = tool_call_grammar([WEATHER, SHAPE, NO_PARAMS], "hermes", parallel=parallel)
    assert_compiles(vocab, grammar)
    assert '"<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": "' in grammar


@pytest.mark.parametrize("prefix", ["", "</think>\n\n"], ids=["plain", "after-think"])
def test_json_object_grammar_compiles(vocab: Any, prefix: str) -> None:
    grammar = json_grammar(None, prefix=prefix)
    assert_compiles(vocab, grammar)
    assert "answer ::= object" in grammar


def test_json_schema_grammar_compiles(vocab: Any) -> None:
    assert_compiles(vocab, json_grammar(NESTED_SCHEMA))


def test_json_strings_exclude_raw_control_characters(vocab: Any) -> None:
    """A raw newline inside a JSON string is invalid JSON, so the grammar must not allow it."""
    grammar = json_grammar({"type": "object", "properties": {"s": {"type": "string"}}})
    assert_compiles(vocab, grammar)
    char = next(line for line in grammar.splitlines() if line.startswith("char ::="))
    assert "\\x00-\\x1F" in char


def test_grammars_leave_the_request_schema_untouched() -> None:
    before = copy.deepcopy(NESTED_SCHEMA)
    json_grammar(NESTED_SCHEMA)
    tool_call_grammar([SHAPE], "hermes", parallel=False)
    tool_call_grammar([SHAPE], "qwen_xml", parallel=False)
    assert before == NESTED_SCHEMA


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "strnig"},
        {"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
        {"type": "string", "pattern": "[a-z]+"},
    ],
    ids=["bad-type", "remote-ref", "missing-ref", "unanchored-pattern"],
)
def test_unsupported_schema_is_a_400(schema: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        json_grammar(schema)
    assert info.value.status_code == 400
    assert info.value.param == "response_format"
    assert "Unsupported JSON schema" in info.value.message


@pytest.mark.parametrize("tool_format", ["qwen_xml", "hermes"])
def test_unsupported_tool_schema_is_a_400_naming_tools(tool_format: Any) -> None:
    tool = ToolSpec("f", {"type": "object", "properties": {"a": {"type": "strnig"}}})
    with pytest.raises(InvalidRequestError) as info:
        tool_call_grammar([tool], tool_format, parallel=False)
    assert info.value.status_code == 400
    assert info.value.param == "tools"
