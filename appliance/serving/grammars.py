"""GBNF grammars that force tool calls and JSON answers, even from a weak model.

llama-server and Ollama ignore a named ``tool_choice``; we compile the tool's JSON schema to
a llama.cpp grammar (with llama-cpp-python's schema converter) wrapped in the model's own
tool-call syntax, so the sampled call always parses and its arguments validate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llama_cpp.llama_grammar import SchemaConverter

from appliance.engine.parsers import ToolFormat, ToolSpec
from appliance.errors import InvalidRequestError

__all__ = ["json_grammar", "tool_call_grammar"]

# Text inside an XML parameter: anything that does not start a closing tag.
_XML_TEXT = 'xml-text ::= ([^<] | "<" [^/])*'


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _converter() -> Any:
    return SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )


def _visit(converter: Any, schema: dict[str, Any], name: str) -> str:
    try:
        resolved = converter.resolve_refs(schema, name)
        return str(converter.visit(resolved, name))
    except Exception as exc:  # the converter raises bare errors on schemas it can't express
        raise InvalidRequestError(
            f"Unsupported JSON schema for '{name}': {exc}", param="response_format"
        ) from exc


def _object_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    if not parameters:
        return {"type": "object"}
    return parameters


def json_grammar(schema: dict[str, Any] | None, *, prefix: str = "") -> str:
    """A grammar for one JSON value: any object when ``schema`` is None."""
    converter = _converter()
    rule = _visit(converter, schema if schema is not None else {"type": "object"}, "answer")
    head = f"{_literal(prefix)} " if prefix else ""
    return f"root ::= {head}{rule}\n{converter.format_grammar()}\n"


def _xml_call(converter: Any, index: int, tool: ToolSpec) -> str:
    props: dict[str, Any] = _object_schema(tool.parameters).get("properties") or {}
    required = set(_object_schema(tool.parameters).get("required") or [])
    parts = [_literal(f"<tool_call>\n<function={tool.name}>\n")]
    for j, (key, prop) in enumerate(props.items()):
        kind = prop.get("type") if isinstance(prop, dict) else None
        if kind == "string" or (isinstance(kind, list) and "string" in kind) or not kind:
            value = "xml-text"
        else:
            value = _visit(converter, prop, f"t{index}-p{j}")
        opening, closing = _literal(f"<parameter={key}>\n"), _literal("\n</parameter>\n")
        piece = f"{opening} {value} {closing}"
        parts.append(piece if key in required else f"({piece})?")
    parts.append(_literal("</function>\n</tool_call>"))
    return " ".join(parts)


def _hermes_call(converter: Any, index: int, tool: ToolSpec) -> str:
    args = _visit(converter, _object_schema(tool.parameters), f"t{index}-args")
    head = _literal('<tool_call>\n{"name": ' + json.dumps(tool.name) + ', "arguments": ')
    return f"{head} {args} {_literal('}' + chr(10) + '</tool_call>')}"


def tool_call_grammar(
    tools: Sequence[ToolSpec], tool_format: ToolFormat, *, parallel: bool, prefix: str = ""
) -> str:
    """Force one call (or several when ``parallel``) of the given tools in ``tool_format``."""
    converter = _converter()
    build = _xml_call if tool_format == "qwen_xml" else _hermes_call
    calls = [f"call{i} ::= {build(converter, i, tool)}" for i, tool in enumerate(tools)]
    choice = " | ".join(f"call{i}" for i in range(len(tools)))
    repeat = ' ("\\n" any-call)*' if parallel else ""
    head = f"{_literal(prefix)} " if prefix else ""
    lines = [f"root ::= {head}any-call{repeat}", f"any-call ::= {choice}", *calls, _XML_TEXT]
    rules: str = converter.format_grammar()
    return "\n".join(lines) + "\n" + rules + "\n"
