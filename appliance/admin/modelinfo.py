"""What the models page shows about a GGUF file without loading it.

``gguf_summary`` reads the header once (memory-mapped: key/value pairs, then the tensor
table) for the architecture, context length, quantisation (``general.file_type``) and the
parameter count (the sum of every tensor's element count, as llama.cpp reports it). The
result is cached per (path, size, mtime), so listing models stays cheap.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["FILE_TYPES", "GGUFSummary", "format_params", "gguf_summary"]

# llama.cpp's llama_ftype values (general.file_type) -> the usual quantisation names.
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
}

# Byte widths of the GGUF scalar value types (8 = string and 9 = array are variable).
_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_FORMAT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_FORMAT |= {10: "<Q", 11: "<q", 12: "<d"}
_WANTED = ("general.architecture", "general.file_type", "general.size_label", "general.name")


@dataclass(frozen=True, slots=True)
class GGUFSummary:
    architecture: str = ""
    quantisation: str = ""
    context_length: int = 0
    params: int = 0
    size_label: str = ""
    name: str = ""


class _Reader:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> int | float | bool:
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value  # type: ignore[no-any-return]

    def u32(self) -> int:
        return int(self.take("<I"))

    def u64(self) -> int:
        return int(self.take("<Q"))

    def string(self, keep: bool) -> str:
        length = self.u64()
        if self.pos + length > len(self.data):
            raise ValueError("truncated GGUF string")
        start, self.pos = self.pos, self.pos + length
        return self.data[start : self.pos].decode("utf-8", "replace") if keep else ""

    def value(self, kind: int, keep: bool) -> object:
        if kind in _FORMAT:
            return self.take(_FORMAT[kind])
        if kind == 8:
            return self.string(keep)
        if kind != 9:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = self.u32(), self.u64()
        if item in _WIDTH:
            self.pos += _WIDTH[item] * count
        else:
            for _ in range(count):
                self.value(item, keep=False)
        return None


def _parse(path: Path) -> GGUFSummary:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        r = _Reader(data)
        if data[:4] != b"GGUF":
            raise ValueError("not a GGUF file")
        r.pos = 4
        version = r.u32()
        if version < 2:
            raise ValueError("GGUF version too old")
        n_tensors, n_kv = r.u64(), r.u64()
        meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = r.string(keep=True)
            kind = r.u32()
            keep = key in _WANTED or key.endswith(".context_length")
            meta[key] = r.value(kind, keep=keep)
        params = 0
        for _ in range(n_tensors):
            r.string(keep=False)
            dims = [r.u64() for _ in range(r.u32())]
            r.pos += 4 + 8  # ggml type, data offset
            params += math.prod(dims)
    arch = str(meta.get("general.architecture") or "")
    file_type = meta.get("general.file_type")
    return GGUFSummary(
        architecture=arch,
        quantisation=FILE_TYPES.get(file_type, f"type {file_type}")
        if isinstance(file_type, int)
        else "",
        context_length=int(meta.get(f"{arch}.context_length") or 0),  # type: ignore[call-overload]
        params=params,
        size_label=str(meta.get("general.size_label") or ""),
        name=str(meta.get("general.name") or ""),
    )


@lru_cache(maxsize=256)
def _cached(path: str, size: int, mtime_ns: int) -> GGUFSummary:
    try:
        return _parse(Path(path))
    except (OSError, ValueError, struct.error):
        return GGUFSummary()


def gguf_summary(path: str | Path) -> GGUFSummary:
    """The header facts of a GGUF file; an empty summary when it cannot be read."""
    try:
        stat = Path(path).stat()
    except OSError:
        return GGUFSummary()
    return _cached(str(path), stat.st_size, stat.st_mtime_ns)


def format_params(n: int) -> str:
    """135_000_000 -> '135M', 7_241_732_096 -> '7.2B'."""
    if n <= 0:
        return ""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n)
