"""Tests for appliance.engine.parsers: results must not depend on where text is split."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.engine.parsers import (
    OutputParser,
    ParsedDelta,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    detect_tool_format,
    new_tool_call_id,
)

WEATHER = ToolSpec(
    name="get_weather",
    parameters={
        "type": "object",
        "properties": {
            "location": {"type": "string"},
            "days": {"type": "integer"},
            "metric": {"type": "boolean"},
            "options": {"type": "object"},
            "ratio": {"anyOf": [{"type": "number"}, {"type": "null"}]},
            "label": {"type": ["string", "null"]},
        },
    },
)
TIME = ToolSpec(name="get_time", parameters={})
TOOLS = (WEATHER, TIME)


class Result(msgspec.Struct, frozen=True):
    """What a whole generation produced, ids excluded (they are per-run)."""

    content: str
    reasoning: str
    calls: tuple[tuple[str, Any], ...]  # (name, decoded arguments)


class Case(msgspec.Struct, frozen=True):
    id: str
    text: str
    options: dict[str, Any]
    expected: Result


def _ids() -> Iterator[str]:
    return (f"call_{n}" for n in itertools.count())


def run(chunks: Sequence[str], options: dict[str, Any]) -> Result:
    """Feeds chunks, checks every delta invariant, and aggregates the result."""
    ids = _ids()
    parser = OutputParser(id_factory=lambda: next(ids), **options)
    deltas = [parser.feed(chunk) for chunk in chunks]
    deltas.append(parser.finish())
    assert parser.finish().is_empty()
    assert not parser.in_reasoning or options.get("reasoning")
    call_deltas = [tc for d in deltas for tc in d.tool_calls]
    assembled = _check_call_deltas(call_deltas)
    assert assembled == parser.tool_calls
    return Result(
        content="".join(d.content for d in deltas),
        reasoning="".join(d.reasoning for d in deltas),
        calls=tuple((c.name, json.loads(c.arguments)) for c in assembled),
    )


def _check_call_deltas(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Asserts the OpenAI streaming shape and rebuilds the calls from the deltas."""
    calls: list[ToolCall] = []
    for delta in deltas:
        if delta.index == len(calls):  # first delta of a new call
            assert delta.id is not None and delta.id.startswith("call_")
            assert delta.name
            assert delta.arguments == ""
            calls.append(ToolCall(id=delta.id, name=delta.name, arguments=""))
        else:
            assert delta.index == len(calls) - 1, "indexes must run 0..n-1 in order"
            assert delta.id is None and delta.name is None
            calls[-1].arguments += delta.arguments
    for call in calls:
        assert isinstance(json.loads(call.arguments), dict)
    return calls


def splits_all(text: str) -> Iterator[list[str]]:
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]


def xml_call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


THINKING = {"reasoning": True, "starts_in_reasoning": True}
XML = {"tool_format": "qwen_xml", "tools": TOOLS}
HERMES = {"tool_format": "hermes", "tools": TOOLS}
PARIS = {"location": "Paris, France", "days": 3}

UNCLOSED = "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=location>\nParis"
JUNK = "a <tool_call>\nnot a call\n</tool_call> b"
BAD_JSON = 'x\n<tool_call>\n{"name": "get_weather", "arguments": {]}\n</tool_call>'
UNKNOWN = "ok " + xml_call("launch_missiles", target="moon")
NO_NAME = '<tool_call>\n{"arguments": {}}\n</tool_call>'

