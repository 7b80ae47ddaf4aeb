"""``n_gpu_layers = -1`` fits the offloaded layers to the GPUs' free memory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from appliance.engine.gguf_meta import read_gguf_metadata
from appliance.engine.gpufit import (
    ALL_LAYERS,
    GpuDevice,
    LayerCost,
    fit_gpu_layers,
    gpu_devices,
    layer_cost,
    resolve_gpu_layers,
)
from appliance.engine.native import NativeModel, NativeModelConfig
from tests.support.models import smollm2_path
from tests.support.tiny_qwen35 import write_tiny_qwen35

GIB = 1024**3
MIB = 1024**2

#: Qwen 3.5 35B-A3B's header as its GGUF conversion writes it (the fields the fit reads).
QWEN35_A3B: dict[str, Any] = {
    "general.architecture": "qwen35moe",
    "qwen35moe.block_count": 40,
    "qwen35moe.context_length": 262144,
    "qwen35moe.embedding_length": 2048,
    "qwen35moe.attention.head_count": 16,
    "qwen35moe.attention.head_count_kv": 2,
    "qwen35moe.attention.key_length": 256,
    "qwen35moe.attention.value_length": 256,
    "qwen35moe.full_attention_interval": 4,
    "qwen35moe.ssm.conv_kernel": 4,
    "qwen35moe.ssm.state_size": 128,
    "qwen35moe.ssm.group_count": 16,
    "qwen35moe.ssm.inner_size": 4096,
}
A3B_Q4_K_M_BYTES = 21_200_000_000


def test_dense_model_cost_is_weights_share_plus_kv() -> None:
    meta = read_gguf_metadata(smollm2_path())
    size = smollm2_path().stat().st_size
    cost = layer_cost(meta, size, ctx_total=8 * 4096, n_seq=8)
    assert cost is not None
    assert cost.n_layer == meta["llama.block_count"] == 30
    # SmolLM2-135M: 3 KV heads of 64, f16 K and V -> 768 bytes per token per layer.
    kv = 8 * 4096 * 3 * (64 * 2 + 64 * 2)
    assert cost.bytes_per_layer == int(size / 30 + kv)
    q8 = layer_cost(
        meta, size, ctx_total=8 * 4096, n_seq=8, cache_type_k="q8_0", cache_type_v="q8_0"
    )
    assert q8 is not None and q8.bytes_per_layer < cost.bytes_per_layer


def test_hybrid_model_counts_kv_only_in_attention_layers() -> None:
    dense_like = {k: v for k, v in QWEN35_A3B.items() if ".ssm." not in k and "interval" not in k}
    hybrid = layer_cost(QWEN35_A3B, A3B_Q4_K_M_BYTES, ctx_total=4 * 8192, n_seq=4)
    dense = layer_cost(dense_like, A3B_Q4_K_M_BYTES, ctx_total=4 * 8192, n_seq=4)
    assert hybrid is not None and dense is not None
    assert hybrid.bytes_per_layer < dense.bytes_per_layer
    weights = A3B_Q4_K_M_BYTES / 40
    kv = 4 * 8192 * 2 * (256 * 2 + 256 * 2) / 4  # every 4th layer
    state = 0.75 * 4 * 4 * (128 * 4096 + 3 * (4096 + 2 * 16 * 128))
    assert hybrid.bytes_per_layer == int(weights + kv + state)


@pytest.mark.parametrize(
    ("free_gib", "expected"),
    [(80, ALL_LAYERS), (24, ALL_LAYERS), (16, range(20, 30)), (8, range(8, 14)), (0.5, [0])],
)
def test_qwen35_a3b_on_cards_of_several_sizes(free_gib: float, expected: Any) -> None:
    cost = layer_cost(QWEN35_A3B, A3B_Q4_K_M_BYTES, ctx_total=4 * 8192, n_seq=4)
    assert cost is not None
    layers = fit_gpu_layers(cost, int(free_gib * GIB))
    assert layers == expected if isinstance(expected, int) else layers in expected


def test_fit_keeps_headroom() -> None:
    cost = LayerCost(n_layer=10, bytes_per_layer=100 * MIB)
    # 1 GiB free: 10 % and 512 MiB stay free -> 409 MiB usable -> 4 layers.
    assert fit_gpu_layers(cost, GIB) == 4
    assert fit_gpu_layers(cost, 0) == 0
    assert fit_gpu_layers(LayerCost(n_layer=10, bytes_per_layer=0), GIB) == 0


def test_header_without_layer_count_is_not_fitted() -> None:
    assert layer_cost({}, 1, ctx_total=1, n_seq=1) is None
    assert layer_cost({"general.architecture": "x"}, 1, ctx_total=1, n_seq=1) is None


def test_resolve_respects_an_explicit_value_and_fits_auto(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = smollm2_path()
    meta = read_gguf_metadata(path)
    kwargs: dict[str, Any] = {
        "ctx_total": 8 * 4096,
        "n_seq": 8,
        "cache_type_k": "f16",
        "cache_type_v": "f16",
    }
    small = [GpuDevice("CUDA0", 600 * MIB, 8 * GIB)]
    assert resolve_gpu_layers(12, path, meta, devices=small, **kwargs) == 12
    assert resolve_gpu_layers(0, path, meta, devices=small, **kwargs) == 0
    # No GPU (a CPU build): the value has no effect, pass "all".
    assert resolve_gpu_layers(-1, path, meta, devices=[], **kwargs) == ALL_LAYERS
    big = [GpuDevice("CUDA0", 20 * GIB, 24 * GIB), GpuDevice("CUDA1", 4 * GIB, 8 * GIB)]
    with caplog.at_level(logging.INFO, logger="appliance.engine.gpufit"):
        assert resolve_gpu_layers(-1, path, meta, devices=big, **kwargs) == ALL_LAYERS
        partial = resolve_gpu_layers(-1, path, meta, devices=small, **kwargs)
    assert 0 < partial < 30
    assert f"offloading {partial} of 30 layers" in caplog.text
    assert "CUDA0, CUDA1" in caplog.text


def test_cpu_build_reports_no_gpu_and_auto_loads_and_serves(tmp_path: Path) -> None:
    """The real path on this (CPU-only) build: auto resolves, the model loads and decodes."""
    assert gpu_devices() == []
    path = write_tiny_qwen35(tmp_path / "tiny-qwen35moe.gguf")
    model = NativeModel(path, NativeModelConfig(ctx_size=256, parallel=2, threads=1))
    try:
        assert model.n_seq == 2
        tokens = model.tokenize("hello")
        batch = model.batch
        for i, token in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        assert model.decode() == 0
        # A checkpoint of the recurrent state is copied out whole and restores.
        state = model.save_partial_state(0)
        assert isinstance(state, bytes) and len(state) > 0
        assert model.restore_partial_state(0, state)
    finally:
        model.close()
