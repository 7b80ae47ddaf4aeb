"""Thin, typed wrappers over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Only the scheduler thread touches a context after loading; tokenization is read-only on the
vocabulary and safe from any thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from appliance.engine.gguf_meta import GGUFError, read_gguf_metadata
from appliance.engine.gpufit import ALL_LAYERS, gpu_devices, resolve_gpu_layers

__all__ = ["NativeModel", "NativeModelConfig", "Sampler"]

_log = logging.getLogger(__name__)

_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
# ggml_type ids of the KV cache types llama.cpp accepts.
_CACHE_TYPES = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "bf16": 30,
}


@dataclass(frozen=True, slots=True)
class NativeModelConfig:
    """How to load one model and size its context."""

    ctx_size: int = 0  # per sequence; 0 = training context capped at 8192
    parallel: int = 4
    batch_size: int = 512
    threads: int = 0
    n_gpu_layers: int = -1
    flash_attn: str = "auto"  # auto | on | off
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"


def _context_per_seq(config: NativeModelConfig, n_ctx_train: int) -> int:
    """Context per sequence: the configured size, else the training context capped at 8192,
    never more than the training context."""
    per_seq = config.ctx_size or min(n_ctx_train or 8192, 8192)
    return min(per_seq, n_ctx_train) if n_ctx_train else per_seq


def _gpu_layers(path: Path, config: NativeModelConfig) -> int:
    """``config.n_gpu_layers``, or for -1 the layers that fit the GPUs' free memory."""
    if config.n_gpu_layers >= 0:
        return config.n_gpu_layers
    devices = gpu_devices()
    if not devices:
        return ALL_LAYERS  # CPU build: nothing to fit, and no header to read for it
    try:
        meta = read_gguf_metadata(path)
    except (OSError, GGUFError):
        return ALL_LAYERS  # llama.cpp's own load reports what is wrong with the file
    n_ctx_train = meta.get(f"{meta.get('general.architecture', '')}.context_length", 0)
    per_seq = _context_per_seq(config, n_ctx_train if isinstance(n_ctx_train, int) else 0)
    parallel = max(1, config.parallel)
    return resolve_gpu_layers(
        config.n_gpu_layers,
        path,
        meta,
        ctx_total=per_seq * parallel,
        n_seq=parallel,
        cache_type_k=config.cache_type_k,
        cache_type_v=config.cache_type_v,
        devices=devices,
    )


def _meta(model: ctypes.c_void_p, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace")


class NativeModel:
    """A loaded llama.cpp model with one multi-sequence context."""

    def __init__(
        self,
        path: Path,
        config: NativeModelConfig,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = _gpu_layers(path, config)
        if on_progress is not None:
            # llama.cpp reports 0..1 while it reads the tensors; the ctypes callback must
            # stay referenced until the load returns.
            def report(progress: float, _user: ctypes.c_void_p) -> bool:
                on_progress(float(progress))
                return True

            callback = llama_cpp.llama_progress_callback(report)
            mparams.progress_callback = callback
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {path.name}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self.model))
        per_seq = _context_per_seq(config, self.n_ctx_train)
        parallel = max(1, config.parallel)
        threads = config.threads or (os.cpu_count() or 1)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = per_seq * parallel
        cparams.n_batch = config.batch_size
        cparams.n_ubatch = config.batch_size
        cparams.n_seq_max = parallel
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        # Separate KV streams per sequence: every slot is guaranteed its full context.
        cparams.kv_unified = False
        cparams.no_perf = True
        cparams.flash_attn_type = _FLASH_ATTN[config.flash_attn]
        cparams.type_k = _CACHE_TYPES[config.cache_type_k]
        cparams.type_v = _CACHE_TYPES[config.cache_type_v]
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise ValueError(f"llama.cpp could not create a context for {path.name}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_seq = parallel
        self.threads = threads
        self.n_batch = int(llama_cpp.llama_n_batch(self.ctx))
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(self.ctx))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.architecture = _meta(self.model, "general.architecture") or ""
        template = llama_cpp.llama_model_chat_template(self.model, None)
        self.chat_template = template.decode("utf-8", errors="replace") if template else None
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos_text = self._special_text(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_text = self._special_text(llama_cpp.llama_vocab_eos(self.vocab))
        self.size_bytes = int(llama_cpp.llama_model_size(self.model))
        self.n_params = int(llama_cpp.llama_model_n_params(self.model))
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        # Recurrent / hybrid models (Mamba, Qwen 3.5's linear attention) cannot truncate their
        # state to an arbitrary position: the scheduler keeps checkpoints for them.
        self.needs_checkpoints = bool(
            llama_cpp.llama_model_is_recurrent(self.model)
            or llama_cpp.llama_model_is_hybrid(self.model)
        )
        self._piece = ctypes.create_string_buffer(256)
        # Scheduler-thread caches: every generated token needs its bytes and its end-of-
        # generation flag, and both are fixed per vocabulary entry.
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, True)
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), buf, capacity, add_special, True
            )
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (not thread-safe: the scheduler thread only, or via special)."""
        buf = self._piece if not special else ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def token_piece(self, token: int) -> bytes:
        """``piece(token)``, cached (the scheduler thread only)."""
        data = self._pieces.get(token)
        if data is None:
            data = self._pieces[token] = self.piece(token)
        return data

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return eog

    def seq_rm(self, seq_id: int, p0: int, p1: int = -1) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self.memory, seq_id, p0, p1))

    def save_partial_state(self, seq_id: int) -> bytes:
        """The part of a sequence's state that cannot be rolled back (recurrent/SWA)."""
        flags = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        size = llama_cpp.llama_state_seq_get_size_ext(self.ctx, seq_id, flags)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data_ext(self.ctx, buf, size, seq_id, flags)
        # One memcpy. (``bytes(buf[:written])`` builds a list of Python ints first: ~2 s per
        # checkpoint for Qwen 3.5 35B-A3B's ~60 MB of recurrent state, measured on an H200.)
        return ctypes.string_at(buf, written)

    def restore_partial_state(self, seq_id: int, data: bytes) -> bool:
        flags = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return bool(llama_cpp.llama_state_seq_set_data_ext(self.ctx, buf, len(data), seq_id, flags))

    def decode(self) -> int:
        return int(llama_cpp.llama_decode(self.ctx, self.batch))

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None


