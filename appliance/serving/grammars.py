"""GBNF grammars that force tool calls and JSON answers, even from a weak model.

llama-server and Ollama ignore a named ``tool_choice``; we compile the tool's JSON schema to
a llama.cpp grammar (with llama-cpp-python's schema converter) wrapped in the model's own
tool-call syntax, so the sampled call always parses and its arguments validate.
"""

from __future__ import annotations

import copy
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


# JSON forbids raw control characters inside strings; llama-cpp-python's converter allows them
# (llama.cpp's own does not), so one sampled newline would make the answer unparseable.
_HEX4 = " ".join(["[0-9a-fA-F]"] * 4)
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ' + _HEX4 + ")"


def _rules(converter: Any) -> str:
    """The converter's rules as GBNF text, with the JSON string character rule fixed."""
    if "char" in converter._rules:
        converter._rules["char"] = _JSON_CHAR
    return str(converter.format_grammar())


def _converter() -> Any:
    return SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )


def _unsupported(name: str, param: str, exc: Exception) -> InvalidRequestError:
    return InvalidRequestError(f"Unsupported JSON schema for '{name}': {exc}", param=param)


def _resolve(converter: Any, schema: dict[str, Any], name: str, param: str) -> Any:
    """A copy of ``schema`` with its local ``$ref``s registered in the converter.

    The converter rewrites ``$ref`` values in place: it must never touch the request's dicts.
    """
    try:
        return converter.resolve_refs(copy.deepcopy(schema), name)
    except Exception as exc:  # the converter raises bare errors on schemas it can't express
        raise _unsupported(name, param, exc) from exc


def _visit_resolved(converter: Any, schema: Any, name: str, param: str) -> str:
    try:
        return str(converter.visit(schema, name))
    except Exception as exc:
        raise _unsupported(name, param, exc) from exc


def _visit(converter: Any, schema: dict[str, Any], name: str, param: str) -> str:
    resolved = _resolve(converter, schema, name, param)
    return _visit_resolved(converter, resolved, name, param)


def _deref(converter: Any, schema: Any) -> Any:
    """Follow a (resolved) ``$ref`` to the schema it names, to look at its type."""
    for _ in range(32):
        if not isinstance(schema, dict) or "$ref" not in schema:
            return schema
        schema = converter._refs.get(schema["$ref"])
    return schema


def _object_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    if not parameters:
        return {"type": "object"}
    return parameters


def json_grammar(schema: dict[str, Any] | None, *, prefix: str = "") -> str:
    """A grammar for one JSON value: any object when ``schema`` is None."""
    converter = _converter()
    target = schema if schema is not None else {"type": "object"}
    rule = _visit(converter, target, "answer", "response_format")
    head = f"{_literal(prefix)} " if prefix else ""
    return f"root ::= {head}{rule}\n{_rules(converter)}\n"


def _string_choices(prop: Any) -> list[str]:
    """The allowed values of a text parameter given by ``enum``/``const`` (all strings)."""
    if not isinstance(prop, dict):
        return []
    values = prop["enum"] if isinstance(prop.get("enum"), list) else None
    if values is None and isinstance(prop.get("const"), str):
        values = [prop["const"]]
    if not values or not all(isinstance(v, str) for v in values):
        return []
    return list(values)


def _xml_call(converter: Any, index: int, tool: ToolSpec) -> str:
    params = _resolve(converter, _object_schema(tool.parameters), f"t{index}", "tools")
    props: dict[str, Any] = params.get("properties") or {}
    required = set(params.get("required") or [])
    parts = [_literal(f"<tool_call>\n<function={tool.name}>\n")]
    for j, (key, prop) in enumerate(props.items()):
        target = _deref(converter, prop)
        kind = target.get("type") if isinstance(target, dict) else None
        choices = _string_choices(target)
        if choices:
            # Text values are written raw (unquoted), so an enum is a choice of raw literals.
            value = "(" + " | ".join(_literal(c) for c in choices) + ")"
        elif kind == "string" or (isinstance(kind, list) and "string" in kind) or not kind:
            value = "xml-text"
        else:
            value = _visit_resolved(converter, prop, f"t{index}-p{j}", "tools")
        opening, closing = _literal(f"<parameter={key}>\n"), _literal("\n</parameter>\n")
        piece = f"{opening} {value} {closing}"
        parts.append(piece if key in required else f"({piece})?")
    parts.append(_literal("</function>\n</tool_call>"))
    return " ".join(parts)


def _hermes_call(converter: Any, index: int, tool: ToolSpec) -> str:
    args = _visit(converter, _object_schema(tool.parameters), f"t{index}-args", "tools")
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
    rules = _rules(converter)
    return "\n".join(lines) + "\n" + rules + "\n"
