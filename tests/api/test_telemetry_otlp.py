"""OTLP/HTTP export: spans and metrics reach a real receiver on loopback; the client's traceparent holds."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import MODEL_ID, NO_EOS, ServedApp, make_settings


class OTLPReceiver:
    """A minimal OTLP/HTTP (protobuf) receiver: ``/v1/traces`` and ``/v1/metrics``, kept in memory."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.metric_names: set[str] = set()
        self.metric_points: dict[str, list[Any]] = {}
        self.content_types: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.content_types.add(self.headers["Content-Type"])
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest.FromString(body)
                    for resource_spans in request.resource_spans:
                        for scope_spans in resource_spans.scope_spans:
                            receiver.spans.extend(scope_spans.spans)
                    reply = ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    metrics = ExportMetricsServiceRequest.FromString(body)
                    for resource_metrics in metrics.resource_metrics:
                        for scope_metrics in resource_metrics.scope_metrics:
                            for metric in scope_metrics.metrics:
                                receiver.metric_names.add(metric.name)
                                receiver.metric_points.setdefault(metric.name, []).append(metric)
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OTLPReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as running:
        yield running


def _attributes(span: Span) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for kv in span.attributes:
        which = kv.value.WhichOneof("value")
        result[kv.key] = getattr(kv.value, which) if which else None
    return result


def test_spans_and_metrics_reach_the_receiver_and_the_traceparent_is_honoured(
    model_path: Path, receiver: OTLPReceiver
) -> None:
    del model_path
    settings = make_settings(telemetry={"otlp_endpoint": receiver.url, "otlp_metrics_interval_s": 3600})
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    app = ServedApp(settings).start()
    try:
        with httpx.Client(base_url=app.base_url, headers=app.headers, timeout=120) as http:
            reply = http.post(
                "/v1/chat/completions",
                json={
                    "model": MODEL_ID,
                    "messages": [{"role": "user", "content": "Hello"}],
                    "max_tokens": 4,
                    "logit_bias": NO_EOS,
                },
                headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "x-request-id": "otlp-test-1"},
            )
            assert reply.status_code == 200, reply.text
            usage = reply.json()["usage"]
            assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        app.stop()  # the lifespan shuts the providers down, flushing spans and metrics to the receiver

    assert receiver.content_types == {"application/x-protobuf"}
    ours = [s for s in receiver.spans if s.trace_id.hex() == trace_id]
    server = [s for s in ours if s.kind == Span.SPAN_KIND_SERVER]
    assert len(server) == 1, [s.name for s in ours]
    root = server[0]
    assert root.parent_span_id.hex() == parent_id  # continues the client's trace
    assert root.name == "POST /v1/chat/completions"
    attributes = _attributes(root)
    assert attributes["pocketllm.request_id"] == "otlp-test-1"
    assert attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.request.model"] == MODEL_ID
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 4
    children = {s.name: s for s in ours if s.parent_span_id == root.span_id}
    assert set(children) == {"auth", "cache", "queue wait", "prompt processing", "generation"}
    assert attributes["pocketllm.cache"] in {"miss", "bypass"}
    assert _attributes(children["generation"])["gen_ai.usage.output_tokens"] == 4
    # stages are in order: auth, cache lookup, queue wait, prompt processing, generation
    assert children["auth"].end_time_unix_nano <= children["cache"].start_time_unix_nano
    assert children["cache"].end_time_unix_nano <= children["queue wait"].start_time_unix_nano
    assert children["queue wait"].end_time_unix_nano <= children["prompt processing"].start_time_unix_nano
    assert children["prompt processing"].end_time_unix_nano <= children["generation"].start_time_unix_nano
    assert root.start_time_unix_nano <= children["auth"].start_time_unix_nano
    assert children["generation"].end_time_unix_nano <= root.end_time_unix_nano
    # a request without traceparent starts its own trace; a failed auth marks its span
    refused = [s for s in receiver.spans if s.name == "GET /v1/models" and s.trace_id.hex() != trace_id]
    assert len(refused) == 1 and _attributes(refused[0])["http.response.status_code"] == 401
    # the metrics were pushed once, at shutdown (the interval is an hour)
    assert {
        "gen_ai.server.request.duration",
        "gen_ai.client.token.usage",
        "gen_ai.server.time_to_first_token",
        "pocketllm.requests",
        "process.memory.usage",
        "process.cpu.time",
    } <= receiver.metric_names
    token_usage = receiver.metric_points["gen_ai.client.token.usage"][-1]
    output = [
        p
        for p in token_usage.histogram.data_points
        if any(a.value.string_value == "output" for a in p.attributes)
    ]
    assert [(p.count, p.sum) for p in output] == [(1, 4.0)]
