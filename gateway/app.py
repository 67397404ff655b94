"""``create_app(settings)``: wiring only, no logic."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from litestar import Litestar, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import RedocRenderPlugin, SwaggerRenderPlugin
from litestar.response import Redirect

from auth.service import ensure_default_users
from gateway import __version__
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
from gateway.routes.admin import AdminIdentityController
from gateway.routes.admin_ops import AdminOpsController, FileDigests, prometheus_route
from gateway.routes.admin_services import AdminServicesController
from gateway.routes.health import health, index
from gateway.routes.openai import OpenAIController
from gateway.routes.pocket import AuthController, ChatController, chat_socket
from gateway.runtime import ModelManager
from gateway.security import build_authenticator, provide_principal
from gateway.services.backends import build_services
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
    services = build_services(
        settings,
        on_cache_error=lambda operation, _: telemetry.metrics.redis_error("cache", operation),
        on_limiter_error=lambda operation, _: telemetry.metrics.redis_error("ratelimit", operation),
    )
    models = ModelManager(settings, observer=telemetry.metrics, on_reload=services.cache.invalidate_model)
    digests = FileDigests()
    authenticator = build_authenticator(settings)
    drainer = Drainer(models, settings.server.drain_timeout_s)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        if settings.env == "development":
            created = await ensure_default_users(authenticator)
            if created:
                logger.warning(
                    "development mode: created the default users %s (see README); "
                    "set POCKETLLM_ENV=production to create none",
                    ", ".join(created),
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
            await services.close()
            await authenticator.store.close()
            await asyncio.to_thread(telemetry.shutdown)

    return Litestar(
        route_handlers=[
            index,
            health,
            docs_redirect,
            redoc_redirect,
            OpenAIController,
            AuthController,
            ChatController,
            chat_socket,
            AdminIdentityController,
            AdminOpsController,
            AdminServicesController,
            *(
                [prometheus_route(require_admin=settings.telemetry.metrics_require_admin)]
                if settings.telemetry.metrics_enabled
                else []
            ),
        ],
        dependencies={
            "models": Provide(lambda: models, use_cache=True, sync_to_thread=False),
            "settings": Provide(lambda: settings, use_cache=True, sync_to_thread=False),
            "services": Provide(lambda: services, use_cache=True, sync_to_thread=False),
            "principal": Provide(provide_principal),
            "telemetry": Provide(lambda: telemetry, use_cache=True, sync_to_thread=False),
            "digests": Provide(lambda: digests, use_cache=True, sync_to_thread=False),
        },
        state=State({"authenticator": authenticator, "drainer": drainer}),
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
