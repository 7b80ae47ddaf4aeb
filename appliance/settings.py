"""Process settings: CLI flags, then ``APPLIANCE_*`` environment variables, then defaults.

Everything the owner changes while the box runs (aliases, default model, prices, key
limits) lives in SQLite instead; this Struct only holds what is fixed for one process.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

__all__ = ["ENV_PREFIX", "Settings", "load_settings"]

ENV_PREFIX = "APPLIANCE_"
CacheType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """One process's settings. Each field maps to ``--flag-name`` and ``APPLIANCE_FIELD_NAME``."""

    host: str = "127.0.0.1"
    """Address the HTTP server binds to; use 0.0.0.0 to share the box with the LAN."""

    port: int = 8000
    """TCP port of the HTTP server."""

    data_dir: Path = Path("data")
    """Directory for the SQLite database (``appliance.db``) and other state."""

    models_dir: Path = Path("models")
    """Directory scanned for ``*.gguf`` files; each becomes a model id (lower-case stem)."""

    default_model: str = ""
    """Model id (or alias) used when a request names none; empty = first GGUF, else embedded."""

    threads: int = 0
    """llama.cpp CPU threads per model; 0 = number of CPU cores."""

    ctx_size: int = 0
    """Context window per sequence in tokens; 0 = the model's training context, capped at 8192."""

    parallel: int = 4
    """Sequences decoded together per model (continuous batching slots)."""

    batch_size: int = 512
    """Most tokens one llama_decode call processes (prompt chunks plus decoding tokens)."""

    n_gpu_layers: int = -1
    """Layers offloaded to the GPU; -1 = auto: all that fit the GPUs' free memory (estimated
    from the GGUF header and context size before loading), 0 = CPU only. No effect on CPU
    builds."""

    max_body_bytes: int = 8 * 1024 * 1024
    """Largest accepted request body in bytes; larger bodies get a 413 error."""

    max_queue: int = 64
    """Requests allowed to wait for a free slot per model before new ones get a 503."""

    default_max_tokens: int = 0
    """Completion length cap when a request gives none; 0 = until the context is full."""

    request_timeout: float = 600.0
    """Seconds a generation may run before it ends with finish_reason 'length'; 0 = none."""

    max_loaded_models: int = 2
    """Models resident at once; loading another unloads the least recently used idle one."""

    memory_budget_mb: int = 0
    """Total size of resident model files in MB before idle models are unloaded; 0 = none."""

    model_idle_ttl: float = 900.0
    """Seconds after which an idle model (other than the default) is unloaded; 0 = never."""

    flash_attn: Literal["auto", "on", "off"] = "auto"
    """Flash attention: auto, on or off (per model overridable by the owner)."""

    cache_type_k: CacheType = "f16"
    """KV cache type for keys: f16, q8_0, q4_0, ... (smaller saves memory on long contexts)."""

    cache_type_v: CacheType = "f16"
    """KV cache type for values (quantised V needs flash attention)."""

    rpc_servers: str = ""
    """Comma-separated host:port of llama.cpp rpc-server workers sharing the layers; LAN only."""

    metrics_token: str = ""
    """Bearer token Prometheus must send to GET /metrics; empty = loopback clients only."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level for the server (debug, info, warning, error)."""


def _field_docs() -> dict[str, str]:
    """Map field name -> docstring, read from this module's source (used by the CLI's help)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Settings))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[node.target.id] = str(following.value.value)
    return docs


FIELD_DOCS = _field_docs()


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings: ``overrides`` (CLI flags) win over env vars, which win over defaults.

    Values from the environment are strings; msgspec converts them to each field's type and
    raises ``msgspec.ValidationError`` naming the field when one does not fit.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in Settings.__struct_fields__:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = raw
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    return msgspec.convert(values, Settings, strict=False, dec_hook=_decode_path)


def _decode_path(type_: type, value: Any) -> Any:
    # msgspec has no built-in Path support; paths arrive as strings from flags and env.
    if type_ is Path and isinstance(value, str | os.PathLike):
        return Path(value)
    raise NotImplementedError(f"cannot convert {value!r} to {type_}")
