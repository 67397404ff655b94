"""ASGI middleware: a server span and a ``RequestRecord`` per HTTP request, recorded when it ends.

The span continues the client's W3C ``traceparent``. The request is recorded just *before* the last
body message is handed to the server, so a client that has read the response sees it in the metrics.
A request whose client went away first is recorded as cancelled.

``start_record`` and ``recording`` are the same two steps for work that is not an HTTP request of its
own: each turn on a WebSocket is recorded as one request of the socket's route.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from telemetry.requests import RequestRecord, reset_current_request, set_current_request

if TYPE_CHECKING:
    from telemetry.setup import Telemetry

ASGIApp = Callable[..., Any]
_propagator = TraceContextTextMapPropagator()


class TelemetryMiddleware:
    """Traces, measures and logs each HTTP request of ``app``.

    Args:
        app: the next ASGI application.
        telemetry: the app's telemetry.
        operations: route template -> ``gen_ai.operation.name`` (``chat``, ``text_completion``, ...).
        request_id: reads the request id from the ASGI scope.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        telemetry: Telemetry,
        operations: Mapping[str, str],
        request_id: Callable[[Mapping[str, Any]], str],
    ) -> None:
        self.app = app
        self.telemetry = telemetry
        self.operations = operations
        self.request_id = request_id

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope.get("path_template") or scope["path"]
        record = start_record(
            self.telemetry,
            scope,
            method=scope["method"],
            route=route,
            request_id=self.request_id(scope),
            operation=self.operations.get(route),
        )

        async def receive_watching() -> Any:
            message = await receive()
            if message["type"] == "http.disconnect":
                record.disconnected = True
            return message

        async def send_recording(message: Any) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # an answer written after the client left (the 499 of a dropped JSON request) reaches nobody
                record.complete = not record.disconnected
                record.finish()
            await send(message)

        with recording(record):
            await self.app(scope, receive_watching, send_recording)


def start_record(
    telemetry: Telemetry,
    scope: Mapping[str, Any],
    *,
    method: str,
    route: str,
    request_id: str,
    operation: str | None,
) -> RequestRecord:
    """A request's record and its server span, which continues the ``traceparent`` of ``scope``'s
    headers (an HTTP request's, or the upgrade request of a WebSocket)."""
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    span = telemetry.tracer.start_span(
        f"{method} {route}",
        context=_propagator.extract(headers),
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": method,
            "http.route": route,
            "url.path": scope["path"],
            "pocketllm.request_id": request_id,
        },
    )
    return RequestRecord(
        telemetry, request_id=request_id, method=method, route=route, operation=operation, span=span
    )


@contextmanager
def recording(record: RequestRecord) -> Iterator[RequestRecord]:
    """Make ``record`` the current request for the block, and record it (once) when the block ends."""
    token = set_current_request(record)
    try:
        yield record
    finally:
        record.finish()
        reset_current_request(token)
