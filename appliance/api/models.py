"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get

from appliance.api.deps import authenticate, services
from appliance.api.protocol import ModelCard, ModelList
from appliance.engine.protocol import ModelInfo
from appliance.errors import ModelNotFoundError

__all__ = ["get_model", "list_models"]


def _card(info: ModelInfo, aliases: list[str]) -> ModelCard:
    ctx = info.context_length or None
    return ModelCard(
        id=info.id,
        created=info.created,
        context_length=ctx,
        max_model_len=ctx,
        loaded=info.loaded,
        size_bytes=info.size_bytes,
        architecture=info.architecture,
        aliases=aliases,
    )


def _aliases(request: Request[Any, Any, Any]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    engine = services(request).engine
    for alias, target in getattr(engine, "aliases", {}).items():
        found.setdefault(target, []).append(alias)
    return found


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> Response[bytes]:
    await authenticate(request)
    aliases = _aliases(request)
    cards = [_card(m, aliases.get(m.id, [])) for m in services(request).engine.models()]
    return Response(msgspec.json.encode(ModelList(data=cards)), media_type="application/json")


@get("/v1/models/{model_id:str}")
async def get_model(request: Request[Any, Any, Any], model_id: str) -> Response[bytes]:
    await authenticate(request)
    engine = services(request).engine
    wanted = engine.resolve(model_id)
    aliases = _aliases(request)
    for info in engine.models():
        if info.id == wanted:
            card = _card(info, aliases.get(info.id, []))
            return Response(msgspec.json.encode(card), media_type="application/json")
    raise ModelNotFoundError(f"The model '{model_id}' does not exist", param="model")
