"""Wiring the ``telemetry`` package into the gateway: its configuration from settings, its middleware."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from litestar.middleware import DefineMiddleware

from gateway import __version__
from gateway.settings import Settings
from telemetry.http import TelemetryMiddleware
from telemetry.setup import Telemetry, TelemetryConfig, otlp_endpoints

OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "chat",  # a chat turn through another API, as /chat is
    "/chat": "chat",
}
"""Route template -> ``gen_ai.operation.name`` of the routes that run a model."""


def build_telemetry(settings: Settings) -> Telemetry:
    """The app's telemetry (its own meter and tracer providers) for ``settings``."""
    config = settings.telemetry
    traces, metrics = otlp_endpoints(
        config.otlp_endpoint, config.otlp_traces_endpoint, config.otlp_metrics_endpoint
    )
    return Telemetry(
        TelemetryConfig(
            service_name=config.service_name,
            service_version=__version__,
            environment=settings.env,
            prometheus=config.metrics_enabled,
            otlp_traces_endpoint=traces,
            otlp_metrics_endpoint=metrics,
            otlp_metrics_interval_s=config.otlp_metrics_interval_s,
            log_content=config.log_content,
        )
    )


def _request_id(scope: Mapping[str, Any]) -> str:
    state = scope.get("state") or {}
    request_id: str = state.get("request_id", "")
    return request_id


def telemetry_middleware(telemetry: Telemetry) -> DefineMiddleware:
    """The middleware tracing, measuring and logging every HTTP request (after the request id is set)."""
    return DefineMiddleware(
        TelemetryMiddleware, telemetry=telemetry, operations=OPERATIONS, request_id=_request_id
    )
