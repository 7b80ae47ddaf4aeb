"""GET /metrics in Prometheus text format (token-protected or loopback-only)."""

from __future__ import annotations

import hmac
from typing import Any

from litestar import Request, Response, get

from appliance.api.deps import services
from appliance.errors import AuthenticationError
from appliance.metrics import CONTENT_TYPE

__all__ = ["metrics_endpoint"]

_LOOPBACK = {"127.0.0.1", "::1", "localhost", "testclient"}


@get("/metrics")
async def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
    found = services(request)
    token = found.settings.metrics_token
    if token:
        header = request.headers.get("authorization", "")
        presented = header.partition(" ")[2].strip()
        if not hmac.compare_digest(presented.encode(), token.encode()):
            raise AuthenticationError("A valid metrics token is required for /metrics")
    elif (request.client.host if request.client else "") not in _LOOPBACK:
        # Per-key counters are private: without a token only the box itself may scrape.
        raise AuthenticationError("Set APPLIANCE_METRICS_TOKEN to scrape /metrics remotely")
    return Response(found.metrics.render(), media_type=CONTENT_TYPE)
