"""Small request helpers shared by the routes."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from litestar import Request

from appliance.api.errors import validation_error
from appliance.services import Services
from appliance.store.keys import ApiKey

__all__ = ["authenticate", "decode_body", "services"]

T = TypeVar("T")


def services(request: Request[Any, Any, Any]) -> Services:
    found: Services = request.app.state.services
    return found


async def authenticate(request: Request[Any, Any, Any]) -> ApiKey:
    """The caller's key from ``Authorization: Bearer``; raises AuthenticationError."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    presented = token.strip() if scheme.lower() == "bearer" else None
    return await services(request).keys.authenticate(presented)


async def decode_body(request: Request[Any, Any, Any], type_: type[T]) -> T:
    """Parse the JSON body ourselves so every failure is an OpenAI-style 400."""
    body = await request.body()
    try:
        return msgspec.json.decode(body, type=type_)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise validation_error(exc) from None
