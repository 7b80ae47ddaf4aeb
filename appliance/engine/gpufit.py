"""``n_gpu_layers = -1`` ("auto"): offload as many layers as the GPUs' free memory holds.

llama-cpp-python 0.3.36 exposes no fitting API (llama.cpp's ``--fit`` lives in its common
library, not in libllama), and asking llama.cpp for every layer on a card that is too small
fails the load. So, like Ollama, we estimate before loading: each repeating layer costs its
share of the file's weights plus its KV cache (attention layers) or recurrent state
(linear-attention layers) for the whole context, and we keep headroom for llama.cpp's
compute buffers and the output layer. An estimate errs on the safe side: a layer too few
costs some speed, a layer too many costs the load.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ALL_LAYERS",
    "GpuDevice",
    "LayerCost",
    "fit_gpu_layers",
    "gpu_devices",
    "layer_cost",
    "resolve_gpu_layers",
]

_log = logging.getLogger(__name__)

#: What llama.cpp takes as "every layer, the output layer included".
ALL_LAYERS = 999
#: ggml_backend_dev_type values of discrete and integrated GPUs (ggml-backend.h).
_GPU_TYPES = (1, 2)
_MIB = 1024 * 1024
#: Bytes per cache element of each KV cache type (quantised types incl. their block scales).
_CACHE_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
}


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """A ggml GPU device and the memory it reports free."""

    name: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class LayerCost:
    """Estimated device bytes of one repeating layer, and how many there are."""

    n_layer: int
    bytes_per_layer: int


def _meta_int(meta: dict[str, Any], key: str, default: int = 0) -> int:
    value = meta.get(key, default)
    return value if isinstance(value, int) else default


def layer_cost(
    meta: dict[str, Any],
    file_bytes: int,
    *,
    ctx_total: int,
    n_seq: int,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
) -> LayerCost | None:
    """Per-layer cost from GGUF metadata; None when the header lacks the layer count."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return None
    n_layer = _meta_int(meta, f"{arch}.block_count")
    if n_layer <= 0:
        return None
    n_embd = _meta_int(meta, f"{arch}.embedding_length")
    n_head = _meta_int(meta, f"{arch}.attention.head_count", 1) or 1
    n_head_kv = _meta_int(meta, f"{arch}.attention.head_count_kv", n_head) or n_head
    key_len = _meta_int(meta, f"{arch}.attention.key_length", n_embd // n_head)
    value_len = _meta_int(meta, f"{arch}.attention.value_length", n_embd // n_head)
    k_bytes = _CACHE_TYPE_BYTES.get(cache_type_k, 2.0)
    v_bytes = _CACHE_TYPE_BYTES.get(cache_type_v, 2.0)
    kv_per_layer = ctx_total * n_head_kv * (key_len * k_bytes + value_len * v_bytes)
    # Hybrid models (Qwen 3.5, Qwen3-Next) keep KV only in every interval-th layer; the
    # others hold a fixed-size recurrent state per sequence (gated delta net / Mamba).
    interval = _meta_int(meta, f"{arch}.full_attention_interval")
    state = _meta_int(meta, f"{arch}.ssm.state_size")
    inner = _meta_int(meta, f"{arch}.ssm.inner_size")
    if interval > 1 or (state and inner):
        attention_share = 1 / interval if interval > 1 else 0.0
        conv = _meta_int(meta, f"{arch}.ssm.conv_kernel", 4)
        groups = _meta_int(meta, f"{arch}.ssm.group_count", 1)
        recurrent = n_seq * 4 * (state * inner + (conv - 1) * (inner + 2 * groups * state))
        kv_per_layer = attention_share * kv_per_layer + (1 - attention_share) * recurrent
    weights_per_layer = file_bytes / n_layer  # the embeddings' share makes this conservative
    return LayerCost(n_layer=n_layer, bytes_per_layer=int(weights_per_layer + kv_per_layer))


def fit_gpu_layers(cost: LayerCost, free_bytes: int) -> int:
    """Layers that fit in ``free_bytes``; ALL_LAYERS when all of them do.

    Headroom: 10 % of the free memory plus 512 MiB for compute buffers, the output layer
    and the CUDA context's own allocations.
    """
    usable = free_bytes - free_bytes // 10 - 512 * _MIB
    if usable <= 0 or cost.bytes_per_layer <= 0:
        return 0
    layers = usable // cost.bytes_per_layer
    return ALL_LAYERS if layers >= cost.n_layer else int(layers)


def gpu_devices() -> list[GpuDevice]:
    """The GPUs ggml sees (none on a CPU-only build), with their free memory."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return []
    lib = llama_cpp.llama_cpp._lib  # resolves ggml's symbols through its dependencies
    vp, size_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)
    try:
        count, get, kind = (
            lib.ggml_backend_dev_count,
            lib.ggml_backend_dev_get,
            lib.ggml_backend_dev_type,
        )
        memory, name = lib.ggml_backend_dev_memory, lib.ggml_backend_dev_name
    except AttributeError:
        return []
    count.restype, count.argtypes = ctypes.c_size_t, []
    get.restype, get.argtypes = vp, [ctypes.c_size_t]
    kind.restype, kind.argtypes = ctypes.c_int, [vp]
    memory.restype, memory.argtypes = None, [vp, size_p, size_p]
    name.restype, name.argtypes = ctypes.c_char_p, [vp]
    devices = []
    for i in range(int(count())):
        device = get(i)
        if kind(device) not in _GPU_TYPES:
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        memory(device, ctypes.byref(free), ctypes.byref(total))
        label = (name(device) or b"GPU").decode(errors="replace")
        devices.append(GpuDevice(label, int(free.value), int(total.value)))
    return devices


def resolve_gpu_layers(
    requested: int,
    path: Path,
    meta: dict[str, Any],
    *,
    ctx_total: int,
    n_seq: int,
    cache_type_k: str,
    cache_type_v: str,
    devices: list[GpuDevice] | None = None,
) -> int:
    """The ``n_gpu_layers`` to load with: ``requested`` when set, else the fitted count."""
    if requested >= 0:
        return requested
    devices = gpu_devices() if devices is None else devices
    if not devices:
        return ALL_LAYERS  # CPU build: the value has no effect
    cost = layer_cost(
        meta,
        path.stat().st_size,
        ctx_total=ctx_total,
        n_seq=n_seq,
        cache_type_k=cache_type_k,
        cache_type_v=cache_type_v,
    )
    if cost is None:
        return ALL_LAYERS
    free = sum(d.free_bytes for d in devices)
    layers = fit_gpu_layers(cost, free)
    _log.info(
        "%s: offloading %s of %d layers (%.0f MiB each, %d MiB free on %s)",
        path.name,
        "all" if layers == ALL_LAYERS else layers,
        cost.n_layer,
        cost.bytes_per_layer / _MIB,
        free // _MIB,
        ", ".join(d.name for d in devices),
    )
    return layers
