"""Chat completions: request -> prompt -> engine -> OpenAI response or stream chunks."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from appliance.api.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    PromptTokensDetails,
    ResponseMessage,
    Usage,
)
from appliance.engine.protocol import (
    Engine,
    Finish,
    GenerationRequest,
    ModelHandle,
    SamplingParams,
    TextDelta,
)
from appliance.engine.templates import ChatTemplate
from appliance.errors import ApplianceError, ContextLengthExceededError, InvalidRequestError
from appliance.store.keys import ApiKey, utcnow
from appliance.store.usage import UsageRecord, UsageStore

__all__ = ["ChatService", "PreparedChat"]

_log = logging.getLogger(__name__)

_FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


class PreparedChat(msgspec.Struct, kw_only=True):
    """Everything checked and computed before generation starts."""

    id: str
    created: int
    model: ModelHandle
    request: ChatCompletionRequest
    generation: GenerationRequest
    key: ApiKey | None
    started: str


def _text_of(message: ChatMessage) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text":
            raise InvalidRequestError(
                f"Content parts of type '{part.type}' are not supported by this model; "
                "send text parts only",
                param="messages",
            )
        parts.append(part.text or "")
    return "".join(parts)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> the plain dicts chat templates expect (content always a string)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        item["content"] = _text_of(m) or ""
        if m.name is not None:
            item["name"] = m.name
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.reasoning_content:
            item["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            item["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in m.tool_calls
            ]
        out.append(item)
    return out


class ChatService:
    """HTTP-free chat serving; routes call ``prepare`` then ``complete`` or ``stream``."""

    def __init__(self, engine: Engine, usage: UsageStore, *, default_max_tokens: int = 0):
        self.engine = engine
        self.usage = usage
        self.default_max_tokens = default_max_tokens
        self._templates: dict[str, ChatTemplate] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def _template(self, model: ModelHandle) -> ChatTemplate:
        template = self._templates.get(model.id)
        if template is None:
            template = ChatTemplate(
                model.chat_template, bos_token=model.bos_text, eos_token=model.eos_text
            )
            self._templates[model.id] = template
        return template

    async def prepare(self, request: ChatCompletionRequest, key: ApiKey | None) -> PreparedChat:
        model_id = self.engine.resolve(request.model)
        model = await self.engine.get(model_id)
        prompt_text = self._template(model).render(
            template_messages(request.messages),
            extra=request.chat_template_kwargs,
        )
        prompt = await asyncio.to_thread(model.tokenize, prompt_text)
        window = model.context_length
        if len(prompt) >= window:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {window} tokens, but the messages "
                f"use {len(prompt)} tokens. Shorten the conversation to fit the context.",
                param="messages",
            )
        room = window - len(prompt)
        asked = request.max_completion_tokens or request.max_tokens or self.default_max_tokens
        max_tokens = min(asked, room) if asked else room
        stop = request.stop
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return PreparedChat(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model,
            request=request,
            generation=GenerationRequest(
                prompt=prompt, max_tokens=max_tokens, sampling=_sampling(request), stop=stops
            ),
            key=key,
            started=utcnow(),
        )

    async def complete(self, chat: PreparedChat) -> ChatCompletion:
        parts: list[str] = []
        finish: Finish | None = None
        async for event in self._events(chat):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                finish = event
        assert finish is not None
        if finish.reason == "error":
            raise ApplianceError(f"Generation failed: {finish.message}")
        return ChatCompletion(
            id=chat.id,
            created=chat.created,
            model=chat.model.id,
            choices=[
                Choice(
                    index=0,
                    message=ResponseMessage(content="".join(parts), role="assistant"),
                    finish_reason=_FINISH_REASONS[finish.reason],  # type: ignore[arg-type]
                )
            ],
            usage=_usage(finish),
        )

    async def stream(self, chat: PreparedChat) -> AsyncIterator[ChatCompletionChunk]:
        def chunk(delta: Delta, finish_reason: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=chat.id,
                created=chat.created,
                model=chat.model.id,
                choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)],  # type: ignore[arg-type]
            )

        yield chunk(Delta(role="assistant", content=""))
        async for event in self._events(chat):
            if isinstance(event, TextDelta):
                if event.text:
                    yield chunk(Delta(content=event.text))
                continue
            if event.reason == "error":
                raise ApplianceError(f"Generation failed: {event.message}")
            yield chunk(Delta(), _FINISH_REASONS[event.reason])
            options = chat.request.stream_options
            if options is not None and options.include_usage:
                yield ChatCompletionChunk(
                    id=chat.id,
                    created=chat.created,
                    model=chat.model.id,
                    choices=[],
                    usage=_usage(event),
                )

    def _events(self, chat: PreparedChat) -> AsyncIterator[TextDelta | Finish]:
        # The engine calls back with the final counts even when the client has gone, so a
        # stream cut by a disconnect is billed for exactly the tokens it generated.
        return chat.model.generate(chat.generation, lambda finish: self._record(chat, finish))

    def _record(self, chat: PreparedChat, finish: Finish) -> None:
        record = UsageRecord(
            key_id=chat.key.id if chat.key else None,
            model=chat.model.id,
            status=finish.reason,
            prompt_tokens=finish.prompt_tokens,
            completion_tokens=finish.completion_tokens,
            cached_tokens=finish.cached_tokens,
            started=chat.started,
        )
        # A separate task: a cancelled request scope must not cancel the bookkeeping.
        task = asyncio.get_running_loop().create_task(self.usage.record(record))
        self._pending.add(task)
        task.add_done_callback(self._record_done)

    def _record_done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("could not record usage: %s", task.exception())

    async def close(self) -> None:
        """Wait for usage writes still in flight (shutdown must not lose them)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def _sampling(request: ChatCompletionRequest) -> SamplingParams:
    values: dict[str, Any] = {}
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repeat_penalty",
    ):
        value = getattr(request, name)
        if value is not None:
            values[name] = value
    return SamplingParams(**values)


def _usage(finish: Finish) -> Usage:
    return Usage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finish.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=0),
    )
