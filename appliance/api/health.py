"""GET /health: 503 until the default model can serve, then 200."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get

from appliance.api.deps import services

__all__ = ["health"]


class HealthBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: str
    loading: list[str] = msgspec.field(default_factory=list)
    progress: dict[str, float] = msgspec.field(default_factory=dict)
    """How far each loading model is (0..1 of its tensors read)."""
    error: str = ""


@get("/health")
async def health(request: Request[Any, Any, Any]) -> Response[bytes]:
    status = services(request).engine.status()
    if status.ready:
        return Response(msgspec.json.encode(HealthBody(status="ok")), media_type="application/json")
    body = HealthBody(
        status="loading" if not status.error else "error",
        loading=status.loading,
        progress={k: round(v, 3) for k, v in status.load_progress.items()},
        error=status.error,
    )
    return Response(
        msgspec.json.encode(body),
        status_code=503,
        media_type="application/json",
        headers={"Retry-After": "5"},
    )
