"""The greedy fast path picks exactly the token llama.cpp's greedy sampler chain would."""

from __future__ import annotations

import ctypes
import math
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import llama_cpp
import pytest

from appliance.engine import native as native_module
from appliance.engine.llama import LlamaEngine, LoadedModel
from appliance.engine.native import NativeModelConfig, Sampler
from appliance.engine.protocol import Finish, GenerationRequest, SamplingParams, TextDelta
from appliance.engine.registry import ModelRegistry

NAN = float("nan")
GREEDY: dict[str, Any] = dict(
    temperature=0.0,
    top_k=40,
    top_p=0.95,
    min_p=0.05,
    seed=None,
    repeat_penalty=1.0,
    frequency_penalty=0.0,
    presence_penalty=0.0,
    grammar=None,
)


def _reference(logits: list[float]) -> int:
    """llama_sampler_greedy_apply, transcribed."""
    selected = 0
    for i in range(1, len(logits)):
        if logits[i] > logits[selected]:
            selected = i
    return selected


@pytest.mark.parametrize(
    "logits",
    [
        [0.5, 2.0, -1.0, 2.0],  # a tie: the first maximum wins
        [3.0, 1.0, 3.0],
        [-5.0, -4.0, -4.5],
        [1.0, NAN, 5.0, NAN],  # NaNs are skipped ...
        [NAN, 1.0, 7.0],  # ... unless the first logit is one
        [2.0, NAN, NAN],
    ],
)
def test_fast_greedy_matches_llama_greedy(
    monkeypatch: pytest.MonkeyPatch, logits: list[float]
) -> None:
    row = (ctypes.c_float * len(logits))(*logits)
    pointer = ctypes.cast(row, ctypes.POINTER(ctypes.c_float))
    monkeypatch.setattr(native_module.llama_cpp, "llama_get_logits_ith", lambda ctx, i: pointer)
    fake: Any = SimpleNamespace(n_vocab=len(logits), ctx=None)
    sampler = Sampler(fake, **GREEDY)
    assert sampler.greedy and sampler.chain is None
    assert sampler.sample(fake, 0) == _reference(logits)
    assert not math.isnan(logits[0]) or sampler.sample(fake, 0) == 0


def test_penalties_or_grammar_keep_the_chain() -> None:
    fake: Any = SimpleNamespace(n_vocab=4, ctx=None)
    sampler = Sampler(fake, **{**GREEDY, "repeat_penalty": 1.1})
    try:
        assert not sampler.greedy and sampler.chain is not None
    finally:
        sampler.close()


@pytest.fixture
async def smollm() -> AsyncIterator[LoadedModel]:
    engine = LlamaEngine(
        ModelRegistry(Path("/nonexistent")),
        NativeModelConfig(ctx_size=512, parallel=2, threads=1),
    )
    yield await engine.get(engine.resolve(""))
    await engine.close()


async def _text(model: LoadedModel, prompt: list[int]) -> str:
    request = GenerationRequest(
        prompt=prompt, max_tokens=48, sampling=SamplingParams(temperature=0)
    )
    return "".join([e.text async for e in model.generate(request) if isinstance(e, TextDelta)])


@pytest.mark.anyio
async def test_fast_greedy_generates_what_the_greedy_chain_does(
    smollm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompt = smollm.tokenize(
        "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"
    )
    fast = await _text(smollm, prompt)
    original = Sampler.__init__

    def with_chain(self: Sampler, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self.chain is None:  # force llama.cpp's own greedy sampler
            self.chain = llama_cpp.llama_sampler_chain_init(
                llama_cpp.llama_sampler_chain_default_params()
            )
            llama_cpp.llama_sampler_chain_add(self.chain, llama_cpp.llama_sampler_init_greedy())

    monkeypatch.setattr(Sampler, "__init__", with_chain)
    smollm.scheduler.slots[0].tokens.clear()  # no prefix-cache shortcut either way
    assert await _text(smollm, prompt) == fast
    assert fast


@pytest.mark.anyio
async def test_penalised_request_completes(smollm: LoadedModel) -> None:
    """A penalties sampler used to raise TypeError in the scheduler thread (wrong arity)."""
    prompt = smollm.tokenize(
        "<|im_start|>user\nList some fruits.<|im_end|>\n<|im_start|>assistant\n"
    )
    sampling = SamplingParams(
        temperature=0, repeat_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5
    )
    request = GenerationRequest(prompt=prompt, max_tokens=16, sampling=sampling)
    events = [e async for e in smollm.generate(request)]
    final = events[-1]
    assert isinstance(final, Finish) and final.reason in ("stop", "length")
    assert final.completion_tokens > 0
    assert await _text(smollm, prompt)  # the engine still serves afterwards
