"""The batching engine on real GGUFs: batched == solo, cache on == off, queue limits, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.engine.llama import LlamaEngine, LoadedModel
from appliance.engine.native import NativeModelConfig
from appliance.engine.protocol import Finish, GenerationRequest, SamplingParams, TextDelta
from appliance.engine.registry import ModelRegistry
from appliance.errors import OverloadedError
from tests.support.tiny_qwen35 import write_tiny_qwen35

logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
pytestmark = pytest.mark.anyio

GREEDY = SamplingParams(temperature=0)
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about tea.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nCount from one to ten.<|im_end|>\n<|im_start|>assistant\n",
]


async def _run(model: LoadedModel, prompt: list[int], n: int = 24) -> tuple[str, Finish]:
    text, finish = "", None
    request = GenerationRequest(prompt=prompt, max_tokens=n, sampling=GREEDY)
    async for event in model.generate(request):
        if isinstance(event, TextDelta):
            text += event.text
        else:
            finish = event
    assert finish is not None
    return text, finish


@pytest.fixture
async def smollm() -> AsyncIterator[LoadedModel]:
    engine = LlamaEngine(
        ModelRegistry(Path("/nonexistent")),
        NativeModelConfig(ctx_size=1024, parallel=4, threads=1),
        max_queue=2,
    )
    model = await engine.get(engine.resolve(""))
    yield model
    await engine.close()


@pytest.fixture
async def tiny_moe(tmp_path: Path) -> AsyncIterator[LoadedModel]:
    write_tiny_qwen35(tmp_path / "tiny-moe.gguf", moe=True)
    engine = LlamaEngine(
        ModelRegistry(tmp_path, include_embedded=False),
        NativeModelConfig(ctx_size=512, parallel=3, threads=1),
    )
    yield await engine.get("tiny-moe")
    await engine.close()


async def test_batched_greedy_equals_solo(smollm: LoadedModel) -> None:
    prompts = [smollm.tokenize(p) for p in PROMPTS]
    solo = [await _run(smollm, p) for p in prompts]
    batched = await asyncio.gather(*(_run(smollm, p) for p in prompts))
    assert [t for t, _ in batched] == [t for t, _ in solo]
    assert all(f.completion_tokens > 0 for _, f in batched)


async def test_tiny_qwen35moe_batched_equals_solo(tiny_moe: LoadedModel) -> None:
    prompts = [tiny_moe.tokenize(p) for p in PROMPTS[:3]]
    solo = [await _run(tiny_moe, p, 12) for p in prompts]
    batched = await asyncio.gather(*(_run(tiny_moe, p, 12) for p in prompts))
    assert [t for t, _ in batched] == [t for t, _ in solo]


async def test_prefix_cache_reuses_and_matches_cache_off(smollm: LoadedModel) -> None:
    first = smollm.tokenize(PROMPTS[0])
    text1, _ = await _run(smollm, first)
    follow = smollm.tokenize(
        PROMPTS[0] + text1 + "<|im_end|>\n<|im_start|>user\nAnd Spain?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    cached_text, cached = await _run(smollm, follow)
    assert cached.cached_tokens >= len(first) - 1
    for slot in smollm.scheduler.slots:  # cache off: wipe every slot, recompute from scratch
        smollm.native.seq_rm(slot.seq_id, -1, -1)
        slot.tokens.clear()
    fresh_text, fresh = await _run(smollm, follow)
    assert fresh.cached_tokens == 0
    assert fresh_text == cached_text


async def test_hybrid_model_checkpoint_reuse_matches_cache_off(tiny_moe: LoadedModel) -> None:
    assert tiny_moe.native.needs_checkpoints
    first = tiny_moe.tokenize(PROMPTS[1] + "<think>\n")
    await _run(tiny_moe, first, 8)
    # The next turn re-renders the end of the previous prompt: the common prefix stops
    # a few tokens before its end, where the recurrent state cannot simply be cut back.
    follow = first[:-3] + tiny_moe.tokenize("fine<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n")
    cached_text, cached = await _run(tiny_moe, follow, 8)
    assert cached.cached_tokens == len(first) - tiny_moe.scheduler.checkpoint_offset
    for slot in tiny_moe.scheduler.slots:
        tiny_moe.native.seq_rm(slot.seq_id, -1, -1)
        slot.tokens.clear()
        slot.checkpoints.clear()
    fresh_text, fresh = await _run(tiny_moe, follow, 8)
    assert fresh.cached_tokens == 0
    assert fresh_text == cached_text


async def test_queue_full_is_overloaded_with_retry_after(smollm: LoadedModel) -> None:
    prompt = smollm.tokenize(PROMPTS[2])
    running = [asyncio.create_task(_run(smollm, prompt, 40)) for _ in range(6)]  # 4 run, 2 wait
    await asyncio.sleep(0.3)
    with pytest.raises(OverloadedError) as caught:
        await _run(smollm, prompt, 4)
    assert caught.value.status_code == 503
    assert caught.value.headers()["Retry-After"]
    results = await asyncio.gather(*running)
    assert all(f.reason in ("stop", "length") for _, f in results)


async def test_cancel_mid_stream_frees_slot_and_bills_generated(smollm: LoadedModel) -> None:
    finished: list[Finish] = []
    request = GenerationRequest(prompt=smollm.tokenize(PROMPTS[3]), max_tokens=400, sampling=GREEDY)
    events = smollm.generate(request, finished.append)
    seen = 0
    async for event in events:
        if isinstance(event, TextDelta):
            seen += event.tokens
            if seen >= 3:
                break
    await events.aclose()  # what a client disconnect does
    for _ in range(100):
        if finished:
            break
        await asyncio.sleep(0.02)
    assert finished and finished[0].reason == "cancelled"
    assert 3 <= finished[0].completion_tokens < 400
    assert smollm.scheduler.idle


async def test_cancel_while_queued_never_reaches_engine(smollm: LoadedModel) -> None:
    prompt = smollm.tokenize(PROMPTS[0])
    busy = [asyncio.create_task(_run(smollm, prompt, 60)) for _ in range(4)]
    await asyncio.sleep(0.2)
    finished: list[Finish] = []
    queued = smollm.generate(
        GenerationRequest(prompt=prompt, max_tokens=10, sampling=GREEDY), finished.append
    )
    waiter = asyncio.create_task(queued.__anext__())
    await asyncio.sleep(0.1)
    waiter.cancel()  # the client goes away while its request waits for a slot
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    await asyncio.gather(*busy)
    for _ in range(50):
        if finished:
            break
        await asyncio.sleep(0.02)
    assert finished == [Finish(reason="cancelled", prompt_tokens=len(prompt), completion_tokens=0)]


async def test_many_concurrent_streams_all_complete(smollm: LoadedModel) -> None:
    prompts = [smollm.tokenize(p) for p in PROMPTS]
    engine_queue = smollm.scheduler.max_queue
    smollm.scheduler.max_queue = 16
    try:
        results = await asyncio.gather(*(_run(smollm, prompts[i % 4], 16) for i in range(12)))
    finally:
        smollm.scheduler.max_queue = engine_queue
    assert all(f.reason in ("stop", "length") and text for text, f in results)
