"""Turns the text of one complete ``<tool_call>`` region into (name, arguments JSON) pairs.

Private helper of :mod:`appliance.engine.parsers`: the streaming parser finds where a region
starts and ends; this module decides whether the region is a well-formed call. Every function
here answers ``None`` for anything it does not understand, so the caller can hand the raw text
back as content instead of losing it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "ParsedCall",
    "RegionParser",
    "Schemas",
    "bare_call_start",
    "parse_bare_hermes",
    "parse_hermes",
    "parse_qwen_xml",
]

ParsedCall = tuple[str, str]
"""A tool call as (function name, arguments as the text of a JSON object)."""

Schemas = Mapping[str, Mapping[str, Any]] | None
"""Tool name -> JSON schema of its arguments; ``None`` means any tool name is accepted."""

RegionParser = Callable[[str, Schemas, bool], list[ParsedCall] | None]
"""(region text, schemas, closed by ``</tool_call>``) -> calls, or None if not a call."""

_FUNC_OPEN = "<function="
_FUNC_CLOSE = "</function>"
_PARAM_OPEN = "<parameter="
_PARAM_CLOSE = "</parameter>"


def _reject_constant(token: str) -> Any:
    # NaN/Infinity parse in Python but are not JSON: json.dumps would then write invalid JSON.
    raise ValueError(f"not a JSON value: {token}")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _dumps(value: Any) -> str:
    # Clients read arguments back with a JSON parser; keep non-ASCII text readable.
    return json.dumps(value, ensure_ascii=False)


def _schema_types(schema: Any) -> set[str]:
    """The JSON types a property schema allows (looking into anyOf/oneOf); empty if unknown."""
    if not isinstance(schema, Mapping):
        return set()
    types: set[str] = set()
    declared = schema.get("type")
    if isinstance(declared, str):
        types.add(declared)
    elif isinstance(declared, list):
        types.update(t for t in declared if isinstance(t, str))
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            for option in options:
                types |= _schema_types(option)
    return types


def _deref(schema: Any, root: Mapping[str, Any], depth: int = 0) -> Any:
    """Follows local ``$ref``s (``#/$defs/...``) so a referenced parameter's type is known."""
    for _ in range(32):
        ref = schema.get("$ref") if isinstance(schema, Mapping) else None
        if not isinstance(ref, str) or not ref.startswith("#/"):
            break
        target: Any = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, Mapping) else None
        schema = target
    if isinstance(schema, Mapping) and depth < 8:
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list):
                schema = {**schema, key: [_deref(option, root, depth + 1) for option in options]}
    return schema


def _properties(schemas: Schemas, name: str) -> Mapping[str, Any]:
    if schemas is None:
        return {}
    root = schemas.get(name, {})
    props = root.get("properties")
    if not isinstance(props, Mapping):
        return {}
    return {key: _deref(prop, root) for key, prop in props.items()}


def _convert(raw: str, schema: Any) -> Any:
    """Types one ``<parameter>`` value: strings stay raw text, everything else is JSON."""
    # The template writes each value on its own line; those two newlines are layout.
    text = raw[1:] if raw.startswith("\n") else raw
    text = text[:-1] if text.endswith("\n") else text
    types = _schema_types(schema)
    if not types or "string" in types:
        return text
    try:
        return _loads(raw.strip())
    except (ValueError, RecursionError):
        # A model that writes "3 days" for an integer still meant something; keep it as text.
        return text


def _valid_name(name: str) -> bool:
    return bool(name) and not any(c in name for c in "<>\n")


