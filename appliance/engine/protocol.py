"""What serving code needs from an inference engine; the real one is ``LlamaEngine``.

Serving code depends only on these types, so HTTP-level tests can run against a stand-in
engine while e2e tests drive the real llama.cpp one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, Protocol

import msgspec

__all__ = [
    "EmbeddingHandle",
    "Engine",
    "EngineStatus",
    "Finish",
    "FinishCallback",
    "FinishReason",
    "GenerationEvent",
    "GenerationRequest",
    "ModelHandle",
    "ModelInfo",
    "SamplingParams",
    "TextDelta",
]

FinishReason = Literal["stop", "length", "cancelled", "error"]


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request sampling; each sequence in a batch gets its own sampler chain."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    grammar: str | None = None
    """A GBNF grammar (root rule ``root``) every sampled token must satisfy."""


class GenerationRequest(msgspec.Struct, kw_only=True):
    """One completion: a tokenized prompt and when to stop."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends before the first one and it never reaches the output."""
    owner: str = ""
    """Who asked (an API key's prefix): the queue is fair between owners."""
    deadline: float = 0.0
    """``time.monotonic()`` after which generation ends with ``length``; 0 = none."""
    ignore_eos: bool = False
    """Keep generating past end-of-generation tokens (they add no text)."""


class TextDelta(msgspec.Struct):
    """New output text; ``tokens`` counts the tokens that produced it (may be 0 while held back)."""

    text: str
    tokens: int


class Finish(msgspec.Struct, kw_only=True):
    """The last event of every generation."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    message: str = ""


GenerationEvent = TextDelta | Finish
FinishCallback = Callable[[Finish], None]


class ModelInfo(msgspec.Struct, kw_only=True):
    """A model the engine can serve, loaded or not."""

    id: str
    path: str
    size_bytes: int
    created: int
    architecture: str = ""
    context_length: int = 0
    """Context window per request in tokens (0 when not yet known)."""
    embedded: bool = False
    loaded: bool = False


class EngineStatus(msgspec.Struct, kw_only=True):
    """A snapshot for /health and the admin page."""

    ready: bool
    loading: list[str]
    loaded: list[str]
    running: int
    queued: int
    error: str = ""
    load_progress: dict[str, float] = msgspec.field(default_factory=dict)
    """Fraction (0..1) of each loading model's tensors read so far."""


class ModelHandle(Protocol):
    """A loaded model: tokenizer facts plus generation."""

    @property
    def id(self) -> str: ...

    @property
    def context_length(self) -> int: ...

    @property
    def chat_template(self) -> str | None: ...

    @property
    def bos_text(self) -> str: ...

    @property
    def eos_text(self) -> str: ...

    def tokenize(self, text: str) -> list[int]:
        """Tokenize a rendered prompt (special tokens parsed, BOS added when the model wants)."""
        ...

    def generate(
        self, request: GenerationRequest, on_finish: FinishCallback | None = None
    ) -> AsyncIterator[GenerationEvent]:
        """Stream events; closing the iterator early cancels the generation promptly.

        ``on_finish`` runs on the event loop exactly once with the final counts, even when
        the consumer has already gone (that is how disconnected streams get billed).
        """
        ...


class EmbeddingHandle(Protocol):
    """A loaded model that can also embed."""

    @property
    def id(self) -> str: ...

    @property
    def context_length(self) -> int: ...

    def tokenize(self, text: str) -> list[int]: ...

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]: ...


class Engine(Protocol):
    """Owns models; loads them on demand."""

    def models(self) -> list[ModelInfo]: ...

    def resolve(self, model: str) -> str:
        """Map a requested name (id, alias or empty) to a model id; raise ModelNotFoundError."""
        ...

    async def get(self, model_id: str) -> ModelHandle:
        """Return the loaded model, loading it first if needed."""
        ...

    def status(self) -> EngineStatus: ...

    async def unload(self, model_id: str) -> bool:
        """Free a loaded model (refused while it serves); False if it was not loaded."""
        ...

    def configure(
        self,
        *,
        aliases: dict[str, str] | None = None,
        default_model: str | None = None,
        model_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Apply the owner's aliases / default model (persisted in SQLite by the caller)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
