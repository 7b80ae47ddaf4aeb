"""Numbers for the Live page: engine state, tokens per second, memory, recent errors.

``LiveSampler`` turns each loaded model's ever-growing ``tokens_generated`` counter into a
rate by keeping a few seconds of (time, total) samples; ``ErrorLog`` is a small ring of
recent server errors plus counts of client errors, fed by ``record_exception`` (an
``after_exception`` hook, so every route's failures land there without touching them).
Both live on ``Services`` (one per app, no module state).
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from litestar.exceptions import HTTPException
from litestar.types import Scope

from appliance.engine.protocol import Engine
from appliance.errors import ApplianceError

__all__ = [
    "ErrorEntry",
    "ErrorLog",
    "LiveSampler",
    "LoadedStats",
    "loaded_stats",
    "process_memory",
    "record_exception",
    "uptime_text",
]

_WINDOW = 10.0


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    at: float
    """Unix time."""
    status: int
    method: str
    path: str
    message: str


@dataclass(slots=True)
class ErrorLog:
    """The last server errors (status >= 500) and counts of every error status since start."""

    recent: deque[ErrorEntry] = field(default_factory=lambda: deque(maxlen=50))
    counts: Counter[int] = field(default_factory=Counter)

    def record(self, status: int, method: str, path: str, message: str) -> None:
        self.counts[status] += 1
        if status >= 500:
            self.recent.appendleft(ErrorEntry(time.time(), status, method, path, message[:300]))

    @property
    def client_errors(self) -> int:
        return sum(n for status, n in self.counts.items() if 400 <= status < 500)

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.counts.items() if status >= 500)


def _status_of(exc: Exception) -> int:
    if isinstance(exc, ApplianceError | HTTPException):
        return int(exc.status_code)
    return 500


async def record_exception(exc: Exception, scope: Scope) -> None:
    """``after_exception`` hook: note every error response in the app's ErrorLog."""
    if getattr(exc, "not_an_error", False):  # e.g. the admin's sign-in redirect
        return
    services = getattr(scope["app"].state, "services", None)
    log = getattr(services, "errors", None)
    if not isinstance(log, ErrorLog):
        return
    status = _status_of(exc)
    message = getattr(exc, "message", None) or getattr(exc, "detail", None) or str(exc)
    if status >= 500 and not isinstance(exc, ApplianceError | HTTPException):
        message = f"{type(exc).__name__}: {exc}"
    log.record(status, str(scope.get("method", "")), str(scope.get("path", "")), str(message))


@dataclass(frozen=True, slots=True)
class LoadedStats:
    id: str
    running: int
    queued: int
    tokens_generated: int
    memory_bytes: int
    context_length: int
    slots: int
    tokens_per_second: float = 0.0


def loaded_stats(engine: Engine) -> list[LoadedStats]:
    """Per loaded model numbers (the real engine's schedulers; other engines: none)."""
    found = []
    for model in list(getattr(engine, "_loaded", {}).values()):
        stats = model.scheduler.stats
        native = getattr(model, "native", None)
        found.append(
            LoadedStats(
                id=model.id,
                running=stats.running,
                queued=stats.queued,
                tokens_generated=stats.tokens_generated,
                memory_bytes=int(getattr(native, "size_bytes", 0)),
                context_length=int(getattr(native, "n_ctx_seq", 0)),
                slots=len(getattr(model.scheduler, "slots", ())),
            )
        )
    return found


@dataclass(slots=True)
class LiveSampler:
    """tokens/s per model from deltas of ``tokens_generated`` over the last few seconds."""

    window: float = _WINDOW
    started: float = field(default_factory=time.time)
    _samples: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)

    def rates(self, totals: dict[str, int], now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        rates: dict[str, float] = {}
        for model_id in list(self._samples):
            if model_id not in totals:
                del self._samples[model_id]  # unloaded
        for model_id, total in totals.items():
            samples = self._samples.setdefault(model_id, deque(maxlen=256))
            if samples and total < samples[-1][1]:
                samples.clear()  # reloaded: the counter started over
            samples.append((now, total))
            while len(samples) > 2 and now - samples[1][0] >= self.window:
                samples.popleft()
            first = samples[0]
            elapsed = now - first[0]
            rates[model_id] = (total - first[1]) / elapsed if elapsed >= 0.5 else 0.0
        return rates

    def sample(self, engine: Engine) -> list[LoadedStats]:
        models = loaded_stats(engine)
        rates = self.rates({m.id: m.tokens_generated for m in models})
        return [
            LoadedStats(
                id=m.id,
                running=m.running,
                queued=m.queued,
                tokens_generated=m.tokens_generated,
                memory_bytes=m.memory_bytes,
                context_length=m.context_length,
                slots=m.slots,
                tokens_per_second=rates.get(m.id, 0.0),
            )
            for m in models
        ]


def process_memory() -> int:
    """Resident memory of this process in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def uptime_text(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"
