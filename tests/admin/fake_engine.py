"""An engine for the admin tests: real model files, scripted generation.

Models come from a real ``ModelRegistry`` over the test's models directory (no embedded
model), so listing, pulling and deleting files behave as in production. ``get`` "loads" a
model by giving it a ``FakeModel`` (scripted text, from ``tests.fakes``) plus the scheduler
stats and native facts the Live page reads, and ``unload`` / ``configure`` behave like
``LlamaEngine``'s.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.engine.protocol import EngineStatus, ModelInfo
from appliance.engine.registry import ModelRegistry
from appliance.engine.scheduler import SchedulerStats
from appliance.errors import ModelNotFoundError, OverloadedError
from tests.fakes import FakeModel

__all__ = ["AdminFakeEngine"]


@dataclass
class _Scheduler:
    stats: SchedulerStats = field(default_factory=SchedulerStats)
    slots: list[int] = field(default_factory=lambda: [0, 1])

    @property
    def idle(self) -> bool:
        return self.stats.running == 0 and self.stats.queued == 0


@dataclass
class _Native:
    size_bytes: int
    n_ctx_seq: int = 1024


@dataclass
class _Loaded:
    id: str
    handle: FakeModel
    scheduler: _Scheduler
    native: _Native


class AdminFakeEngine:
    """Implements ``appliance.engine.protocol.Engine`` over files in ``models_dir``."""

    def __init__(self, models_dir: Path) -> None:
        self.registry = ModelRegistry(models_dir, include_embedded=False)
        self.aliases: dict[str, str] = {}
        self.default_model = ""
        self.model_options: dict[str, dict[str, Any]] = {}
        self._loaded: dict[str, _Loaded] = {}
        self.ready = False
        self.closed = False
        self.load_delay = 0.0
        self.loading: dict[str, float] = {}
        """Models shown as loading, with their progress (what LlamaEngine reports)."""

    def models(self) -> list[ModelInfo]:
        infos = self.registry.scan()
        for info in infos:
            loaded = self._loaded.get(info.id)
            if loaded is not None:
                info.loaded = True
                info.context_length = loaded.native.n_ctx_seq
        return infos

    def resolve(self, model: str) -> str:
        name = model.strip()
        if not name:
            default = self.registry.default_id(
                self.aliases.get(self.default_model, self.default_model)
            )
            if default is None:
                raise ModelNotFoundError("No model is installed", param="model")
            return default
        name = self.aliases.get(name, name).lower()
        for info in self.registry.scan():
            if info.id == name:
                return info.id
        raise ModelNotFoundError(f"The model '{model}' does not exist", param="model")

    async def get(self, model_id: str) -> FakeModel:
        loaded = self._loaded.get(model_id)
        if loaded is None:
            info = self.registry.find(model_id)
            if self.load_delay:
                await asyncio.sleep(self.load_delay)
            loaded = _Loaded(
                id=info.id,
                handle=FakeModel(id=info.id, context_length=1024),
                scheduler=_Scheduler(),
                native=_Native(size_bytes=info.size_bytes),
            )
            self._loaded[model_id] = loaded
        return loaded.handle

    def status(self) -> EngineStatus:
        stats = [m.scheduler.stats for m in self._loaded.values()]
        return EngineStatus(
            ready=self.ready,
            loading=sorted(self.loading),
            loaded=sorted(self._loaded),
            running=sum(s.running for s in stats),
            queued=sum(s.queued for s in stats),
            load_progress=dict(self.loading),
        )

    async def unload(self, model_id: str) -> bool:
        loaded = self._loaded.get(model_id)
        if loaded is None:
            return False
        if not loaded.scheduler.idle:
            raise OverloadedError(f"Model '{model_id}' is serving requests", retry_after=5)
        del self._loaded[model_id]
        return True

    def configure(
        self,
        *,
        aliases: dict[str, str] | None = None,
        default_model: str | None = None,
        model_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if aliases is not None:
            self.aliases = dict(aliases)
        if default_model is not None:
            self.default_model = default_model
        if model_options is not None:
            self.model_options = dict(model_options)

    async def start(self) -> None:
        self.ready = True

    async def close(self) -> None:
        self.closed = True
