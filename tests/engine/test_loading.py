"""Model loading reports its progress: llama.cpp's callback -> engine status -> /health."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.engine.llama import LlamaEngine
from appliance.engine.native import NativeModel, NativeModelConfig
from appliance.engine.registry import ModelRegistry
from tests.support.models import smollm2_path

pytestmark = pytest.mark.anyio


def test_native_load_reports_fractions_up_to_one() -> None:
    seen: list[float] = []
    model = NativeModel(
        smollm2_path(), NativeModelConfig(ctx_size=256, parallel=1, threads=1), seen.append
    )
    model.close()
    assert seen, "llama.cpp never called the progress callback"
    assert seen == sorted(seen)
    assert seen[-1] == pytest.approx(1.0)
    assert all(0.0 <= f <= 1.0 for f in seen)


async def test_engine_status_shows_progress_while_loading_and_clears_it() -> None:
    engine = LlamaEngine(
        ModelRegistry(Path("/nonexistent")),
        NativeModelConfig(ctx_size=256, parallel=1, threads=1),
    )
    model_id = engine.resolve("")
    load = asyncio.create_task(engine.get(model_id))
    observed: list[float] = []
    while not load.done():
        status = engine.status()
        if model_id in status.load_progress:
            assert status.loading == [model_id]
            observed.append(status.load_progress[model_id])
        await asyncio.sleep(0.001)
    await load
    try:
        assert observed, "no progress seen while the model loaded"
        assert observed == sorted(observed)
        after = engine.status()
        assert after.loading == [] and after.load_progress == {}
        assert after.loaded == [model_id]
    finally:
        await engine.close()
