"""Read a GGUF file's key/value header without loading the model.

Listing models (``/v1/models``, ``models list``) must not load weights, so this reads only
the header: magic, version, counts, then the metadata pairs. Arrays are skipped except for
their length (the vocabulary alone can hold 150k strings we do not need).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["GGUFError", "read_gguf_metadata"]

_MAGIC = b"GGUF"
# GGUF value types -> struct format (scalars only; 8 = string, 9 = array).
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# Keys whose (possibly huge) string value we keep; other long strings are truncated.
_KEEP_LONG = {"tokenizer.chat_template"}


class GGUFError(ValueError):
    """The file is not a GGUF file we can read."""


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFError("truncated GGUF header")
    return data


def _scalar(f: BinaryIO, kind: int) -> Any:
    fmt = _SCALARS[kind]
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO, keep: bool = True) -> str:
    (length,) = struct.unpack("<Q", _read(f, 8))
    if length > 64 * 1024 * 1024:
        raise GGUFError("implausible string length in GGUF header")
    if not keep:
        f.seek(length, 1)
        return ""
    return _read(f, length).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, key: str) -> Any:
    if kind in _SCALARS:
        return _scalar(f, kind)
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        (item_kind,) = struct.unpack("<I", _read(f, 4))
        (count,) = struct.unpack("<Q", _read(f, 8))
        if item_kind in _SCALARS:
            size = struct.calcsize(_SCALARS[item_kind])
            if count <= 16:  # small arrays (rope sections, per-layer counts) are worth keeping
                return [_scalar(f, item_kind) for _ in range(count)]
            f.seek(size * count, 1)
        elif item_kind == _STRING:
            for _ in range(count):
                _string(f, keep=False)
        else:
            raise GGUFError(f"unsupported nested array in GGUF key {key}")
        return {"array_length": count}
    raise GGUFError(f"unknown GGUF value type {kind} for key {key}")


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Return the metadata pairs of a GGUF file, plus ``gguf.tensor_count``."""
    with path.open("rb") as f:
        if _read(f, 4) != _MAGIC:
            raise GGUFError(f"{path.name} is not a GGUF file")
        (version,) = struct.unpack("<I", _read(f, 4))
        if version < 2:
            raise GGUFError(f"GGUF version {version} is too old")
        tensor_count, kv_count = struct.unpack("<QQ", _read(f, 16))
        meta: dict[str, Any] = {"gguf.version": version, "gguf.tensor_count": tensor_count}
        for _ in range(kv_count):
            key = _string(f)
            (kind,) = struct.unpack("<I", _read(f, 4))
            meta[key] = _value(f, kind, key)
    return meta
