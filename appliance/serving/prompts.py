"""From an OpenAI chat request to a rendered prompt plus how to read the model's output.

Decides the tool-call format (from the chat template), which tools the template sees,
whether the output starts inside a think block, and the grammar that enforces
``tool_choice`` / ``response_format``.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from appliance.api.protocol import ChatCompletionRequest, ChatMessage, ToolDef
from appliance.engine.parsers import OutputParser, ToolFormat, ToolSpec, detect_tool_format
from appliance.engine.templates import ChatTemplate
from appliance.errors import InvalidRequestError
from appliance.serving.grammars import json_grammar, tool_call_grammar

__all__ = ["OutputPlan", "RenderedPrompt", "render_prompt", "template_messages"]

_THINK_CLOSE = "</think>\n\n"


class OutputPlan(msgspec.Struct, kw_only=True, frozen=True):
    """How to constrain and parse one response."""

    reasoning: bool = False
    starts_in_reasoning: bool = False
    tool_format: ToolFormat | None = None
    tools: tuple[ToolSpec, ...] = ()
    parallel_tool_calls: bool = True
    grammar: str | None = None

    def parser(self) -> OutputParser:
        return OutputParser(
            reasoning=self.reasoning,
            starts_in_reasoning=self.starts_in_reasoning,
            tool_format=self.tool_format,
            tools=self.tools,
            parallel_tool_calls=self.parallel_tool_calls,
        )


class RenderedPrompt(msgspec.Struct, kw_only=True, frozen=True):
    text: str
    plan: OutputPlan


def _text_of(message: ChatMessage) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text":
            raise InvalidRequestError(
                f"Content parts of type '{part.type}' are not supported by this model; "
                "send text parts only",
                param="messages",
            )
        parts.append(part.text or "")
    return "".join(parts)


def _arguments(raw: str) -> Any:
    # Templates iterate arguments as a mapping (Qwen 3.5) or dump them with tojson (Qwen 2.5):
    # both want the decoded object, not the JSON string the client sends back.
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _template_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    # Some templates read tool_call.function.name, others tool_call.name: offer both.
    function = {"name": name, "arguments": arguments}
    return {"id": call_id, "type": "function", "function": function, **function}


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> the plain dicts chat templates expect (content always a string)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        item["content"] = _text_of(m) or ""
        if m.name is not None:
            item["name"] = m.name
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.reasoning_content:
            item["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            item["tool_calls"] = [
                _template_call(c.id, c.function.name, _arguments(c.function.arguments))
                for c in m.tool_calls
            ]
        out.append(item)
    return out


def _template_tool(tool: ToolDef) -> dict[str, Any]:
    """A tool as the client sent it: unset optional fields are left out, not ``null``."""
    function = msgspec.to_builtins(tool.function)
    return {"type": tool.type, "function": {k: v for k, v in function.items() if v is not None}}


def _call_text(call: dict[str, Any], tool_format: ToolFormat) -> str:
    """One earlier tool call written the way the model is told to write them."""
    name, arguments = call["name"], call["arguments"]
    if tool_format == "hermes":
        body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        return f"<tool_call>\n{body}\n</tool_call>"
    params = "".join(
        f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}"
        "\n</parameter>\n"
        for k, v in (arguments.items() if isinstance(arguments, dict) else ())
    )
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def _fold_tool_calls(messages: list[dict[str, Any]], tool_format: ToolFormat) -> None:
    """For templates that ignore ``tool_calls``: keep earlier calls visible as message text."""
    for item in messages:
        calls = item.pop("tool_calls", None)
        if calls:
            texts = [item["content"], *(_call_text(c, tool_format) for c in calls)]
            item["content"] = "\n".join(t for t in texts if t)


def _tool_instructions(tools: list[dict[str, Any]]) -> str:
    """For templates that ignore ``tools``: describe them and the Hermes call syntax."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You can call these tools. Their JSON signatures are between <tools> and </tools>:\n"
        f"<tools>\n{listing}\n</tools>\n"
        "To call one, answer only with:\n"
        '<tool_call>\n{"name": "<tool name>", "arguments": {<arguments as JSON>}}\n</tool_call>'
    )


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{text}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def render_prompt(request: ChatCompletionRequest, template: ChatTemplate) -> RenderedPrompt:
    messages = template_messages(request.messages)
    source = template.source
    offered = request.tools or []
    choice = request.tool_choice if request.tool_choice is not None else "auto"
    use_tools = bool(offered) and choice != "none"
    specs = tuple(ToolSpec(t.function.name, t.function.parameters or {}) for t in offered)
    if not offered and (choice == "required" or not isinstance(choice, str)):
        raise InvalidRequestError(
            "tool_choice 'required' or a named function needs a non-empty 'tools' list",
            param="tool_choice",
        )
    template_tools = [_template_tool(t) for t in offered] if use_tools else None
    tool_format: ToolFormat | None = None
    if use_tools:
        tool_format = detect_tool_format(source) or "hermes"
        if "tools" not in source:
            messages = _with_system(messages, _tool_instructions(template_tools or []))
    if "tool_calls" not in source:
        _fold_tool_calls(messages, tool_format or detect_tool_format(source) or "hermes")
    text = template.render(messages, tools=template_tools, extra=request.chat_template_kwargs)
    reasoning = "<think>" in source or "</think>" in source
    starts_in_reasoning = reasoning and text.rstrip().endswith("<think>")
    # A forced answer skips the think block (closing it ourselves) so the grammar's output
    # is read as the answer, not as reasoning.
    prefix = _THINK_CLOSE if starts_in_reasoning else ""
    grammar = None
    parallel = request.parallel_tool_calls is not False
    forced: tuple[ToolSpec, ...] = ()
    if use_tools and not isinstance(choice, str):
        forced = tuple(s for s in specs if s.name == choice.function.name)
        if not forced:
            raise InvalidRequestError(
                f"tool_choice names '{choice.function.name}', which is not in tools",
                param="tool_choice",
            )
        parallel = False
    elif use_tools and choice == "required":
        forced = specs
    if forced:
        assert tool_format is not None
        grammar = tool_call_grammar(forced, tool_format, parallel=parallel, prefix=prefix)
    elif request.response_format is not None and request.response_format.type != "text":
        schema = None
        if request.response_format.type == "json_schema":
            spec = request.response_format.json_schema
            if spec is None or spec.schema is None:
                raise InvalidRequestError(
                    "response_format json_schema needs a 'json_schema.schema' object",
                    param="response_format",
                )
            schema = spec.schema
        grammar = json_grammar(schema, prefix=prefix)
    plan = OutputPlan(
        reasoning=reasoning,
        starts_in_reasoning=starts_in_reasoning,
        tool_format=tool_format,
        tools=specs if use_tools else (),
        parallel_tool_calls=parallel,
        grammar=grammar,
    )
    return RenderedPrompt(text=text, plan=plan)
