"""Embeddings from any loaded GGUF: a second llama.cpp context in embedding mode.

The model's weights are shared with its generation context; only the small embedding
context is extra. Inputs run one at a time under a lock (embedding requests are short).
"""

from __future__ import annotations

import math
import threading

import llama_cpp

from appliance.engine.native import NativeModel

__all__ = ["Embedder", "InputTooLongError"]


class InputTooLongError(ValueError):
    """An input has more tokens than the embedding context holds."""


class Embedder:
    def __init__(self, native: NativeModel, *, ctx_size: int = 2048, threads: int = 1) -> None:
        self.native = native
        cparams = llama_cpp.llama_context_default_params()
        n_ctx = min(ctx_size, native.n_ctx_train or ctx_size)
        cparams.n_ctx = n_ctx
        # Non-causal pooling needs a whole input in one micro-batch.
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.embeddings = True
        # Generative models declare no pooling: mean pooling gives a usable sentence vector.
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(native.model, cparams)
        if not self.ctx:
            raise ValueError("llama.cpp could not create an embedding context")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = n_ctx
        self.n_embd = int(llama_cpp.llama_model_n_embd_out(native.model))
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self._lock = threading.Lock()

    def embed(self, tokens: list[int]) -> list[float]:
        """One L2-normalised vector for one tokenized input (call from a worker thread)."""
        if not tokens:
            raise ValueError("an input is empty")
        if len(tokens) > self.n_ctx:
            raise InputTooLongError(
                f"An input uses {len(tokens)} tokens; this model embeds at most {self.n_ctx} "
                "tokens at a time"
            )
        with self._lock:
            if self.memory:
                llama_cpp.llama_memory_clear(self.memory, True)
            batch = self.batch
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = len(tokens)
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} while embedding")
            pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, 0)
            if not pointer:
                raise RuntimeError("the model produced no pooled embedding")
            vector = [float(pointer[i]) for i in range(self.n_embd)]
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
