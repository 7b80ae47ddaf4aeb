"""Hermes models that drop the <tool_call> tags: an untagged call object as the whole answer
is a tool call (as llama.cpp's Hermes parser reads it); anything else stays content."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.engine.parsers import OutputParser, ToolSpec

TOOLS = (
    ToolSpec(
        "get_weather",
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    ),
    ToolSpec("get_time", {}),
)
PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TIME = '{"name":"get_time","arguments":{}}'


def splits(text: str) -> Iterator[list[str]]:
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]


def run(chunks: list[str], **options: Any) -> tuple[str, list[tuple[str, Any]]]:
    ids = (f"call_{n}" for n in itertools.count())
    options.setdefault("tool_format", "hermes")
    options.setdefault("tools", TOOLS)
    parser = OutputParser(id_factory=lambda: next(ids), **options)
    content = "".join(parser.feed(c).content for c in chunks) + parser.finish().content
    return content, [(c.name, json.loads(c.arguments)) for c in parser.tool_calls]


@pytest.mark.parametrize(
    ("text", "options", "expected"),
    [
        (PARIS, {}, ("", [("get_weather", {"city": "Paris"})])),
        ("\n " + PARIS + "\n", {}, ("", [("get_weather", {"city": "Paris"})])),
        (
            f"{PARIS}\n{TIME}",
            {},
            ("", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
        ),
        (
            f"{PARIS}\n{TIME}",
            {"parallel_tool_calls": False},
            ("", [("get_weather", {"city": "Paris"})]),
        ),
        # Not only calls: all of it is content (nothing lost, nothing half-parsed).
        (PARIS + " and more", {}, (PARIS + " and more", [])),
        (PARIS + '\n{"temperature_c": 18}', {}, (PARIS + '\n{"temperature_c": 18}', [])),
        # A tool that was not offered, or a plain JSON answer: content.
        ('{"name": "launch", "arguments": {}}', {}, ('{"name": "launch", "arguments": {}}', [])),
        ('{"city": "Paris"}', {}, ('{"city": "Paris"}', [])),
        ('{"name": "get_weather", "argu', {}, ('{"name": "get_weather", "argu', [])),
        # Only at the start of the answer.
        ("Sure: " + PARIS, {}, ("Sure: " + PARIS, [])),
        # Not for the XML format, nor without tools.
        (PARIS, {"tool_format": "qwen_xml"}, (PARIS, [])),
        (PARIS, {"tool_format": None, "tools": ()}, (PARIS, [])),
        # After a think block the answer starts again.
        (
            "<think>\nhm\n</think>\n\n" + PARIS,
            {"reasoning": True},
            ("", [("get_weather", {"city": "Paris"})]),
        ),
        # Tagged calls still work after a bare-looking start fails.
        (
            '{"x": 1}\n<tool_call>\n' + TIME + "\n</tool_call>",
            {},
            ('{"x": 1}', [("get_time", {})]),
        ),
    ],
    ids=[
        "one",
        "spaced",
        "parallel",
        "parallel-off",
        "trailing-text",
        "echoed-result",
        "unknown-tool",
        "plain-json",
        "cut-off",
        "not-at-start",
        "xml-format",
        "no-tools",
        "after-think",
        "tagged-after",
    ],
)
def test_bare_calls_split_independently(
    text: str, options: dict[str, Any], expected: tuple[str, list[tuple[str, Any]]]
) -> None:
    for chunks in splits(text):
        assert run(chunks, **options) == expected, chunks


def test_a_bare_call_candidate_is_held_until_the_end() -> None:
    parser = OutputParser(tool_format="hermes", tools=TOOLS)
    assert parser.feed(' {"na').is_empty()
    assert parser.feed('me": "get_time", "arguments": {}}').is_empty()
    final = parser.finish()
    assert final.content == ""
    assert [c.name for c in final.tool_calls if c.name] == ["get_time"]


def test_text_that_cannot_open_a_call_streams_at_once() -> None:
    parser = OutputParser(tool_format="hermes", tools=TOOLS)
    assert parser.feed('{"city"').content == '{"city"'
