"""POST /v1/completions and /v1/embeddings: translate HTTP to CompletionService calls."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.response import Stream

from appliance.api.chat import event_stream
from appliance.api.deps import authenticate, decode_body, services
from appliance.api.protocol_text import CompletionRequest, EmbeddingRequest
from appliance.errors import ApplianceError

__all__ = ["completions", "embeddings"]


@post("/v1/completions", status_code=200)
async def completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    key = await authenticate(request)
    body = await decode_body(request, CompletionRequest)
    found = services(request)
    service = found.completions
    try:
        prepared = await service.prepare(body, key)
    except ApplianceError as exc:
        found.metrics.request("completions", body.model, exc.status_code)
        raise
    found.metrics.request("completions", prepared.model.id, 200)
    echo = service.echo_text(body, prepared) if body.echo else ""
    if body.stream:
        return event_stream(service.stream(prepared, echo), service.chat, prepared)
    result = await service.complete(prepared, echo)
    return Response(msgspec.json.encode(result), media_type="application/json")


@post("/v1/embeddings", status_code=200)
async def embeddings(request: Request[Any, Any, Any]) -> Response[bytes]:
    key = await authenticate(request)
    body = await decode_body(request, EmbeddingRequest)
    found = services(request)
    try:
        result = await found.completions.embed(body, key)
    except ApplianceError as exc:
        found.metrics.request("embeddings", body.model, exc.status_code)
        raise
    found.metrics.request("embeddings", result.model, 200)
    return Response(msgspec.json.encode(result), media_type="application/json")
