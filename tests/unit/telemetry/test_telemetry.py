"""Telemetry pieces without a server: settings mapping, percentiles, instruments and views."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from engine.base import KVCacheStats
from gateway.settings import load_settings
from telemetry import metrics as names
from telemetry.metrics import GatewayMetrics, RequestOutcome, views
from telemetry.requests import current_request
from telemetry.setup import otlp_endpoints
from telemetry.summary import percentiles


def test_the_standard_otel_variables_reach_the_settings() -> None:
    settings = load_settings(
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://tempo:4318/v1/traces",
            "OTEL_SERVICE_NAME": "edge-gateway",
            "POCKETLLM_TELEMETRY__METRICS_REQUIRE_ADMIN": "true",
        }
    )
    telemetry = settings.telemetry
    assert telemetry.service_name == "edge-gateway" and telemetry.metrics_require_admin is True
    assert otlp_endpoints(telemetry.otlp_endpoint, telemetry.otlp_traces_endpoint) == (
        "http://tempo:4318/v1/traces",
        "http://collector:4318/v1/metrics",
    )
    assert otlp_endpoints(None) == (None, None)
    assert load_settings(env={}).telemetry.otlp_endpoint is None


def test_percentiles_are_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 101)]
    assert percentiles(samples) == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}
    assert percentiles([0.25]) == {"p50": 0.25, "p95": 0.25, "p99": 0.25}


def test_instruments_record_with_the_llm_buckets() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=views(), shutdown_on_exit=False)
    metrics = GatewayMetrics(provider.get_meter("test"))
    metrics.request_finished(
        RequestOutcome(
            route="/v1/chat/completions",
            method="POST",
            status=200,
            duration_s=95.0,
            operation="chat",
            request_model="alias",
            model="m",
            input_tokens=10,
            output_tokens=20,
            ttft_s=0.2,
            tpot_s=0.01,
        )
    )
    metrics.cache_outcome("hit")
    metrics.rate_limited("tokens")
    metrics.redis_error("cache", "get")
    metrics.queue_changed("m", 3)
    data = reader.get_metrics_data()
    assert data is not None
    found = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    duration = found[names.GEN_AI_SERVER_REQUEST_DURATION].data.data_points[0]
    assert tuple(duration.explicit_bounds) == names.DURATION_BUCKETS
    assert duration.bucket_counts[names.DURATION_BUCKETS.index(160.0)] == 1  # 95 s lands in (80, 160]
    assert dict(duration.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "llama.cpp",
        "gen_ai.request.model": "alias",
        "gen_ai.response.model": "m",
    }
    assert found[names.QUEUE_LENGTH].data.data_points[0].value == 3
    assert dict(found[names.CACHE_REQUESTS].data.data_points[0].attributes) == {"outcome": "hit"}
    assert metrics.summary.snapshot()["cache"]["hit"] == 1
    provider.shutdown()


def test_the_kv_cache_of_a_watched_model_is_observed_until_it_is_unloaded() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    metrics = GatewayMetrics(provider.get_meter("test"))
    stats = KVCacheStats(capacity_bytes=100, size_bytes=60, entries=2, hits=5, misses=3, evictions=1)
    metrics.watch_kv_cache("m", lambda: stats)

    def observed() -> dict[str, tuple[int | float, dict[str, object]]]:
        data = reader.get_metrics_data()
        assert data is not None
        return {
            m.name: (point.value, dict(point.attributes or {}))  # type: ignore[union-attr]
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            for point in m.data.data_points
            if m.name.startswith("pocketllm.kv_cache.")
        }

    assert observed() == {
        names.KV_CACHE_SIZE: (60, {"model": "m"}),
        names.KV_CACHE_CAPACITY: (100, {"model": "m"}),
        names.KV_CACHE_ENTRIES: (2, {"model": "m"}),
        names.KV_CACHE_HITS: (5, {"model": "m"}),
        names.KV_CACHE_MISSES: (3, {"model": "m"}),
        names.KV_CACHE_EVICTIONS: (1, {"model": "m"}),
    }
    metrics.model_unloaded("m")
    assert observed() == {}
    provider.shutdown()


def test_hooks_outside_a_request_do_nothing() -> None:
    record = current_request()
    assert not record.active
    record.identify("a", "b")
    record.queued("b")
    record.first_token()
    record.generated(1, 2)
    record.finish()
    assert record.model is None and record.input_tokens is None
