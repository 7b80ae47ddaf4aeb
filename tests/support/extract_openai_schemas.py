"""Regenerate ``tests/support/openai_schemas.json`` from the official OpenAI OpenAPI spec.

Run by hand (tests never run it, and never read ``shared/`` at run time)::

    .venv/bin/python tests/support/extract_openai_schemas.py [SPEC] [OUT]

``SPEC`` defaults to ``../shared/reference/openai-openapi.json`` next to the repository
root, ``OUT`` to ``openai_schemas.json`` beside this script.

The output keeps the spec's layout, ``{"components": {"schemas": {...}}}``, so every
``$ref: "#/components/schemas/X"`` inside the copied schemas resolves unchanged. It holds
the response schemas listed in ``ROOTS`` plus every schema they reference, transitively.
The schemas are copied verbatim (OpenAPI-isms such as ``nullable`` included);
``openai_schema.py`` adapts them when it compiles validators. A top-level
``x-source`` object records where the copy came from.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

ROOTS: Final[tuple[str, ...]] = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
)
"""The schemas the tests validate against; their dependencies come along."""

REF_PREFIX: Final = "#/components/schemas/"

_HERE: Final = Path(__file__).resolve().parent
DEFAULT_SPEC: Final = _HERE.parents[2] / "shared" / "reference" / "openai-openapi.json"
DEFAULT_OUT: Final = _HERE / "openai_schemas.json"


def _refs(node: Any) -> Iterator[str]:
    """Yield every ``$ref`` string found anywhere inside ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def collect(schemas: dict[str, Any], roots: tuple[str, ...] = ROOTS) -> dict[str, Any]:
    """Return ``roots`` and their transitive ``#/components/schemas`` dependencies.

    Raises ``ValueError`` on a reference that points outside ``components/schemas`` or
    to a schema the spec does not define, so a broken copy is never written.
    """
    picked: dict[str, Any] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in picked:
            continue
        if name not in schemas:
            raise ValueError(f"schema {name!r} is not in the spec's components/schemas")
        picked[name] = schemas[name]
        for ref in _refs(schemas[name]):
            if not ref.startswith(REF_PREFIX):
                raise ValueError(f"{name}: unsupported $ref {ref!r}")
            pending.append(ref.removeprefix(REF_PREFIX))
    return {name: picked[name] for name in sorted(picked)}


def extract(spec_path: Path) -> dict[str, Any]:
    """Build the components document for the schemas in ``ROOTS`` from ``spec_path``."""
    raw = spec_path.read_bytes()
    spec = json.loads(raw)
    info = spec.get("info", {})
    return {
        "x-source": {
            "file": spec_path.name,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "openapi": spec.get("openapi"),
            "title": info.get("title"),
            "version": info.get("version"),
            "roots": list(ROOTS),
            "generator": "tests/support/extract_openai_schemas.py",
        },
        "components": {"schemas": collect(spec["components"]["schemas"])},
    }


def main(argv: list[str]) -> int:
    """Command-line entry point: ``[SPEC] [OUT]``."""
    spec_path = Path(argv[0]) if argv else DEFAULT_SPEC
    out_path = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    doc = extract(spec_path)
    out_path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    names = doc["components"]["schemas"]
    print(f"wrote {len(names)} schemas to {out_path}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
