"""Run the app under uvicorn (one process, one event loop)."""

from __future__ import annotations

import uvicorn

from appliance.app import create_app
from appliance.settings import Settings

__all__ = ["serve"]


def serve(settings: Settings) -> None:
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=10,
    )
