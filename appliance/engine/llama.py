"""The real engine: llama.cpp models loaded on demand, each behind a batch scheduler."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from appliance.engine.embeddings import Embedder
from appliance.engine.native import NativeModel, NativeModelConfig
from appliance.engine.protocol import (
    EngineStatus,
    Finish,
    FinishCallback,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
)
from appliance.engine.registry import ModelRegistry
from appliance.engine.scheduler import BatchScheduler, Job
from appliance.errors import ModelNotFoundError, OverloadedError

__all__ = ["LlamaEngine", "LoadedModel"]

_log = logging.getLogger(__name__)


class LoadedModel:
    """A model resident in memory; implements ``ModelHandle``."""

    def __init__(self, info: ModelInfo, native: NativeModel, scheduler: BatchScheduler) -> None:
        self.info = info
        self.native = native
        self.scheduler = scheduler
        self.last_used = time.monotonic()
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def context_length(self) -> int:
        return self.native.n_ctx_seq

    @property
    def chat_template(self) -> str | None:
        return self.native.chat_template

    @property
    def bos_text(self) -> str:
        return self.native.bos_text

    @property
    def eos_text(self) -> str:
        return self.native.eos_text

    def tokenize(self, text: str) -> list[int]:
        return self.native.tokenize(text, add_special=True)

    @property
    def n_vocab(self) -> int:
        return self.native.n_vocab

    def detokenize(self, tokens: list[int]) -> str:
        """Text of token ids, special tokens included (``special`` pieces are thread-safe)."""
        pieces = b"".join(self.native.piece(t, special=True) for t in tokens)
        return pieces.decode("utf-8", errors="replace")

    async def generate(
        self, request: GenerationRequest, on_finish: FinishCallback | None = None
    ) -> AsyncIterator[GenerationEvent]:
        job = Job(request, asyncio.get_running_loop(), on_finish)
        self.last_used = time.monotonic()
        self.scheduler.submit(job)
        try:
            while True:
                event = await job.events.get()
                yield event
                if isinstance(event, Finish):
                    job.deliver()  # the consumer has handled the final event
                    return
        finally:
            # Reached on normal end, on client disconnect (aclose) and on cancellation alike;
            # the scheduler drops the sequence at its next step and its Finish then reaches
            # on_finish with the tokens actually generated.
            job.consumer_gone = True
            job.cancel()
            job.deliver()

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Pooled, normalised embeddings (the embedding context is created on first use)."""
        self.last_used = time.monotonic()
        return await asyncio.to_thread(self._embed_sync, inputs)

    def _embed_sync(self, inputs: list[list[int]]) -> list[list[float]]:
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = Embedder(self.native, threads=self.native.threads)
        return [self._embedder.embed(tokens) for tokens in inputs]

    def close(self) -> None:
        self.scheduler.stop()
        if self._embedder is not None:
            self._embedder.close()
        self.native.close()


