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
from gateway.routes.admin import AdminIdentityController
from gateway.routes.health import health, index
from gateway.routes.openai import OpenAIController
from gateway.routes.pocket import AuthController, ChatController, chat_socket
from gateway.runtime import ModelManager
from gateway.security import build_authenticator, provide_principal
from gateway.settings import Settings

logger = logging.getLogger("pocketllm")


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
    models = ModelManager(settings)
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
            await authenticator.store.close()

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
        ],
        dependencies={
            "models": Provide(lambda: models, use_cache=True, sync_to_thread=False),
            "settings": Provide(lambda: settings, use_cache=True, sync_to_thread=False),
            "principal": Provide(provide_principal),
        },
        state=State({"authenticator": authenticator, "drainer": drainer}),
        lifespan=[lifespan],
        middleware=[RequestIdMiddleware, drainer.middleware, JsonBodyMiddleware],
        exception_handlers={
            GatewayError: handle_gateway_error,
            ValidationException: handle_validation_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        cors_config=CORSConfig(allow_origins=settings.server.cors_origins, expose_headers=["x-request-id"]),
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
