"""The Litestar application factory; all resources live in the lifespan, none in globals."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException

from appliance.admin.pulls import PullManager
from appliance.admin.setup import build_admin, record_exception
from appliance.admin.views import admin_exception_handlers
from appliance.api.chat import chat_completions
from appliance.api.completions import completions, embeddings
from appliance.api.errors import exception_handlers
from appliance.api.health import health
from appliance.api.metrics import metrics_endpoint
from appliance.api.models import get_model, list_models
from appliance.engine.llama import LlamaEngine
from appliance.engine.native import NativeModelConfig
from appliance.engine.protocol import Engine
from appliance.engine.registry import ModelRegistry
from appliance.engine.rpc import parse_endpoints, register_rpc_servers
from appliance.metrics import Metrics
from appliance.services import Services
from appliance.serving.chat import ChatService
from appliance.serving.completions import CompletionService
from appliance.settings import Settings
from appliance.store.db import Database
from appliance.store.keys import KeyStore
from appliance.store.ledger import Ledger
from appliance.store.owner import OwnerSettings

__all__ = ["build_engine", "create_app"]

_log = logging.getLogger("appliance")

EngineFactory = Callable[[Settings], Engine]


def build_engine(settings: Settings) -> Engine:
    """The real llama.cpp engine configured from settings."""
    register_rpc_servers(parse_endpoints(settings.rpc_servers))  # before any model loads
    llama_logger = logging.getLogger("llama-cpp-python")
    llama_logger.setLevel(logging.DEBUG if settings.log_level == "debug" else logging.ERROR)
    config = NativeModelConfig(
        ctx_size=settings.ctx_size,
        parallel=settings.parallel,
        batch_size=settings.batch_size,
        threads=settings.threads,
        n_gpu_layers=settings.n_gpu_layers,
        flash_attn=settings.flash_attn,
        cache_type_k=settings.cache_type_k,
        cache_type_v=settings.cache_type_v,
    )
    return LlamaEngine(
        ModelRegistry(settings.models_dir),
        config,
        default_model=settings.default_model,
        max_queue=settings.max_queue,
        max_loaded=settings.max_loaded_models,
        memory_budget=settings.memory_budget_mb * 1024 * 1024,
        idle_ttl=settings.model_idle_ttl,
    )


def _http_error_by_area(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """404/405 raised before any router matched: an admin page for /admin paths, else JSON."""
    path = request.url.path
    admin_area = path == "/admin" or path.startswith("/admin/")
    handler = cast(
        Callable[[Request[Any, Any, Any], HTTPException], Response[Any]],
        (admin_exception_handlers if admin_area else exception_handlers)[HTTPException],
    )
    return handler(request, exc)


def create_app(settings: Settings, engine_factory: EngineFactory = build_engine) -> Litestar:
    admin = build_admin()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        db = await Database.open(settings.data_dir)
        engine = engine_factory(settings)
        ledger = Ledger(db)
        metrics = Metrics(engine)
        voided = await ledger.recover()
        if voided:
            _log.warning("voided %d reservations left pending by an earlier crash", voided)
        chat = ChatService(
            engine,
            ledger,
            default_max_tokens=settings.default_max_tokens,
            request_timeout=settings.request_timeout,
            metrics=metrics,
        )
        services = Services(
            settings=settings,
            db=db,
            engine=engine,
            keys=KeyStore(db),
            ledger=ledger,
            owner=OwnerSettings(db),
            chat=chat,
            completions=CompletionService(chat),
            metrics=metrics,
            pulls=PullManager(settings.models_dir),
        )
        app.state.services = services
        await admin.start(app, services)
        # The owner's runtime choices override the process defaults.
        aliases = await services.owner.get("aliases", {})
        default_model = await services.owner.get("default_model", "")
        engine.configure(
            aliases=aliases,
            default_model=default_model or settings.default_model,
            model_options=await services.owner.get("model_options", {}),
        )
        await _greet(services)
        # Load the default model in the background: the port answers at once and /health
        # says 503 until the model can serve.
        loader = asyncio.create_task(engine.start())
        try:
            yield
        finally:
            loader.cancel()
            await services.pulls.close()
            # Stop generation first: its last Finish events settle through the ledger,
            # and those writes must land before the database closes.
            await engine.close()
            await asyncio.sleep(0.05)  # let the engine's final callbacks reach the loop
            await services.chat.close()
            await db.close()

    handlers: dict[Any, Any] = {**exception_handlers, HTTPException: _http_error_by_area}
    return Litestar(
        route_handlers=[
            health,
            list_models,
            get_model,
            chat_completions,
            metrics_endpoint,
            completions,
            embeddings,
            *admin.route_handlers,
        ],
        lifespan=[lifespan],
        exception_handlers=handlers,
        after_exception=[record_exception],
        template_config=admin.template_config,
        csrf_config=admin.csrf_config,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
    )


async def _greet(services: Services) -> None:
    settings = services.settings
    host = "localhost" if settings.host in ("0.0.0.0", "::", "127.0.0.1") else settings.host
    base = f"http://{host}:{settings.port}"
    _log.info("OpenAI-compatible API: %s/v1  (admin page: %s/admin)", base, base)
    password = await services.owner.ensure_admin_password()
    if password is not None:
        # Printed once, on first start; only its scrypt hash is stored.
        print(
            f"Admin password (shown once; change it with 'appliance admin set-password'): "
            f"{password}",
            flush=True,
        )
    if await services.keys.count() == 0:
        _log.info(
            "No API keys yet. Create one with:  appliance keys create NAME --data-dir %s",
            settings.data_dir,
        )
