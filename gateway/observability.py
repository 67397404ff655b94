"""Wiring the ``telemetry`` package into the gateway: its configuration from settings, its middleware."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from litestar.middleware import DefineMiddleware

from gateway import __version__
from gateway.settings import Settings
from telemetry.http import TelemetryMiddleware, recording, start_record
from telemetry.requests import RequestRecord
from telemetry.setup import Telemetry, TelemetryConfig, otlp_endpoints

OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "chat",  # a chat turn through another API, as /chat is
    "/chat": "chat",
    "/chat/ws": "chat",  # each turn (``websocket_turn``)
}
"""Route template -> ``gen_ai.operation.name`` of the routes that run a model."""

WEBSOCKET_TURN_METHOD = "WS"
"""The ``http.request.method`` a WebSocket turn is recorded under: it is no HTTP request of its own."""


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


@contextmanager
def websocket_turn(telemetry: Telemetry, scope: Mapping[str, Any]) -> Iterator[RequestRecord]:
    """One turn on a WebSocket (a prompt and its reply), current and recorded when the block ends as one
    request of the socket's route: a span, the ``gen_ai`` token/TTFT/TPOT metrics, the ``/admin/metrics``
    summary and an access log line, by the same code as an HTTP request of that operation. The block
    sets ``status`` and ``complete`` (or ``disconnected``) as the HTTP middleware does from the response."""
    route = scope.get("path_template") or scope["path"]
    record = start_record(
        telemetry,
        scope,
        method=WEBSOCKET_TURN_METHOD,
        route=route,
        request_id=uuid.uuid4().hex,
        operation=OPERATIONS.get(route),
    )
    with recording(record):
        yield record