CASES = [
    Case(
        "reasoning_content",
        "Let me think.\nOK.\n</think>\n\nThe answer is 4.",
        THINKING,
        Result("The answer is 4.", "Let me think.\nOK.", ()),
    ),
    Case(
        "repeated_think_open",
        " \n<think>\nHmm.\n\n</think>\n\nHi\n",
        THINKING,
        Result("Hi\n", "Hmm.\n", ()),
    ),
    Case(
        "model_opens_think",
        "<think>\nHmm\n</think>\n\nHi <think>more</think>!",
        {"reasoning": True},
        Result("Hi !", "Hmmmore", ()),
    ),
    Case(
        "reasoning_xml_typed",
        "Need weather.\n</think>\n\n"
        + xml_call(
            "get_weather",
            location="Paris, France",
            days="3",
            metric="true",
            options='{"a": [1, 2]}',
            ratio="0.5",
            label="7",
            unknown="5",
        ),
        {**THINKING, **XML},
        Result(
            "",
            "Need weather.",
            (
                (
                    "get_weather",
                    {
                        "location": "Paris, France",
                        "days": 3,
                        "metric": True,
                        "options": {"a": [1, 2]},
                        "ratio": 0.5,
                        "label": "7",
                        "unknown": "5",
                    },
                ),
            ),
        ),
    ),
    Case(
        "xml_untyped_fallback",
        xml_call("get_weather", days="three", ratio="NaN", location="\n  Zürich  \n"),
        XML,
        Result(
            "",
            "",
            (("get_weather", {"days": "three", "ratio": "NaN", "location": "\n  Zürich  \n"}),),
        ),
    ),
    Case(
        "two_parallel_calls",
        "Checking.\n\n"
        + xml_call("get_weather", location="Paris, France", days="3")
        + "\n\n"
        + xml_call("get_time")
        + "\n",
        XML,
        Result("Checking.", "", (("get_weather", PARIS), ("get_time", {}))),
    ),
    Case(
        "hermes_text_before",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"location": "Paris, France", "days": 3}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "parameters": "{\\"tz\\": \\"CET\\"}"}\n</tool_call>',
        HERMES,
        Result("Let me check.", "", (("get_weather", PARIS), ("get_time", {"tz": "CET"}))),
    ),
    Case(
        "not_parallel",
        xml_call("get_time") + "\n" + xml_call("get_weather", location="x") + " trailing",
        {**XML, "parallel_tool_calls": False},
        Result("", "", (("get_time", {}),)),
    ),
    Case(
        "thinking_disabled_stray_tags",
        "<think>\n\n</think>\n\nHello <think>wor</think>ld</think>\n!",
        {**XML},
        Result("Hello world!", "", ()),
    ),
    Case(
        "ends_inside_reasoning",
        "Still thinking about\nthis <tool_call>\n",
        {**THINKING, **XML},
        Result("", "Still thinking about\nthis <tool_call>\n", ()),
    ),
    Case(
        "call_inside_think_is_reasoning",
        "<think>" + xml_call("get_time") + "</think>done",
        {"reasoning": True, **XML},
        Result("done", xml_call("get_time"), ()),
    ),
    Case(
        "text_after_call",
        xml_call("get_time") + "\n\nAll done.",
        XML,
        Result("All done.", "", (("get_time", {}),)),
    ),
    Case(
        "xml_sloppy_tags",
        "<tool_call><function=get_weather><parameter=location>Paris, France"
        "<parameter=days>3</parameter></parameter>\n</tool_call>",
        XML,
        Result("", "", (("get_weather", PARIS),)),
    ),
    Case(
        "xml_duplicated_param_close",
        "<tool_call>\n<function=get_weather>\n<parameter=location>\nParis, France\n</parameter>\n"
        "</parameter>\n<parameter=days>\n3\n</parameter>\n</parameter>\n</function>\n</tool_call>",
        XML,
        Result("", "", (("get_weather", PARIS),)),
    ),
    Case(
        "xml_unclosed_region_complete_function",
        "<tool_call>\n<function=get_time>\n</function>\n",
        XML,
        Result("", "", (("get_time", {}),)),
    ),
    Case(
        "xml_two_functions_one_region",
        "<tool_call>\n<function=get_time>\n</function>\n<function=get_weather>\n"
        "<parameter=location>\nParis, France\n</parameter>\n<parameter=days>3</parameter>\n"
        "</tool_call>",
        XML,
        Result("", "", (("get_time", {}), ("get_weather", PARIS))),
    ),
    Case("malformed_unclosed", UNCLOSED, XML, Result(UNCLOSED, "", ())),
    Case("malformed_junk", JUNK, XML, Result(JUNK, "", ())),
    Case("malformed_hermes_json", BAD_JSON, HERMES, Result(BAD_JSON, "", ())),
    Case("malformed_hermes_no_name", NO_NAME, HERMES, Result(NO_NAME, "", ())),
    Case("malformed_unknown_tool", UNKNOWN, XML, Result(UNKNOWN, "", ())),
    Case(
        "unknown_tool_allowed_without_tools",
        UNKNOWN,
        {"tool_format": "qwen_xml"},
        Result("ok", "", (("launch_missiles", {"target": "moon"}),)),
    ),
    Case(
        "malformed_unclosed_hermes",
        '<tool_call>\n{"name": "get_time", "arguments": {}}',
        HERMES,
        Result('<tool_call>\n{"name": "get_time", "arguments": {}}', "", ()),
    ),
    Case(
        "good_then_bad_call",
        xml_call("get_time") + "\n<tool_call>oops</tool_call>",
        XML,
        Result("<tool_call>oops</tool_call>", "", (("get_time", {}),)),
    ),
    Case(
        "no_tool_format_leaves_tags",
        "see <tool_call>x</tool_call>",
        {},
        Result("see <tool_call>x</tool_call>", "", ()),
    ),
    Case(
        "near_miss_tags",
        "<thin <tool_cal> </thinkk> <</tool_call>",
        {"reasoning": True, **HERMES},
        Result("<thin <tool_cal> </thinkk> <</tool_call>", "", ()),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_split_gives_expected_result(case: Case) -> None:
    for chunks in splits_all(case.text):
        assert run(chunks, case.options) == case.expected, chunks


@settings(database=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_partitions(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(CASES))
    cuts = sorted(data.draw(st.sets(st.integers(0, len(case.text)), max_size=12)))
    chunks = [case.text[a:b] for a, b in zip([0, *cuts], [*cuts, len(case.text)], strict=True)]
    assert run(chunks, case.options) == case.expected


FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "<function=f>",
    "<function=get_time>",
    "<parameter=a>",
    "</parameter>",
    "</function>",
    "<think>",
    "</think>",
    "{",
    "}",
    '{"name": "f", "arguments": {}}',
    "\n",
    " ",
    "x",
    "<",
    "1",
]
OPTIONS = st.fixed_dictionaries(
    {
        "reasoning": st.booleans(),
        "starts_in_reasoning": st.booleans(),
        "tool_format": st.sampled_from([None, "qwen_xml", "hermes"]),
        "tools": st.sampled_from([(), TOOLS]),
        "parallel_tool_calls": st.booleans(),
    }
)


@settings(database=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.sampled_from(FRAGMENTS), max_size=30),
    options=OPTIONS,
    data=st.data(),
)
def test_junk_never_raises_and_is_split_independent(
    parts: list[str], options: dict[str, Any], data: st.DataObject
) -> None:
    text = "".join(parts)
    whole = run([text], options)
    assert run(list(text), options) == whole
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=8)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert run(chunks, options) == whole
    if not options["reasoning"]:
        assert whole.reasoning == ""


