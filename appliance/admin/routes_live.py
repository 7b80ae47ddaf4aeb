"""The Live page: what the engine is doing now; its fragment is polled every 2 s by htmx."""

from __future__ import annotations

import time
from typing import Any

from litestar import Request, get
from litestar.response import Template

from appliance.admin.live import process_memory, uptime_text
from appliance.admin.views import page
from appliance.api.deps import services

__all__ = ["ROUTES"]


@get("/live")
async def live_page(request: Request[Any, Any, Any]) -> Template:
    found = services(request)
    status = found.engine.status()
    models = found.live.sample(found.engine)
    row = await found.db.fetchone("SELECT count(*) FROM reservations WHERE status = 'pending'")
    context = {
        "status": status,
        "models": models,
        "tokens_per_second": sum(m.tokens_per_second for m in models),
        "model_memory": sum(m.memory_bytes for m in models),
        "process_memory": process_memory(),
        "pending": int(row[0]) if row else 0,
        "errors": list(found.errors.recent)[:10],
        "client_errors": found.errors.client_errors,
        "server_errors": found.errors.server_errors,
        "error_counts": sorted(found.errors.counts.items()),
        "uptime": uptime_text(time.time() - found.live.started),
        "now": time.time(),
    }
    return page(request, "live", context)


ROUTES = [live_page]
