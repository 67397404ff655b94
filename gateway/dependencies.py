"""Litestar dependencies: how routes receive the app's services (``provide_*``), never from ``app.state``.

``create_app`` puts each service on the app's state once; these functions hand them to the handlers that
name them as parameters (``models: NamedDependency[ModelManager]``, ``store: ...`` and so on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide

from auth.authenticate import Authenticator
from auth.principal import Principal
from auth.store import IdentityStore
from engine.models import ModelManager
from gateway.admin.ops import FileDigests
from gateway.cache.service import ResponseCache
from gateway.openai.pipeline import Pipeline
from gateway.security import authenticate, provide_principal
from gateway.settings import Settings
from telemetry.setup import Telemetry


def provide_settings(state: State) -> Settings:
    """The whole configuration."""
    settings: Settings = state.settings
    return settings


def provide_models(state: State) -> ModelManager:
    """The served models."""
    models: ModelManager = state.models
    return models


def provide_authenticator(state: State) -> Authenticator:
    """Logins, tokens and API keys."""
    authenticator: Authenticator = state.authenticator
    return authenticator


def provide_store(state: State) -> IdentityStore:
    """Users, keys, chat sessions and limit overrides."""
    authenticator: Authenticator = state.authenticator
    return authenticator.store


def provide_cache(state: State) -> ResponseCache:
    """The response cache."""
    cache: ResponseCache = state.cache
    return cache


def provide_pipeline(state: State) -> Pipeline:
    """Rate limit -> cache -> engine, for the routes that generate."""
    pipeline: Pipeline = state.pipeline
    return pipeline


def provide_telemetry(state: State) -> Telemetry:
    """Meters, tracers and the admin summary."""
    telemetry: Telemetry = state.telemetry
    return telemetry


def provide_digests(state: State) -> FileDigests:
    """SHA-256 of model files, computed once per file version."""
    digests: FileDigests = state.digests
    return digests


@dataclass(frozen=True, slots=True)
class Inference:
    """What a generating route needs, as one dependency: who asks, and the services that answer.

    One dependency instead of four: Litestar resolves a route's independent dependencies concurrently, in
    an anyio task group with a task each, which cost about a tenth of a response-cache hit's CPU.
    """

    principal: Principal
    pipeline: Pipeline
    models: ModelManager
    settings: Settings


async def provide_inference(request: ASGIConnection[Any, Any, Any, Any], state: State) -> Inference:
    """The caller (authenticated by the route's guard, cached on the request) and the generating services."""
    return Inference(await authenticate(request), state.pipeline, state.models, state.settings)


DEPENDENCIES = {
    "settings": Provide(provide_settings, sync_to_thread=False),
    "model_manager": Provide(provide_models, sync_to_thread=False),
    "authenticator": Provide(provide_authenticator, sync_to_thread=False),
    "identity_store": Provide(provide_store, sync_to_thread=False),
    "response_cache": Provide(provide_cache, sync_to_thread=False),
    "pipeline": Provide(provide_pipeline, sync_to_thread=False),
    "telemetry": Provide(provide_telemetry, sync_to_thread=False),
    "digests": Provide(provide_digests, sync_to_thread=False),
    "principal": Provide(provide_principal),
    "inference": Provide(provide_inference),
}
"""Every dependency a route may name. The names must not be a request body field of any route: Litestar
reports a body validation error under a dependency's name as a 500 (a body ``cache`` or ``store`` field)."""
