"""Tool calling, reasoning and structured output through a real server and the OpenAI SDK.

One server (a subprocess on loopback, ``--threads 1``) serves every model of the module from
one models dir, loading each on first use:

* the tiny random-weight ``qwen35moe`` / ``qwen35`` GGUFs: their text is noise, so the tests
  assert structure (grammar-forced calls, reasoning split, stream == non-stream at
  temperature 0, usage accounting), which is what the real Qwen 3.5 models rely on;
* SmolLM2-135M (embedded): forced calls and JSON answers from a weak real model;
* Qwen2.5-Coder-0.5B (optional; skipped when its parts are not installed): a full tool round
  trip, printed (``pytest -s``) and written to ``test-output/qwen_tool_roundtrip.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.e2e.qwen_support import (
    QWEN_CODER,
    SMOLLM2,
    TINY_DENSE,
    TINY_MOE,
    RunningServer,
    StreamResult,
    accumulate_stream,
    dump,
    running_server,
)
from tests.support.models import require_qwen_coder
from tests.support.openai_schema import validate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = [TINY_MOE, TINY_DENSE]
TRANSCRIPT_PATH = Path(__file__).resolve().parents[2] / "test-output" / "qwen_tool_roundtrip.json"

# Every parameter has a bounded grammar (enum, integer, boolean, small object), so even random
# weights finish a forced call; "$ref"s check that referenced types are honoured end to end.
ALARM_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "$defs": {
        "repeat": {"type": "string", "enum": ["daily", "weekdays", "once"]},
        "time": {
            "type": "object",
            "properties": {"hour": {"type": "integer"}, "minute": {"type": "integer"}},
            "required": ["hour", "minute"],
            "additionalProperties": False,
        },
    },
    "properties": {
        "time": {"$ref": "#/$defs/time"},
        "repeat": {"$ref": "#/$defs/repeat"},
        "loud": {"type": "boolean"},
        "snoozes": {"type": "integer"},
    },
    "required": ["time", "repeat", "loud"],
    "additionalProperties": False,
}
ALARM_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "set_alarm",
        "description": "Set an alarm clock",
        "parameters": ALARM_PARAMETERS,
    },
}
TIMER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "start_timer",
        "description": "Start a countdown timer",
        "parameters": {
            "type": "object",
            "properties": {"seconds": {"type": "integer"}},
            "required": ["seconds"],
        },
    },
}
ALARM_CHOICE = {"type": "function", "function": {"name": "set_alarm"}}
MOOD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "confident": {"type": "boolean"},
        "score": {"type": "integer"},
    },
    "required": ["mood", "confident", "score"],
    "additionalProperties": False,
}

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "is_capital": {"type": "boolean"},
        "landmarks": {
            "type": "array",
            "items": {"type": "string", "maxLength": 40},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["city", "country", "is_capital", "landmarks"],
    "additionalProperties": False,
}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


# -- fixtures and helpers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("qwen-fidelity")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    sdk = openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=120
    )
    yield sdk
    sdk.close()


def complete(client: openai.OpenAI, **request: Any) -> tuple[dict[str, Any], ChatCompletion]:
    """A non-streamed completion: the raw JSON (schema-checked) and the SDK's parsed object."""
    raw = client.chat.completions.with_raw_response.create(**request)
    body: dict[str, Any] = raw.http_response.json()
    validate(body, "CreateChatCompletionResponse")
    return body, raw.parse()


def stream(client: openai.OpenAI, **request: Any) -> StreamResult:
    """A streamed completion through the SDK; every chunk is checked against the schema."""
    chunks = []
    events = client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **request
    )
    with events:
        for chunk in events:
            data = chunk.model_dump(mode="json", exclude_unset=True)
            validate(data, "CreateChatCompletionStreamResponse")
            chunks.append(data)
    result = accumulate_stream(chunks)
    assert result.roles == ["assistant"], "the role comes once, in the first chunk"
    assert result.usage is not None, "include_usage asks for a final usage chunk"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == result.usage
    return result


def message_of(body: dict[str, Any]) -> dict[str, Any]:
    choice = body["choices"][0]
    message: dict[str, Any] = choice["message"]
    return message


