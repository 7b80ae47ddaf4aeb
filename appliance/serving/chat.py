"""Chat completions: request -> prompt -> engine -> OpenAI response or stream chunks."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, Literal

import msgspec
from msgspec import UNSET

from appliance.api.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    FunctionCall,
    GenerationFields,
    PromptTokensDetails,
    ResponseMessage,
    ToolCall,
    ToolCallChunk,
    ToolCallFunctionChunk,
    Usage,
)
from appliance.engine.parsers import ParsedDelta
from appliance.engine.protocol import (
    Engine,
    Finish,
    GenerationRequest,
    ModelHandle,
    SamplingParams,
    TextDelta,
)
from appliance.engine.templates import ChatTemplate
from appliance.errors import ApplianceError, ContextLengthExceededError, OverloadedError
from appliance.metrics import Metrics, TokenTimer
from appliance.serving.prompts import OutputPlan, render_prompt
from appliance.store.keys import ApiKey, utcnow
from appliance.store.ledger import Ledger, Settlement, Ticket

__all__ = ["ChatService", "PreparedChat", "usage_of"]

_log = logging.getLogger(__name__)

FinishReasonOut = Literal["stop", "length", "tool_calls", "content_filter"]


class PreparedChat(msgspec.Struct, kw_only=True):
    """Everything checked and computed before generation starts."""

    id: str
    created: int
    model: ModelHandle
    include_usage: bool
    generation: GenerationRequest
    key: ApiKey | None
    started: str
    plan: OutputPlan
    ticket: Ticket | None = None
    reasoning_tokens: int = 0
    t0: float = 0.0
    submitted: bool = False  # handed to the engine (from then on, on_finish settles the hold)


class ChatService:
    """HTTP-free chat serving; routes call ``prepare`` then ``complete`` or ``stream``."""

    def __init__(
        self,
        engine: Engine,
        ledger: Ledger,
        *,
        default_max_tokens: int = 0,
        request_timeout: float = 0.0,
        metrics: Metrics | None = None,
    ):
        self.metrics = metrics
        self.engine = engine
        self.ledger = ledger
        self.default_max_tokens = default_max_tokens
        self.request_timeout = request_timeout
        self._templates: dict[str, ChatTemplate] = {}
        self._pending: set[asyncio.Task[Any]] = set()

    def _template(self, model: ModelHandle) -> ChatTemplate:
        template = self._templates.get(model.id)
        if template is None:
            template = ChatTemplate(
                model.chat_template, bos_token=model.bos_text, eos_token=model.eos_text
            )
            self._templates[model.id] = template
        return template

    async def prepare(self, request: ChatCompletionRequest, key: ApiKey | None) -> PreparedChat:
        t0 = time.monotonic()
        model_id = self.engine.resolve(request.model)
        model = await self.engine.get(model_id)
        rendered = render_prompt(request, self._template(model))
        prompt = await asyncio.to_thread(model.tokenize, rendered.text)
        return await self.admit(
            model,
            prompt,
            key,
            request=request,
            asked=request.max_completion_tokens or request.max_tokens,
            plan=rendered.plan,
            id_prefix="chatcmpl",
            t0=t0,
        )

    async def admit(
        self,
        model: ModelHandle,
        prompt: list[int],
        key: ApiKey | None,
        *,
        request: GenerationFields,
        asked: int | None,
        plan: OutputPlan,
        id_prefix: str,
        t0: float,
        param: str = "messages",
    ) -> PreparedChat:
        """Checks shared by chat and text completions: context fit, then credits and limits."""
        window = model.context_length
        if len(prompt) >= window:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {window} tokens, but the {param} "
                f"use {len(prompt)} tokens. Shorten the input to fit the context.",
                param=param,
            )
        room = window - len(prompt)
        asked = asked or self.default_max_tokens
        max_tokens = min(asked, room) if asked else room
        stop = request.stop
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        options = request.stream_options
        chat = PreparedChat(
            id=f"{id_prefix}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model,
            include_usage=options is not None and options.include_usage,
            generation=GenerationRequest(
                prompt=prompt,
                max_tokens=max_tokens,
                sampling=_sampling(request, plan.grammar),
                stop=stops,
                ignore_eos=request.ignore_eos,
                owner=key.prefix if key else "",
                deadline=time.monotonic() + self.request_timeout if self.request_timeout else 0.0,
            ),
            plan=plan,
            t0=t0,
            key=key,
            started=utcnow(),
        )
        if key is not None:
            # Admission: limits and credits are checked and held in one write transaction.
            chat.ticket = await self.ledger.reserve(key, model.id, len(prompt), max_tokens)
        return chat

    async def complete(self, chat: PreparedChat) -> ChatCompletion:
        parser = chat.plan.parser()
        timer = TokenTimer(self.metrics, chat.model.id, chat.t0)
        content: list[str] = []
        reasoning: list[str] = []
        finish: Finish | None = None
        async for event in self.events(chat):
            if isinstance(event, Finish):
                finish = event
                parsed = parser.finish()
            else:
                timer.tick(time.monotonic(), event.tokens)
                if parser.in_reasoning:
                    chat.reasoning_tokens += event.tokens
                parsed = parser.feed(event.text)
            content.append(parsed.content)
            reasoning.append(parsed.reasoning)
        assert finish is not None
        if finish.reason == "error":
            raise ApplianceError(f"Generation failed: {finish.message}")
        calls = [
            ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in parser.tool_calls
        ]
        text = "".join(content)
        thought = "".join(reasoning)
        message = ResponseMessage(
            content=text if text or not calls else None,
            role="assistant",
            reasoning_content=thought if thought else UNSET,
            tool_calls=calls if calls else UNSET,
        )
        return ChatCompletion(
            id=chat.id,
            created=chat.created,
            model=chat.model.id,
            choices=[Choice(index=0, message=message, finish_reason=_finish_reason(finish, calls))],
            usage=usage_of(finish, chat.reasoning_tokens),
        )

    async def stream(self, chat: PreparedChat) -> AsyncIterator[ChatCompletionChunk]:
        def chunk(
            delta: Delta, finish_reason: FinishReasonOut | None = None
        ) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=chat.id,
                created=chat.created,
                model=chat.model.id,
                choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)],
            )

        parser = chat.plan.parser()
        timer = TokenTimer(self.metrics, chat.model.id, chat.t0)
        yield chunk(Delta(role="assistant", content=""))
        async for event in self.events(chat):
            if isinstance(event, TextDelta):
                timer.tick(time.monotonic(), event.tokens)
                if parser.in_reasoning:
                    chat.reasoning_tokens += event.tokens
                for delta in _deltas(parser.feed(event.text)):
                    yield chunk(delta)
                continue
            if event.reason == "error":
                raise ApplianceError(f"Generation failed: {event.message}")
            for delta in _deltas(parser.finish()):
                yield chunk(delta)
            yield chunk(Delta(), _finish_reason(event, parser.tool_calls))
            if chat.include_usage:
                yield ChatCompletionChunk(
                    id=chat.id,
                    created=chat.created,
                    model=chat.model.id,
                    choices=[],
                    usage=usage_of(event, chat.reasoning_tokens),
                )

    async def events(self, chat: PreparedChat) -> AsyncIterator[TextDelta | Finish]:
        # on_finish fires with the final counts even when the client has gone, so a stream
        # cut by a disconnect is billed for exactly the tokens it generated.
        chat.submitted = True
        events = chat.model.generate(chat.generation, lambda finish: self._settle(chat, finish))
        try:
            async for event in events:
                yield event
        except OverloadedError:
            if chat.ticket is not None:  # never reached the engine: release the hold
                self._spawn(self.ledger.void(chat.ticket))
            raise

    async def release_unstarted(self, chat: PreparedChat) -> None:
        """Void the hold of a stream whose body never started (its client left first).

        A streaming response's generator only runs once the server starts sending. Litestar
        (with anyio) starts it even when the client is already gone, and on_finish then
        settles the cancelled job; this guard keeps the ledger exact without relying on that
        ordering: a body that never ran would otherwise leave its reservation pending
        (credits and a concurrency slot held) until the next restart. Runs after every
        streamed response; a no-op once the request reached the engine.
        """
        if chat.ticket is not None and not chat.submitted:
            chat.submitted = True
            self._spawn(self.ledger.void(chat.ticket))

    def _settle(self, chat: PreparedChat, finish: Finish) -> None:
        if self.metrics is not None:
            prefix = chat.key.prefix if chat.key else None
            self.metrics.usage(
                chat.model.id, prefix, finish.prompt_tokens, finish.completion_tokens
            )
        if chat.ticket is None:
            return
        usage = Settlement(
            status=finish.reason,
            prompt_tokens=finish.prompt_tokens,
            completion_tokens=finish.completion_tokens,
            reasoning_tokens=min(chat.reasoning_tokens, finish.completion_tokens),
            cached_tokens=finish.cached_tokens,
            started=chat.started,
        )
        self._spawn(self.ledger.settle(chat.ticket, usage))

    def _spawn(self, work: Coroutine[Any, Any, object]) -> None:
        # A separate task: a cancelled request scope must not cancel the bookkeeping.
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._bookkeeping_done)

    def _bookkeeping_done(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("could not record usage: %s", task.exception())

    async def close(self) -> None:
        """Wait for usage writes still in flight (shutdown must not lose them)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def _sampling(request: GenerationFields, grammar: str | None) -> SamplingParams:
    values: dict[str, Any] = {"grammar": grammar}
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


def usage_of(finish: Finish, reasoning_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finish.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=min(reasoning_tokens, finish.completion_tokens)
        ),
    )


def _finish_reason(finish: Finish, calls: Sequence[object]) -> FinishReasonOut:
    if finish.reason == "length":
        return "length"
    return "tool_calls" if calls else "stop"


def _deltas(parsed: ParsedDelta) -> list[Delta]:
    """Text first, then one chunk per tool-call piece (as OpenAI streams them)."""
    deltas = []
    if parsed.reasoning or parsed.content:
        delta = Delta()
        if parsed.reasoning:
            delta.reasoning_content = parsed.reasoning
        if parsed.content:
            delta.content = parsed.content
        deltas.append(delta)
    for c in parsed.tool_calls:
        if c.id is not None and c.name is not None:
            piece = ToolCallChunk(
                index=c.index,
                id=c.id,
                type="function",
                function=ToolCallFunctionChunk(name=c.name, arguments=c.arguments),
            )
        else:
            piece = ToolCallChunk(
                index=c.index, function=ToolCallFunctionChunk(arguments=c.arguments)
            )
        deltas.append(Delta(tool_calls=[piece]))
    return deltas