def _parse_parameters(body: str, props: Mapping[str, Any]) -> dict[str, Any] | None:
    """Parses the ``<parameter=k>v</parameter>`` list of one function body."""
    args: dict[str, Any] = {}
    pos = 0
    while True:
        start = body.find(_PARAM_OPEN, pos)
        gap = body[pos : start if start >= 0 else len(body)]
        # Only layout may sit between parameters; a stray (duplicated) close tag is a known
        # llama.cpp quirk (#24807) and is tolerated, any other text means we misread the call.
        if gap.replace(_PARAM_CLOSE, "").strip():
            return None
        if start < 0:
            return args
        gt = body.find(">", start + len(_PARAM_OPEN))
        if gt < 0:
            return None
        key = body[start + len(_PARAM_OPEN) : gt].strip()
        if not _valid_name(key):
            return None
        value_start = gt + 1
        close = body.find(_PARAM_CLOSE, value_start)
        following = body.find(_PARAM_OPEN, value_start)
        # A missing close tag is tolerated: the next parameter or the body end closes the value.
        ends = [i for i in (close, following) if i >= 0]
        value_end = min(ends) if ends else len(body)
        args[key] = _convert(body[value_start:value_end], props.get(key))
        pos = value_end + len(_PARAM_CLOSE) if value_end == close else value_end


def parse_qwen_xml(inner: str, schemas: Schemas, closed: bool) -> list[ParsedCall] | None:
    """Parses ``<function=name><parameter=k>v</parameter>...</function>`` (one or more).

    ``closed`` says ``</tool_call>`` ended the region; only then may ``</function>`` be
    missing. An unclosed region (generation ended) counts only if its last function closed.
    """
    calls: list[ParsedCall] = []
    pos = 0
    while True:
        while pos < len(inner) and inner[pos].isspace():
            pos += 1
        if pos == len(inner):
            return calls or None
        if not inner.startswith(_FUNC_OPEN, pos):
            return None
        gt = inner.find(">", pos + len(_FUNC_OPEN))
        if gt < 0:
            return None
        name = inner[pos + len(_FUNC_OPEN) : gt].strip()
        if not _valid_name(name) or (schemas is not None and name not in schemas):
            return None
        body_start = gt + 1
        close = inner.find(_FUNC_CLOSE, body_start)
        following = inner.find(_FUNC_OPEN, body_start)
        if close >= 0 and (following < 0 or close < following):
            body_end, pos = close, close + len(_FUNC_CLOSE)
        elif closed:
            body_end = pos = following if following >= 0 else len(inner)
        else:
            return None
        args = _parse_parameters(inner[body_start:body_end], _properties(schemas, name))
        if args is None:
            return None
        calls.append((name, _dumps(args)))


def parse_hermes(inner: str, schemas: Schemas, closed: bool) -> list[ParsedCall] | None:
    """Parses ``{"name": ..., "arguments": {...}}`` (``parameters`` also accepted)."""
    if not closed:
        return None
    try:
        obj = _loads(inner.strip())
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not _valid_name(name.strip()):
        return None
    name = name.strip()
    if schemas is not None and name not in schemas:
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if args is None:
        args = {}
    elif isinstance(args, str):
        # Some models double-encode: the arguments arrive as a JSON string holding the object.
        try:
            args = _loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return [(name, _dumps(args))]


_BARE_KEY = '"name"'


def bare_call_start(text: str) -> bool | None:
    """Whether ``text`` opens a Hermes call object written without ``<tool_call>`` tags.

    That is ``{ "name" :`` (any spacing), as llama.cpp's Hermes parser also accepts: weak
    models (Qwen2.5-Coder) often drop the tags. ``None`` means "too short to tell".
    """
    if not text:
        return None
    if text[0] != "{":
        return False
    i = 1
    while i < len(text) and text[i].isspace():
        i += 1
    seen = text[i : i + len(_BARE_KEY)]
    if not _BARE_KEY.startswith(seen):
        return False
    if len(seen) < len(_BARE_KEY):
        return None
    i += len(_BARE_KEY)
    while i < len(text) and text[i].isspace():
        i += 1
    if i == len(text):
        return None
    return text[i] == ":"


def parse_bare_hermes(text: str, schemas: Schemas) -> list[ParsedCall] | None:
    """Parses untagged call objects separated by whitespace; None unless all of it is calls."""
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    calls: list[ParsedCall] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return calls or None
        try:
            _, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return None
        found = parse_hermes(text[pos:end], schemas, True)
        if not found:
            return None
        calls.extend(found)
        pos = end
