"""POST /v1/chat/completions: translate HTTP to ChatService calls and back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from appliance.api.deps import authenticate, decode_body, services
from appliance.api.protocol import ChatCompletionRequest
from appliance.errors import ApplianceError
from appliance.serving.chat import ChatService, PreparedChat

__all__ = ["chat_completions", "event_stream", "sse"]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def sse(chunks: AsyncIterator[msgspec.Struct]) -> AsyncIterator[bytes]:
    """Server-sent events; an error after the first byte becomes an error event."""
    encoder = msgspec.json.Encoder()
    try:
        async for chunk in chunks:
            yield b"data: " + encoder.encode(chunk) + b"\n\n"
    except ApplianceError as exc:
        yield b"data: " + encoder.encode(exc.body()) + b"\n\n"
    yield b"data: [DONE]\n\n"


def event_stream(
    chunks: AsyncIterator[msgspec.Struct], chat: ChatService, prepared: PreparedChat
) -> Stream:
    """The SSE response of a prepared request; afterwards its hold is released if the body
    never started (see ``ChatService.release_unstarted``)."""
    return Stream(
        sse(chunks),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
        background=BackgroundTask(chat.release_unstarted, prepared),
    )


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    key = await authenticate(request)
    body = await decode_body(request, ChatCompletionRequest)
    found = services(request)
    chat = found.chat
    try:
        prepared = await chat.prepare(body, key)
    except ApplianceError as exc:
        found.metrics.request("chat", body.model, exc.status_code)
        raise
    found.metrics.request("chat", prepared.model.id, 200)
    if body.stream:
        return event_stream(chat.stream(prepared), chat, prepared)
    result = await chat.complete(prepared)
    return Response(msgspec.json.encode(result), media_type="application/json")