class LlamaEngine:
    """Implements ``Engine`` on llama.cpp."""

    def __init__(
        self,
        registry: ModelRegistry,
        config: NativeModelConfig,
        *,
        default_model: str = "",
        max_queue: int = 64,
        aliases: dict[str, str] | None = None,
        max_loaded: int = 2,
        memory_budget: int = 0,
        idle_ttl: float = 0.0,
    ) -> None:
        self.registry = registry
        self.config = config
        self.default_model = default_model
        self.max_queue = max_queue
        self.aliases = dict(aliases or {})
        self.max_loaded = max(1, max_loaded)
        self.memory_budget = memory_budget
        self.idle_ttl = idle_ttl
        self.model_options: dict[str, dict[str, Any]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        # Written by the loading thread (one float per model id), read by status().
        self._load_progress: dict[str, float] = {}
        self._ready = False
        self._error = ""

    # -- Engine protocol -------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        infos = self.registry.scan()
        for info in infos:
            loaded = self._loaded.get(info.id)
            if loaded is not None:
                info.loaded = True
                info.context_length = loaded.context_length
        return infos

    def default_id(self) -> str | None:
        return self.registry.default_id(self.aliases.get(self.default_model, self.default_model))

    def resolve(self, model: str) -> str:
        name = model.strip()
        if not name:
            default = self.default_id()
            if default is None:
                raise ModelNotFoundError("No model is installed", param="model")
            return default
        name = self.aliases.get(name, name)
        lowered = name.lower()
        for info in self.registry.scan():
            if info.id == lowered or Path(info.path).name.lower() == lowered:
                return info.id
        raise ModelNotFoundError(f"The model '{model}' does not exist", param="model")

    async def get(self, model_id: str) -> LoadedModel:
        loaded = self._loaded.get(model_id)
        if loaded is not None:
            return loaded
        pending = self._loading.get(model_id)
        if pending is None:
            info = self.registry.find(model_id)
            pending = asyncio.get_running_loop().create_future()
            self._loading[model_id] = pending
            try:
                await self._make_room(info)
                loaded = await asyncio.to_thread(self._load, info)
            except Exception as exc:
                pending.set_exception(exc)
                pending.exception()  # mark retrieved: other waiters re-raise it themselves
                raise OverloadedError(
                    f"Model '{model_id}' could not be loaded: {exc}", retry_after=30
                ) from exc
            finally:
                self._loading.pop(model_id, None)
                self._load_progress.pop(model_id, None)
            self._loaded[model_id] = loaded
            pending.set_result(loaded)
            return loaded
        try:
            return await asyncio.shield(pending)
        except Exception as exc:
            message = f"Model '{model_id}' could not be loaded"
            raise OverloadedError(message, retry_after=30) from exc

    def status(self) -> EngineStatus:
        running = sum(m.scheduler.stats.running for m in self._loaded.values())
        queued = sum(m.scheduler.stats.queued for m in self._loaded.values())
        return EngineStatus(
            ready=self._ready,
            loading=sorted(self._loading),
            loaded=sorted(self._loaded),
            running=running,
            queued=queued,
            error=self._error,
            load_progress=dict(self._load_progress),  # entries live exactly while loading
        )

    async def _make_room(self, incoming: ModelInfo) -> None:
        """Unload idle models (least recently used first) until ``incoming`` fits.

        A model that is serving or has queued requests is never evicted; when nothing can
        be evicted the request gets a 503 instead of an out-of-memory crash.
        """

        def over() -> bool:
            if len(self._loaded) + 1 > self.max_loaded:
                return True
            if not self.memory_budget:
                return False
            used = sum(m.native.size_bytes for m in self._loaded.values())
            return used + incoming.size_bytes > self.memory_budget

        while over():
            idle = [m for m in self._loaded.values() if m.scheduler.idle]
            if not idle:
                raise OverloadedError(
                    f"Not enough memory to load '{incoming.id}' while other models are serving",
                    retry_after=10,
                )
            victim = min(idle, key=lambda m: m.last_used)
            _log.info("unloading %s to make room for %s", victim.id, incoming.id)
            await self.unload(victim.id)

    async def _reap_idle(self) -> None:
        """Unload models (other than the default) idle for longer than ``idle_ttl``."""
        while True:
            await asyncio.sleep(min(15.0, max(1.0, self.idle_ttl / 4)))
            default = self.default_id()
            now = time.monotonic()
            for model in list(self._loaded.values()):
                if (
                    model.id != default
                    and model.scheduler.idle
                    and now - model.last_used > self.idle_ttl
                ):
                    _log.info("unloading %s after %.0f s idle", model.id, now - model.last_used)
                    await self.unload(model.id)

    async def start(self) -> None:
        """Load the default model; /health turns 200 once it can serve."""
        if self.idle_ttl > 0 and self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle())
        default = self.default_id()
        if default is None:
            self._error = "no model installed"
            return
        try:
            await self.get(default)
        except Exception as exc:  # the server still starts so the owner can fix it
            self._error = str(exc)
            _log.error("could not load the default model %s: %s", default, exc)
            return
        self._ready = True

    async def unload(self, model_id: str) -> bool:
        """Free a loaded model; refuses (OverloadedError) while it is serving requests."""
        loaded = self._loaded.get(model_id)
        if loaded is None:
            return False
        if not loaded.scheduler.idle:
            raise OverloadedError(f"Model '{model_id}' is serving requests", retry_after=5)
        del self._loaded[model_id]
        await asyncio.to_thread(loaded.close)
        return True

    def configure(
        self,
        *,
        aliases: dict[str, str] | None = None,
        default_model: str | None = None,
        model_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Apply the owner's runtime choices (kept in SQLite by the caller)."""
        if aliases is not None:
            self.aliases = dict(aliases)
        if default_model is not None:
            self.default_model = default_model
        if model_options is not None:
            self.model_options = {k: dict(v) for k, v in model_options.items()}

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        models, self._loaded = list(self._loaded.values()), {}
        for model in models:
            await asyncio.to_thread(model.close)

    # -- internals -------------------------------------------------------------------------
    def _config_for(self, model_id: str) -> NativeModelConfig:
        """Process defaults overridden by the owner's per-model options (GPU layers, KV type)."""
        options = {
            k: v
            for k, v in self.model_options.get(model_id, {}).items()
            if k in NativeModelConfig.__dataclass_fields__
        }
        return dataclasses.replace(self.config, **options)

    def _load(self, info: ModelInfo) -> LoadedModel:
        _log.info("loading model %s from %s", info.id, info.path)
        started = time.monotonic()
        logged = 0.0

        def progress(fraction: float) -> None:
            nonlocal logged
            self._load_progress[info.id] = fraction
            # Long loads (big files, slow disks) say how far they are, a line per quarter.
            if fraction >= logged + 0.25 and time.monotonic() - started > 1.0:
                logged = fraction - fraction % 0.25
                _log.info("loading model %s: %d %%", info.id, int(fraction * 100))

        native = NativeModel(Path(info.path), self._config_for(info.id), on_progress=progress)
        _log.info("loaded model %s in %.1f s", info.id, time.monotonic() - started)
        scheduler = BatchScheduler(native, max_queue=self.max_queue, name=info.id)
        info.loaded = True
        info.context_length = native.n_ctx_seq
        info.architecture = native.architecture or info.architecture
        return LoadedModel(info, native, scheduler)