class Sampler:
    """One sequence's llama.cpp sampler chain (penalties, grammar, truncation, temperature)."""

    def __init__(
        self,
        native: NativeModel,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        seed: int | None,
        repeat_penalty: float,
        frequency_penalty: float,
        presence_penalty: float,
        grammar: str | None,
    ) -> None:
        self.chain: llama_cpp.llama_sampler_p | None = None
        self.n_vocab = native.n_vocab
        penalties = repeat_penalty != 1.0 or frequency_penalty or presence_penalty
        # Plain greedy decoding (the common temperature-0 case) needs no sampler chain: the
        # chain would copy the whole logits row into a candidates array just to find its
        # maximum. numpy's argmax returns the first maximum, as llama.cpp's greedy sampler.
        self.greedy = temperature <= 0 and not penalties and not grammar
        if self.greedy:
            return
        self.chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        add = llama_cpp.llama_sampler_chain_add
        if penalties:
            add(
                self.chain,
                # This llama.cpp takes n_vocab first (without it every penalised request
                # raised TypeError in the scheduler thread and took the engine down).
                llama_cpp.llama_sampler_init_penalties(
                    native.n_vocab, 64, repeat_penalty, frequency_penalty, presence_penalty
                ),
            )
        if grammar:
            grammar_sampler = llama_cpp.llama_sampler_init_grammar(
                native.vocab, grammar.encode("utf-8"), b"root"
            )
            if not grammar_sampler:
                llama_cpp.llama_sampler_free(self.chain)
                raise ValueError("the grammar could not be parsed")
            add(self.chain, grammar_sampler)
        if temperature <= 0:
            add(self.chain, llama_cpp.llama_sampler_init_greedy())
            return
        if top_k > 0:
            add(self.chain, llama_cpp.llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            add(self.chain, llama_cpp.llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            add(self.chain, llama_cpp.llama_sampler_init_min_p(min_p, 1))
        add(self.chain, llama_cpp.llama_sampler_init_temp(temperature))
        add(self.chain, llama_cpp.llama_sampler_init_dist(0xFFFFFFFF if seed is None else seed))

    def sample(self, native: NativeModel, index: int) -> int:
        """Sample from the logits at batch position ``index`` and accept the token."""
        if self.chain is None:
            logits = llama_cpp.llama_get_logits_ith(native.ctx, index)
            if not logits:
                raise RuntimeError(f"no logits at batch position {index}")
            values = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
            token = int(values.argmax())
            if np.isnan(values[token]):
                # numpy stops at the first NaN; llama.cpp's comparison skips NaNs unless the
                # first logit is one. Broken logits still pick the same token.
                return 0 if np.isnan(values[0]) else int(np.nanargmax(values))
            return token
        return int(llama_cpp.llama_sampler_sample(self.chain, native.ctx, index))

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None