def check_usage(usage: dict[str, Any]) -> None:
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert isinstance(reasoning, int)
    assert 0 <= reasoning <= usage["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_call_deltas(result: StreamResult) -> None:
    """OpenAI's streaming shape: the first entry of a call names it, later ones add arguments."""
    started: set[int] = set()
    for chunk in result.chunks:
        for choice in chunk["choices"]:
            for piece in choice["delta"].get("tool_calls") or []:
                index = piece["index"]
                if index not in started:
                    assert index == len(started), "calls are numbered 0, 1, ... in order"
                    assert piece["id"].startswith("call_")
                    assert piece["type"] == "function"
                    assert piece["function"]["name"]
                    assert piece["function"]["arguments"] == ""
                    started.add(index)
                else:
                    assert set(piece) == {"index", "function"}, piece
                    assert set(piece["function"]) == {"arguments"}, piece
    assert len(started) == len(result.tool_calls)


def check_calls(calls: list[dict[str, Any]], schemas: dict[str, dict[str, Any]]) -> None:
    assert calls
    for call in calls:
        assert call["type"] == "function"
        assert call["id"].startswith("call_")
        name = call["function"]["name"]
        assert name in schemas
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, schemas[name])


def reasoning_of(message: dict[str, Any]) -> str:
    reasoning: str = message.get("reasoning_content") or ""
    return reasoning