@settings(database=None, max_examples=300)
@given(
    parts=st.lists(st.sampled_from([f for f in FRAGMENTS if "think" not in f]), max_size=30),
    tool_format=st.sampled_from(["qwen_xml", "hermes"]),
)
def test_text_is_never_lost_when_no_call_parses(parts: list[str], tool_format: str) -> None:
    text = "".join(parts)
    result = run([text], {"tool_format": tool_format, "tools": TOOLS})
    if not result.calls:
        assert result.content == text


def test_in_reasoning_tracks_think_block() -> None:
    parser = OutputParser(reasoning=True, starts_in_reasoning=True)
    assert parser.in_reasoning
    assert parser.feed("a\n</th") == ParsedDelta(reasoning="a")
    assert parser.in_reasoning
    assert parser.feed("ink>\n\nb") == ParsedDelta(content="b")
    assert not parser.in_reasoning
    plain = OutputParser(reasoning=True)
    assert not plain.in_reasoning
    plain.feed("<think>")
    assert plain.in_reasoning


def test_holds_back_only_possible_tags() -> None:
    parser = OutputParser(tool_format="qwen_xml")
    assert parser.feed("Hi <tool_").content == "Hi"
    assert parser.feed("x").content == " <tool_x"
    assert parser.feed("<").content == ""
    assert parser.finish().content == "<"


def test_call_deltas_shape_and_ids() -> None:
    parser = OutputParser(tool_format="hermes")
    delta = parser.feed('<tool_call>{"name": "f", "arguments": {"q": "é"}}</tool_call>')
    first, second = delta.tool_calls
    assert first.index == second.index == 0
    assert first.name == "f" and first.arguments == "" and first.id is not None
    assert len(first.id) == len("call_") + 24 and first.id[5:].isalnum()
    assert second.id is None and second.name is None
    assert second.arguments == '{"q": "é"}'
    assert parser.tool_calls == [ToolCall(id=first.id, name="f", arguments='{"q": "é"}')]
    assert new_tool_call_id() != new_tool_call_id()


def test_feed_after_finish_is_an_error() -> None:
    parser = OutputParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


def test_parsed_delta_is_empty() -> None:
    assert ParsedDelta().is_empty()
    assert not ParsedDelta(content="x").is_empty()
    assert not ParsedDelta(tool_calls=[ToolCallDelta(index=0)]).is_empty()


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ '<tool_call>\\n<function=' ~ name ~ '>' }}", "qwen_xml"),
        ('<tool_call>\\n{"name": <function-name>}', "hermes"),
        ("{{ messages }}", None),
    ],
)
def test_detect_tool_format(template: str, expected: str | None) -> None:
    assert detect_tool_format(template) == expected
