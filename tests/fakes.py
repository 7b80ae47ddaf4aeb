"""A scripted stand-in for the llama.cpp engine, implementing ``appliance.engine.protocol``.

``FakeModel`` "generates" a fixed list of text pieces (one token each), honours
``max_tokens`` and stop strings like the real scheduler, can sleep between tokens, and
records every request, every finish and every cancellation. ``FakeEngine`` owns a few of
them; its ``start()`` can be held back (``hold=True``) so /health can be seen loading.

Tokenization is one token per character of the rendered prompt, so prompt sizes are easy to
reason about in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.engine.protocol import (
    EngineStatus,
    Finish,
    FinishCallback,
    GenerationEvent,
    GenerationRequest,
    ModelInfo,
    TextDelta,
)
from appliance.engine.stops import StopBuffer
from appliance.errors import ModelNotFoundError

__all__ = ["DEFAULT_SCRIPT", "Cancellation", "FakeEngine", "FakeModel"]

DEFAULT_SCRIPT: tuple[str, ...] = ("Hello", ",", " world", "!", " How", " are", " you", "?")
"""What a FakeModel says unless told otherwise: "Hello, world! How are you?" (8 tokens)."""


@dataclass(frozen=True, slots=True)
class Cancellation:
    """A generation that ended because its consumer went away."""

    request: GenerationRequest
    completion_tokens: int


@dataclass(slots=True)
class FakeModel:
    """Implements ``ModelHandle`` with scripted output."""

    id: str = "fake-model"
    script: Sequence[str] = DEFAULT_SCRIPT
    endless: bool = False
    """Cycle the script forever (generation then only ends by max_tokens, stop or cancel)."""
    delay: float = 0.0
    """Seconds to sleep before each token."""
    context_length: int = 4096
    chat_template: str | None = None
    bos_text: str = ""
    eos_text: str = ""
    fail_with: str = ""
    """When set, every generation ends with ``Finish(reason="error", message=fail_with)``."""
    requests: list[GenerationRequest] = field(default_factory=list)
    finishes: list[Finish] = field(default_factory=list)
    cancellations: list[Cancellation] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    def tokenize(self, text: str) -> list[int]:
        self.prompts.append(text)
        return [ord(c) for c in text]

    def _pieces(self) -> Iterable[str]:
        return itertools.cycle(self.script) if self.endless else iter(self.script)

    async def generate(
        self, request: GenerationRequest, on_finish: FinishCallback | None = None
    ) -> AsyncIterator[GenerationEvent]:
        """Like ``LoadedModel.generate``: ``on_finish`` runs once, on the loop, after the
        consumer has handled the Finish event, or when it leaves early (then with reason
        ``cancelled`` and the tokens made so far)."""
        self.requests.append(request)
        stops = StopBuffer(request.stop)
        generated = 0
        finish: Finish | None = None
        delivered = False

        def done(reason: str, message: str = "") -> Finish:
            nonlocal finish
            finish = Finish(
                reason=reason,  # type: ignore[arg-type]
                prompt_tokens=len(request.prompt),
                completion_tokens=generated,
                message=message,
            )
            self.finishes.append(finish)
            return finish

        def deliver() -> None:
            nonlocal delivered
            if not delivered and finish is not None:
                delivered = True
                if on_finish is not None:
                    on_finish(finish)

        try:
            if self.fail_with:
                yield done("error", self.fail_with)
                deliver()
                return
            reason = "stop"
            for piece in self._pieces():
                if self.delay:
                    await asyncio.sleep(self.delay)
                generated += 1
                text = stops.push(piece)
                if text:
                    yield TextDelta(text=text, tokens=1)
                if stops.stopped:
                    break
                if generated >= request.max_tokens:
                    reason = "length"
                    break
            tail = stops.flush()
            if tail:
                yield TextDelta(text=tail, tokens=0)
            yield done(reason)
            deliver()
        finally:
            if finish is None:
                # The consumer left (aclose or cancellation) before the end: bill what was made.
                self.cancellations.append(Cancellation(request, generated))
                done("cancelled")
            deliver()


class FakeEngine:
    """Implements ``Engine`` over FakeModels; the first model is the default."""

    def __init__(
        self,
        models: Sequence[FakeModel] | None = None,
        *,
        hold: bool = False,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.handles: dict[str, FakeModel] = {m.id: m for m in (models or [FakeModel()])}
        self.aliases = dict(aliases or {})
        self.release = threading.Event()
        """``start()`` waits for this when ``hold`` is set (set it from any thread)."""
        if not hold:
            self.release.set()
        self.ready = False
        self.started = False
        self.closed = False
        self.gets: list[str] = []
        self.unloaded: list[str] = []
        self.model_options: dict[str, dict[str, Any]] = {}
        self.load_progress = 0.0
        """What status() reports for the default model while it "loads"."""
        self._created = int(time.time())

    @property
    def default(self) -> FakeModel:
        return next(iter(self.handles.values()))

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                id=m.id,
                path=f"/fake/{m.id}.gguf",
                size_bytes=1234,
                created=self._created,
                architecture="fake",
                context_length=m.context_length,
                loaded=self.ready,
            )
            for m in self.handles.values()
        ]

    def resolve(self, model: str) -> str:
        name = model.strip()
        if not name:
            return self.default.id
        name = self.aliases.get(name, name).lower()
        if name in self.handles:
            return name
        raise ModelNotFoundError(f"The model '{model}' does not exist", param="model")

    async def get(self, model_id: str) -> FakeModel:
        self.gets.append(model_id)
        try:
            return self.handles[model_id]
        except KeyError:
            raise ModelNotFoundError(
                f"The model '{model_id}' does not exist", param="model"
            ) from None

    def status(self) -> EngineStatus:
        return EngineStatus(
            ready=self.ready,
            loading=[] if self.ready else [self.default.id],
            loaded=list(self.handles) if self.ready else [],
            running=0,
            queued=0,
            load_progress={} if self.ready else {self.default.id: self.load_progress},
        )

    def configure(
        self,
        *,
        aliases: dict[str, str] | None = None,
        default_model: str | None = None,
        model_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if aliases is not None:
            self.aliases = dict(aliases)
        if default_model and default_model in self.handles:
            # The default model is the first one.
            first = self.handles.pop(default_model)
            self.handles = {first.id: first, **self.handles}
        self.model_options = dict(model_options or {})

    async def unload(self, model_id: str) -> bool:
        self.unloaded.append(model_id)
        return model_id in self.handles

    async def start(self) -> None:
        self.started = True
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        self.ready = True

    async def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.release.set()
