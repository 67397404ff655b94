"""``create_app(settings)``: wiring only, no logic."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from litestar import Litestar, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import RedocRenderPlugin, SwaggerRenderPlugin
from litestar.response import Redirect

from auth.bootstrap import ensure_default_users, refuse_default_passwords
from auth.errors import AuthError
from engine.base import EngineError
from engine.models import ModelManager
from gateway import __version__
from gateway.admin.health import health, index
from gateway.admin.identity import AdminIdentityController
from gateway.admin.ops import AdminOpsController, FileDigests, prometheus_route
from gateway.backends import build_backends
from gateway.cache.admin import AdminCacheController
from gateway.console.routes import console_router
from gateway.dependencies import DEPENDENCIES
from gateway.draining import Drainer
from gateway.errors import (
    GatewayError,
    handle_gateway_error,
    handle_http_exception,
    handle_unexpected,
    handle_validation_error,
)
from gateway.middleware import JsonBodyMiddleware, RequestIdMiddleware
from gateway.observability import build_telemetry, telemetry_middleware
from gateway.openai.controller import OpenAIController
from gateway.openai.pipeline import Pipeline
from gateway.openai.responses.controller import ResponsesController
from gateway.pocket.auth import AuthController
from gateway.pocket.chat import ChatController, chat_socket
from gateway.ratelimit.admin import AdminLimitsController
from gateway.security import build_authenticator
from gateway.settings import Settings

logger = logging.getLogger("pocketllm")

EXPOSED_HEADERS = [
    "x-request-id",
    "x-cache",
    "retry-after",
    *(
        f"x-ratelimit-{what}-{kind}"
        for what in ("limit", "remaining", "reset")
        for kind in ("requests", "tokens")
    ),
]
"""Response headers a browser client may read (CORS)."""


@get("/docs", include_in_schema=False)
async def docs_redirect() -> Redirect:
    """Swagger UI."""
    return Redirect("/schema/swagger")


@get("/redoc", include_in_schema=False)
async def redoc_redirect() -> Redirect:
    """ReDoc."""
    return Redirect("/schema/redoc")


def create_app(settings: Settings, *, on_load_failure: Callable[[list[str]], None] | None = None) -> Litestar:
    """Build the gateway for ``settings``.

    Models load in the background once the app starts (``/health`` says 503 until they are ready).

    Args:
        settings: the whole configuration.
        on_load_failure: called with the ids of models that failed to load (the CLI stops the server).
    """
    telemetry = build_telemetry(settings)
    backends = build_backends(
        settings,
        on_cache_error=lambda operation, _: telemetry.metrics.redis_error("cache", operation),
        on_limiter_error=lambda operation, _: telemetry.metrics.redis_error("ratelimit", operation),
    )
    models = ModelManager(
        settings.served_models(),
        settings.queue,
        observer=telemetry.metrics,
        on_reload=backends.cache.invalidate_model,
        on_loaded=lambda model_id, engine: telemetry.metrics.watch_kv_cache(model_id, engine.kv_cache_stats),
    )
    authenticator = build_authenticator(settings, backends.redis)
    drainer = Drainer(models, settings.server.drain_timeout_s)
    state = State(
        {
            "settings": settings,
            "models": models,
            "authenticator": authenticator,
            "cache": backends.cache,
            "limiter": backends.limiter,
            "pipeline": Pipeline(settings, backends.limiter, backends.cache, authenticator.store),
            "telemetry": telemetry,
            "digests": FileDigests(),
            "drainer": drainer,
        }
    )

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await authenticator.store.open()  # a bad store URL stops start-up here
        if settings.env == "production":
            # a data directory made in development still holds admin / admin123
            await refuse_default_passwords(authenticator.store)
        else:
            created = await ensure_default_users(authenticator.store, authenticator.passwords)
            if created:
                logger.warning(
                    "development mode: created the default users %s (see README); "
                    "set POCKETLLM_ENV=production to create none",
                    ", ".join(user.username for user in created),
                )

        async def load() -> None:
            failed = await models.load_all()
            if failed and on_load_failure is not None:
                on_load_failure([r.id for r in failed])

        loader = asyncio.create_task(load(), name="pocketllm-load-models")
        try:
            yield
        finally:
            loader.cancel()
            await models.close()
            await backends.close()
            await authenticator.store.close()
            await asyncio.to_thread(telemetry.shutdown)

    return Litestar(
        route_handlers=[
            index,
            health,
            docs_redirect,
            redoc_redirect,
            OpenAIController,
            ResponsesController,
            AuthController,
            ChatController,
            chat_socket,
            AdminIdentityController,
            AdminOpsController,
            AdminCacheController,
            AdminLimitsController,
            console_router(),
            *(
                [prometheus_route(require_admin=settings.telemetry.metrics_require_admin)]
                if settings.telemetry.metrics_enabled
                else []
            ),
        ],
        dependencies=DEPENDENCIES,
        state=state,
        lifespan=[lifespan],
        # telemetry sees the drainer's 503s; the body check runs after both
        middleware=[
            RequestIdMiddleware,
            telemetry_middleware(telemetry),
            drainer.middleware,
            JsonBodyMiddleware,
        ],
        exception_handlers={
            GatewayError: handle_gateway_error,
            EngineError: handle_gateway_error,
            AuthError: handle_gateway_error,
            ValidationException: handle_validation_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        cors_config=CORSConfig(allow_origins=settings.server.cors_origins, expose_headers=EXPOSED_HEADERS),
        openapi_config=OpenAPIConfig(
            title="PocketLLM Gateway",
            version=__version__,
            description="OpenAI-compatible inference gateway over llama.cpp",
            render_plugins=[SwaggerRenderPlugin(), RedocRenderPlugin()],
        ),
        request_max_body_size=settings.server.max_body_bytes,
        logging_config=None,
        debug=False,
    )