def same_calls(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Tool calls equal but for their (random) ids."""
    strip = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in a]
    return strip == [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in b]


# -- tiny Qwen 3.5 models (random weights) -----------------------------------------------------
@pytest.mark.parametrize("model", TINY)
def test_tiny_qwen35_chat_stream_equals_non_stream(client: openai.OpenAI, model: str) -> None:
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 24,
        "temperature": 0,
    }
    body, parsed = complete(client, **request)
    assert body["model"] == model
    message = message_of(body)
    content = message["content"] or ""
    assert "<think>" not in content and "</think>" not in content
    check_usage(body["usage"])
    streamed = stream(client, **request)
    assert streamed.content == content
    assert streamed.reasoning == reasoning_of(message)
    assert streamed.finish_reason == body["choices"][0]["finish_reason"]
    assert streamed.usage is not None
    check_usage(streamed.usage)
    assert streamed.usage["completion_tokens"] == body["usage"]["completion_tokens"]
    assert streamed.usage["prompt_tokens"] == body["usage"]["prompt_tokens"]
    # The SDK reads the extension field too.
    assert (getattr(parsed.choices[0].message, "reasoning_content", None) or "") == (
        reasoning_of(message)
    )


@pytest.mark.parametrize("model", TINY)
def test_tiny_qwen35_thinking_disabled_shows_no_think_tags(
    client: openai.OpenAI, model: str
) -> None:
    body, _ = complete(
        client,
        model=model,
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=24,
        temperature=0,
        extra_body=NO_THINKING,
    )
    content = message_of(body)["content"] or ""
    assert "<think>" not in content and "</think>" not in content
    check_usage(body["usage"])


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no-thinking"])
@pytest.mark.parametrize("model", TINY)
def test_tiny_qwen35_named_tool_choice_forces_a_valid_xml_call(
    client: openai.OpenAI, model: str, thinking: bool
) -> None:
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Wake me at 7:30 on weekdays"}],
        "tools": [ALARM_TOOL, TIMER_TOOL],
        "tool_choice": ALARM_CHOICE,
        "max_tokens": 300,
        "temperature": 0,
    }
    if not thinking:
        request["extra_body"] = NO_THINKING
    body, parsed = complete(client, **request)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    # The grammar closes the think block before the call: nothing is reasoning.
    assert reasoning_of(message) == ""
    calls = message["tool_calls"]
    assert len(calls) == 1, "a named tool_choice makes exactly one call"
    assert calls[0]["function"]["name"] == "set_alarm"
    check_calls(calls, {"set_alarm": ALARM_PARAMETERS})
    check_usage(body["usage"])
    sdk_call = parsed.choices[0].message.tool_calls
    assert sdk_call is not None and sdk_call[0].function.name == "set_alarm"

    streamed = stream(client, **request)
    assert streamed.finish_reason == "tool_calls"
    check_call_deltas(streamed)
    assert same_calls(streamed.tool_calls, calls)
    assert streamed.content == "" and streamed.reasoning == ""


@pytest.mark.parametrize("model", TINY)
def test_tiny_qwen35_json_schema_answer_skips_the_think_block(
    client: openai.OpenAI, model: str
) -> None:
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "How do you feel? Answer as JSON."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "mood", "strict": True, "schema": MOOD_SCHEMA},
        },
        "max_tokens": 200,
        "temperature": 0,
    }
    body, _ = complete(client, **request)
    assert body["choices"][0]["finish_reason"] == "stop"
    message = message_of(body)
    jsonschema.validate(json.loads(message["content"]), MOOD_SCHEMA)
    assert reasoning_of(message) == ""
    assert "tool_calls" not in message
    check_usage(body["usage"])
    streamed = stream(client, **request)
    assert streamed.content == message["content"]
    assert streamed.reasoning == ""


# -- SmolLM2 (embedded, ChatML template without tool support) ---------------------------------
@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_smollm2_forced_tool_calls_have_schema_valid_arguments(
    client: openai.OpenAI, tool_choice: Any
) -> None:
    body, _ = complete(
        client,
        model=SMOLLM2,
        messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
        tools=[WEATHER_TOOL, TIMER_TOOL],
        tool_choice=tool_choice,
        max_tokens=150,
        temperature=0,
    )
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    check_calls(
        calls,
        {"get_weather": WEATHER_PARAMETERS, "start_timer": TIMER_TOOL["function"]["parameters"]},
    )
    if isinstance(tool_choice, dict):
        assert [c["function"]["name"] for c in calls] == ["get_weather"]


def test_smollm2_strict_json_schema_answer_validates(client: openai.OpenAI) -> None:
    body, _ = complete(
        client,
        model=SMOLLM2,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "strict": True, "schema": CITY_SCHEMA},
        },
        max_tokens=200,
        temperature=0,
    )
    assert body["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(message_of(body)["content"]), CITY_SCHEMA)


def test_smollm2_json_object_answer_is_an_object(client: openai.OpenAI) -> None:
    body, _ = complete(
        client,
        model=SMOLLM2,
        messages=[
            {
                "role": "user",
                "content": 'Return a JSON object with the keys "city" and "country" for Paris.',
            }
        ],
        response_format={"type": "json_object"},
        max_tokens=150,
        temperature=0,
    )
    assert body["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(message_of(body)["content"]), dict)


# -- Qwen2.5-Coder-0.5B (real Hermes tool calling) --------------------------------------------
QWEN_SYSTEM = (
    "You are a weather assistant. Use the tools, then answer the user in one plain "
    "English sentence."
)
WEATHER_RESULT = {"temperature_c": 18, "condition": "sunny"}


def _assistant_turn(message: dict[str, Any]) -> dict[str, Any]:
    """The assistant message as a client sends it back (only the request fields)."""
    turn: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        turn["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": c["function"]}
            for c in message["tool_calls"]
        ]
    return turn


def test_qwen_coder_tool_round_trip(client: openai.OpenAI) -> None:
    require_qwen_coder()
    transcript: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": QWEN_SYSTEM},
        {"role": "user", "content": "What's the weather like in Paris today?"},
    ]
    base: dict[str, Any] = {
        "model": QWEN_CODER,
        "tools": [WEATHER_TOOL],
        "max_tokens": 150,
        "temperature": 0,
    }

    def step(label: str, **request: Any) -> dict[str, Any]:
        body, _ = complete(client, messages=messages, **base, **request)
        transcript.append(
            {
                "step": label,
                "request": {"messages": list(messages), **base, **request},
                "response": body,
            }
        )
        return body

    # 1. The model decides; a weak model may answer without a call, then the call is forced.
    first = step("tool_choice=auto", tool_choice="auto")
    auto_called = first["choices"][0]["finish_reason"] == "tool_calls"
    if not auto_called:
        first = step("tool_choice=required (auto made no call)", tool_choice="required")
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    check_calls(calls, {"get_weather": WEATHER_PARAMETERS})
    call = calls[0]
    assert call["function"]["name"] == "get_weather"
    assert "paris" in json.loads(call["function"]["arguments"])["city"].lower()

    # 2. Run the tool, send the call and its result back; the model answers in words.
    messages.append(_assistant_turn(choice["message"]))
    messages.extend(
        {"role": "tool", "tool_call_id": c["id"], "content": json.dumps(WEATHER_RESULT)}
        for c in calls
    )
    final = step("tool result sent back, tool_choice=none", tool_choice="none")
    answer = final["choices"][0]
    assert answer["finish_reason"] == "stop"
    assert "tool_calls" not in answer["message"]
    text = answer["message"]["content"]
    _write_transcript(transcript, auto_called)
    assert "18" in text or "sunny" in text.lower(), text
    assert not text.lstrip().startswith("{"), "an answer in words, not an echo of the JSON"


def _write_transcript(transcript: list[dict[str, Any]], auto_called: bool) -> None:
    record = {"model": QWEN_CODER, "auto_made_the_call": auto_called, "steps": transcript}
    TRANSCRIPT_PATH.parent.mkdir(parents=True, exist_ok=True)
    TRANSCRIPT_PATH.write_text(dump(record) + "\n", encoding="utf-8")
    print(f"\n===== Qwen2.5-Coder tool round trip (also in {TRANSCRIPT_PATH}) =====")
    for entry in transcript:
        print(f"\n--- {entry['step']} ---")
        print("request messages:")
        print(dump(entry["request"]["messages"]))
        print("response message:")
        response = entry["response"]
        print(dump(response["choices"][0]["message"]))
        print(f"finish_reason: {response['choices'][0]['finish_reason']}")
        print(f"usage: {json.dumps(response['usage'])}")


def test_qwen_coder_streamed_tool_call_matches_non_stream(client: openai.OpenAI) -> None:
    require_qwen_coder()
    request: dict[str, Any] = {
        "model": QWEN_CODER,
        "messages": [
            {"role": "system", "content": QWEN_SYSTEM},
            {"role": "user", "content": "What's the weather like in Paris today?"},
        ],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "max_tokens": 150,
        "temperature": 0,
    }
    body, _ = complete(client, **request)
    expected = message_of(body)["tool_calls"]

    # Accumulated the way the OpenAI docs show, on the SDK's own chunk objects.
    final_tool_calls: dict[int, Any] = {}
    finish_reason = None
    raw_chunks = []
    with client.chat.completions.create(stream=True, **request) as events:
        for chunk in events:
            raw_chunks.append(chunk.model_dump(mode="json", exclude_unset=True))
            validate(raw_chunks[-1], "CreateChatCompletionStreamResponse")
            for tool_call in chunk.choices[0].delta.tool_calls or []:
                index = tool_call.index
                if index not in final_tool_calls:
                    final_tool_calls[index] = tool_call
                else:
                    assert tool_call.function is not None
                    final_tool_calls[index].function.arguments += tool_call.function.arguments
            finish_reason = chunk.choices[0].finish_reason or finish_reason
    assert finish_reason == "tool_calls"
    streamed = [final_tool_calls[i].model_dump(mode="json") for i in sorted(final_tool_calls)]
    check_calls(streamed, {"get_weather": WEATHER_PARAMETERS})
    assert same_calls(streamed, expected)
    check_call_deltas(accumulate_stream(raw_chunks))


def test_qwen_coder_json_schema_answer_validates(client: openai.OpenAI) -> None:
    require_qwen_coder()
    body, _ = complete(
        client,
        model=QWEN_CODER,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "strict": True, "schema": CITY_SCHEMA},
        },
        max_tokens=200,
        temperature=0,
    )
    assert body["choices"][0]["finish_reason"] == "stop"
    answer = json.loads(message_of(body)["content"])
    jsonschema.validate(answer, CITY_SCHEMA)
    assert answer["city"].lower() == "paris"
