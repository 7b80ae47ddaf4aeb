"""render_prompt: OpenAI chat requests -> the model's own prompt text plus the output plan."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from appliance.api.protocol import ChatCompletionRequest
from appliance.engine.templates import ChatTemplate
from appliance.errors import InvalidRequestError
from appliance.serving.prompts import RenderedPrompt, render_prompt
from tests.support.tiny_qwen35 import QWEN35_STYLE_TEMPLATE

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL: dict[str, Any] = {"type": "function", "function": {"name": "get_time"}}

# A two-round tool conversation as OpenAI clients send it back.
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}],
    },
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "The user wants the weather; call the tool.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 18}'},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_2", "content": "rainy"},
]

QWEN = ChatTemplate(QWEN35_STYLE_TEMPLATE, eos_token="<|im_end|>")
CHATML = ChatTemplate(None)
# Teaches the Hermes JSON call syntax only (like Qwen 2.5's template, much shortened).
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "</tools>\nCall tools as <tool_call>{json}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def request(**fields: Any) -> ChatCompletionRequest:
    fields.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return msgspec.convert(fields, ChatCompletionRequest)


def render(template: ChatTemplate, **fields: Any) -> RenderedPrompt:
    return render_prompt(request(**fields), template)


# -- the Qwen 3.5 style template ------------------------------------------------------------
def test_qwen35_tool_history_renders_calls_as_xml_and_results_as_tool_responses() -> None:
    rendered = render(QWEN, messages=HISTORY, tools=[WEATHER_TOOL])
    text = rendered.text
    # The tools section, merged with the system prompt; unset fields are not sent as null.
    assert text.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert json.dumps(WEATHER_TOOL) in text
    assert "null" not in text
    # Text parts are joined; arguments sent as a JSON string become XML parameters.
    assert "<|im_start|>user\nWeather in Paris?<|im_end|>\n" in text
    assert (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
    ) in text
    assert (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nLyon\n</parameter>\n"
        "</function>\n</tool_call><|im_end|>\n"
    ) in text
    # Tool results come back as user turns holding <tool_response> blocks.
    assert (
        '<|im_start|>user\n<tool_response>\n{"temperature_c": 18}\n</tool_response><|im_end|>'
        in text
    )
    assert "<|im_start|>user\n<tool_response>\nrainy\n</tool_response><|im_end|>" in text
    # Reasoning of the turns after the last user query is replayed.
    assert "<think>\nThe user wants the weather; call the tool.\n</think>\n\n<tool_call>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    plan = rendered.plan
    assert plan.tool_format == "qwen_xml"
    assert plan.reasoning and plan.starts_in_reasoning
    assert [t.name for t in plan.tools] == ["get_weather"]
    assert plan.grammar is None


def test_thinking_disabled_closes_the_think_block_in_the_prompt() -> None:
    rendered = render(QWEN, chat_template_kwargs={"enable_thinking": False})
    assert rendered.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert rendered.plan.reasoning
    assert not rendered.plan.starts_in_reasoning


def test_thinking_enabled_starts_in_reasoning() -> None:
    rendered = render(QWEN, chat_template_kwargs={"enable_thinking": True})
    assert rendered.text.endswith("<think>\n")
    assert rendered.plan.starts_in_reasoning


def test_forced_call_while_thinking_closes_the_think_block_in_the_grammar() -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    thinking = render(QWEN, tools=[WEATHER_TOOL], tool_choice=choice)
    assert thinking.plan.grammar is not None
    assert thinking.plan.grammar.startswith('root ::= "</think>\\n\\n" any-call\n')
    not_thinking = render(
        QWEN,
        tools=[WEATHER_TOOL],
        tool_choice=choice,
        chat_template_kwargs={"enable_thinking": False},
    )
    assert not_thinking.plan.grammar is not None
    assert not_thinking.plan.grammar.startswith("root ::= any-call\n")
    # A named choice makes exactly one call.
    assert not not_thinking.plan.parallel_tool_calls


def test_json_answer_while_thinking_closes_the_think_block_in_the_grammar() -> None:
    rendered = render(QWEN, response_format={"type": "json_object"})
    assert rendered.plan.grammar is not None
    assert rendered.plan.grammar.startswith('root ::= "</think>\\n\\n" answer\n')


def test_required_forces_any_of_the_tools() -> None:
    rendered = render(QWEN, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    grammar = rendered.plan.grammar
    assert grammar is not None
    assert "any-call ::= call0 | call1" in grammar
    assert '("\\n" any-call)*' in grammar
    single = render(
        QWEN, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", parallel_tool_calls=False
    )
    assert single.plan.grammar is not None
    assert '("\\n" any-call)*' not in single.plan.grammar
    assert not single.plan.parallel_tool_calls


def test_tool_choice_none_hides_the_tools() -> None:
    rendered = render(QWEN, tools=[WEATHER_TOOL], tool_choice="none")
    assert "get_weather" not in rendered.text
    assert "# Tools" not in rendered.text
    assert rendered.plan.tool_format is None
    assert rendered.plan.tools == ()
    assert rendered.plan.grammar is None


def test_named_tool_choice_must_be_offered() -> None:
    with pytest.raises(InvalidRequestError) as info:
        render(
            QWEN,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "send_email"}},
        )
    assert info.value.status_code == 400
    assert info.value.param == "tool_choice"
    assert "send_email" in info.value.message


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forcing_a_call_without_tools_is_a_400(choice: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        render(QWEN, tool_choice=choice)
    assert info.value.param == "tool_choice"


def test_template_raise_exception_is_a_400_not_a_crash() -> None:
    with pytest.raises(InvalidRequestError) as info:
        render(QWEN, messages=[{"role": "system", "content": "Only a system prompt"}])
    assert info.value.status_code == 400
    assert info.value.param == "messages"
    assert "No user query found" in info.value.message


def test_non_text_content_parts_are_a_400() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(InvalidRequestError) as info:
        render(QWEN, messages=[{"role": "user", "content": [image]}])
    assert info.value.param == "messages"


def test_json_schema_without_schema_is_a_400() -> None:
    with pytest.raises(InvalidRequestError) as info:
        render(QWEN, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert info.value.param == "response_format"


def test_developer_messages_are_system_messages() -> None:
    rendered = render(
        QWEN,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    )
    assert rendered.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


# -- tool format detection ------------------------------------------------------------------
def test_a_template_with_only_tool_call_tags_gets_hermes() -> None:
    rendered = render(ChatTemplate(HERMES_TEMPLATE), messages=HISTORY, tools=[WEATHER_TOOL])
    assert rendered.plan.tool_format == "hermes"
    assert not rendered.plan.reasoning
    # The template received the decoded arguments, so its tojson writes an object.
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}' in (
        rendered.text
    )
    # It renders tools itself: no instructions are injected.
    assert "You can call these tools" not in rendered.text


def test_forced_hermes_grammar_writes_json_calls() -> None:
    rendered = render(
        ChatTemplate(HERMES_TEMPLATE),
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert rendered.plan.grammar is not None
    assert '"<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": "' in (
        rendered.plan.grammar
    )


# -- the ChatML fallback (a GGUF without a template) ----------------------------------------
def test_chatml_fallback_injects_tool_instructions_into_the_system_message() -> None:
    rendered = render(CHATML, messages=HISTORY, tools=[WEATHER_TOOL])
    text = rendered.text
    assert text.startswith("<|im_start|>system\nYou are terse.\n\nYou can call these tools.")
    assert json.dumps(WEATHER_TOOL) in text
    assert text.count("<|im_start|>system") == 1
    assert rendered.plan.tool_format == "hermes"
    assert not rendered.plan.reasoning
    assert not rendered.plan.starts_in_reasoning
    assert text.endswith("<|im_start|>assistant\n")


def test_chatml_fallback_without_a_system_message_gets_one() -> None:
    rendered = render(CHATML, tools=[WEATHER_TOOL])
    assert rendered.text.startswith("<|im_start|>system\nYou can call these tools.")
    assert rendered.text.count("<|im_start|>system") == 1
    assert "<|im_start|>user\nHi<|im_end|>" in rendered.text


def test_chatml_fallback_keeps_earlier_tool_calls_visible() -> None:
    """A template that ignores tool_calls must not make the model forget what it called."""
    rendered = render(CHATML, messages=HISTORY, tools=[WEATHER_TOOL])
    text = rendered.text
    paris = json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "days": 2}})
    lyon = json.dumps({"name": "get_weather", "arguments": {"city": "Lyon"}})
    assert f"<|im_start|>assistant\n<tool_call>\n{paris}\n</tool_call><|im_end|>" in text
    assert f"<|im_start|>assistant\n<tool_call>\n{lyon}\n</tool_call><|im_end|>" in text
    assert '<|im_start|>tool\n{"temperature_c": 18}<|im_end|>' in text
    assert "<|im_start|>tool\nrainy<|im_end|>" in text
    assert "<|im_start|>user\nWeather in Paris?<|im_end|>" in text


def test_chatml_fallback_without_tools_has_no_instructions() -> None:
    rendered = render(CHATML, messages=[{"role": "user", "content": "Hi"}])
    assert rendered.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert rendered.plan.tool_format is None
