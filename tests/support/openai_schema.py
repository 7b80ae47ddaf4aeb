"""Validate JSON bodies against the official OpenAI response schemas.

The schemas live in ``openai_schemas.json`` beside this module, a verbatim copy of
the relevant ``components/schemas`` of the OpenAI OpenAPI spec made by
``extract_openai_schemas.py``. They are compiled with ``jsonschema``'s Draft 2020-12
validator, the components document registered as one ``referencing`` resource so the
spec's own ``#/components/schemas/NAME`` references resolve unchanged.

OpenAPI keywords that JSON Schema does not know are adapted as follows:

* ``nullable: true`` (OpenAPI 3.0 style, still used by a few properties of
  ``CreateChatCompletionStreamResponse``: ``usage``, ``choices[].finish_reason``,
  ``choices[].logprobs`` and its ``content`` / ``refusal``) is rewritten to
  ``anyOf: [<the schema without nullable>, {"type": "null"}]``. That also covers
  ``enum`` lists without ``null`` and ``$ref`` siblings. ``nullable: false`` is dropped.
* ``discriminator``, ``example`` and ``x-*`` extension keys are annotations that the
  validator ignores; the ``oneOf`` branches they decorate are already disjoint.

``format`` is not asserted (no format checker is passed), as in the spec's intent of
``format: unixtime`` / ``float`` being descriptive only.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, Final

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match, relevance
from referencing import Registry
from referencing.jsonschema import DRAFT202012

__all__ = ["SCHEMAS_PATH", "components", "schema_names", "validate"]

SCHEMAS_PATH: Final = Path(__file__).with_name("openai_schemas.json")
"""The extracted components document."""

_BASE_URI: Final = "urn:appliance-tests:openai-components"
_REF_PREFIX: Final = "#/components/schemas/"
_MAX_LISTED_ERRORS: Final = 10
_MAX_MESSAGE_CHARS: Final = 300

# Keywords whose values are data, not subschemas: never rewritten.
_DATA_KEYWORDS: Final = frozenset(
    {"enum", "const", "default", "example", "examples", "required", "discriminator"}
)


def _adapt(node: Any) -> Any:
    """Return ``node`` with OpenAPI ``nullable`` rewritten into JSON Schema (see module doc)."""
    if isinstance(node, list):
        return [_adapt(item) for item in node]
    if not isinstance(node, dict):
        return node
    adapted: dict[str, Any] = {}
    for key, value in node.items():
        if key == "nullable" and isinstance(value, bool):
            continue
        if key in _DATA_KEYWORDS or key.startswith("x-"):
            adapted[key] = value
        else:
            adapted[key] = _adapt(value)
    if node.get("nullable") is True:
        return {"anyOf": [adapted, {"type": "null"}]}
    return adapted


@cache
def components() -> dict[str, Any]:
    """The components document with ``nullable`` adapted (loaded once)."""
    raw: dict[str, Any] = json.loads(SCHEMAS_PATH.read_text(encoding="utf-8"))
    return {"components": {"schemas": _adapt(raw["components"]["schemas"])}}


def schema_names() -> list[str]:
    """Every schema name available to :func:`validate`, sorted."""
    return sorted(components()["components"]["schemas"])


@cache
def _registry() -> Registry[Any]:
    """A registry holding the components document under a private base URI."""
    resource = DRAFT202012.create_resource(components())
    registry: Registry[Any] = Registry().with_resource(_BASE_URI, resource)
    return registry


@cache
def _validator(schema_name: str) -> Draft202012Validator:
    """The compiled validator for ``#/components/schemas/<schema_name>``."""
    if schema_name not in components()["components"]["schemas"]:
        raise ValueError(
            f"unknown OpenAI schema {schema_name!r}; known: {', '.join(schema_names())}"
        )
    return Draft202012Validator(
        {"$ref": f"{_BASE_URI}{_REF_PREFIX}{schema_name}"}, registry=_registry()
    )


def _short(message: str) -> str:
    """Clip a jsonschema message (they can embed the whole offending instance)."""
    if len(message) <= _MAX_MESSAGE_CHARS:
        return message
    return message[: _MAX_MESSAGE_CHARS - 3] + "..."


def _describe(error: ValidationError) -> str:
    """One line: the JSON path of the failing value and jsonschema's message."""
    return f"{error.json_path}: {_short(error.message)}"


def validate(obj: object, schema_name: str) -> None:
    """Assert that ``obj`` conforms to the OpenAI component schema ``schema_name``.

    Raises ``AssertionError`` naming the most relevant failure (its JSON path, the
    message, and the schema path that rejected it) followed by every top-level failure.
    Raises ``ValueError`` for a schema name that is not in the extracted set.
    """
    validator = _validator(schema_name)
    errors = sorted(validator.iter_errors(obj), key=relevance)
    if not errors:
        return
    best = best_match(errors)
    assert best is not None
    schema_path = "/".join(str(part) for part in best.absolute_schema_path)
    lines = [
        f"object does not conform to OpenAI schema {schema_name!r}: {_describe(best)}",
        f"  (schema path: {schema_path})",
        f"  {len(errors)} top-level error(s):",
    ]
    lines += [f"  - {_describe(error)}" for error in errors[:_MAX_LISTED_ERRORS]]
    if len(errors) > _MAX_LISTED_ERRORS:
        lines.append(f"  - ... and {len(errors) - _MAX_LISTED_ERRORS} more")
    raise AssertionError("\n".join(lines))
