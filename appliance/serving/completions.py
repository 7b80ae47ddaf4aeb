"""Text completions (``/v1/completions``) and embeddings, sharing chat's admission and billing."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import AsyncIterator
from typing import Literal, cast

from msgspec import UNSET

from appliance.api.protocol_text import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    input_items,
)
from appliance.engine.embeddings import InputTooLongError
from appliance.engine.protocol import EmbeddingHandle, Finish, ModelHandle, TextDelta
from appliance.errors import ApplianceError, ContextLengthExceededError, InvalidRequestError
from appliance.metrics import TokenTimer
from appliance.serving.chat import ChatService, PreparedChat, usage_of
from appliance.serving.prompts import OutputPlan
from appliance.store.keys import ApiKey, utcnow
from appliance.store.ledger import Settlement

__all__ = ["CompletionService"]


class CompletionService:
    """HTTP-free; reuses ChatService for admission, generation and settlement."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    async def prepare(self, request: CompletionRequest, key: ApiKey | None) -> PreparedChat:
        t0 = time.monotonic()
        engine = self.chat.engine
        model = await engine.get(engine.resolve(request.model))
        items = input_items(request.prompt, "prompt")
        if len(items) != 1:
            raise InvalidRequestError("Send one prompt per request", param="prompt")
        prompt = items[0]
        if isinstance(prompt, str):
            tokens = await asyncio.to_thread(model.tokenize, prompt)
        else:
            _check_token_ids(model, prompt, "prompt")
            tokens = prompt
        return await self.chat.admit(
            model,
            tokens,
            key,
            request=request,
            asked=request.max_tokens,
            plan=OutputPlan(),
            id_prefix="cmpl",
            t0=t0,
            param="prompt",
        )

    def echo_text(self, request: CompletionRequest, chat: PreparedChat) -> str:
        """What ``echo`` puts before the completion: the prompt as sent, or its token ids'
        text."""
        if isinstance(request.prompt, str):
            return request.prompt
        detokenize = getattr(chat.model, "detokenize", None)
        if detokenize is None:
            return ""
        return str(detokenize(chat.generation.prompt))

    def _response(self, chat: PreparedChat, text: str, finish: Finish | None) -> Completion:
        return Completion(
            id=chat.id,
            created=chat.created,
            model=chat.model.id,
            choices=[
                CompletionChoice(
                    text=text,
                    index=0,
                    finish_reason=None if finish is None else _reason(finish),
                )
            ],
            usage=UNSET if finish is None else usage_of(finish, 0),
        )

    async def complete(self, chat: PreparedChat, echo: str = "") -> Completion:
        parts = [echo]
        finish: Finish | None = None
        timer = TokenTimer(self.chat.metrics, chat.model.id, chat.t0)
        async for event in self.chat.events(chat):
            if isinstance(event, TextDelta):
                timer.tick(time.monotonic(), event.tokens)
                parts.append(event.text)
            else:
                finish = event
        assert finish is not None
        if finish.reason == "error":
            raise ApplianceError(f"Generation failed: {finish.message}")
        return self._response(chat, "".join(parts), finish)

    async def stream(self, chat: PreparedChat, echo: str = "") -> AsyncIterator[Completion]:
        if echo:
            yield self._response(chat, echo, None)
        timer = TokenTimer(self.chat.metrics, chat.model.id, chat.t0)
        async for event in self.chat.events(chat):
            if isinstance(event, TextDelta):
                timer.tick(time.monotonic(), event.tokens)
                if event.text:
                    yield self._response(chat, event.text, None)
                continue
            if event.reason == "error":
                raise ApplianceError(f"Generation failed: {event.message}")
            final = self._response(chat, "", event)
            final.usage = UNSET
            yield final
            if chat.include_usage:
                yield Completion(
                    id=chat.id,
                    created=chat.created,
                    model=chat.model.id,
                    choices=[],
                    usage=usage_of(event, 0),
                )

    async def embed(self, request: EmbeddingRequest, key: ApiKey | None) -> EmbeddingList:
        engine = self.chat.engine
        model = cast(EmbeddingHandle, await engine.get(engine.resolve(request.model)))
        items = input_items(request.input, "input")
        for item in items:
            if isinstance(item, list):
                _check_token_ids(model, item, "input")
        inputs = [
            await asyncio.to_thread(model.tokenize, item) if isinstance(item, str) else item
            for item in items
        ]
        for tokens in inputs:
            if len(tokens) > model.context_length:
                raise ContextLengthExceededError(
                    f"An input uses {len(tokens)} tokens; this model's context length is "
                    f"{model.context_length} tokens",
                    param="input",
                )
        total = sum(len(t) for t in inputs)
        ledger = self.chat.ledger
        ticket = await ledger.reserve(key, model.id, total, 0) if key is not None else None
        started = utcnow()
        try:
            vectors = await model.embed(inputs)
        except (ValueError, RuntimeError) as exc:
            if ticket is not None:
                await ledger.void(ticket)
            if isinstance(exc, InputTooLongError):
                # The embedding context can be smaller than the generation context.
                raise ContextLengthExceededError(str(exc), param="input") from exc
            raise InvalidRequestError(f"Could not embed the input: {exc}", param="input") from exc
        if ticket is not None:
            await ledger.settle(
                ticket,
                Settlement(
                    status="stop", prompt_tokens=total, completion_tokens=0, started=started
                ),
            )
        if self.chat.metrics is not None:
            self.chat.metrics.usage(model.id, key.prefix if key else None, total, 0)
        if request.dimensions is not None:
            vectors = [_shorten(v, request.dimensions) for v in vectors]
        data = [
            Embedding(index=i, embedding=_encode(v, request.encoding_format))
            for i, v in enumerate(vectors)
        ]
        return EmbeddingList(
            data=data,
            model=model.id,
            usage=EmbeddingUsage(prompt_tokens=total, total_tokens=total),
        )


def _check_token_ids(model: ModelHandle | EmbeddingHandle, tokens: list[int], param: str) -> None:
    """A 400 for ids outside the vocabulary: llama.cpp would fail the whole batch on them,
    taking down every other request decoding alongside."""
    n_vocab = int(getattr(model, "n_vocab", 0) or 0)
    if n_vocab and any(t >= n_vocab for t in tokens):
        raise InvalidRequestError(
            f"'{param}' contains a token id outside this model's vocabulary (0..{n_vocab - 1})",
            param=param,
        )


def _reason(finish: Finish) -> Literal["stop", "length"]:
    return "length" if finish.reason == "length" else "stop"


def _shorten(vector: list[float], dimensions: int) -> list[float]:
    """Matryoshka-style truncation, renormalised (what OpenAI's ``dimensions`` does)."""
    if dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = sum(v * v for v in head) ** 0.5 or 1.0
    return [v / norm for v in head]


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector
