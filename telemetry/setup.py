"""Build one app's telemetry: a MeterProvider and a TracerProvider of its own (never the global ones).

Readers and exporters:
- Prometheus: a ``PrometheusMetricReader`` on a ``CollectorRegistry`` of this app, read by ``GET /metrics``.
- OTLP/HTTP (protobuf) for metrics and traces when an endpoint is configured (the gateway maps the
  standard ``OTEL_EXPORTER_OTLP_*ENDPOINT`` variables onto the settings; headers, timeout, compression
  and certificates are read from the standard variables by the exporters themselves).

Several apps can live in one process (tests build many): each has its own providers and registry, and
``shutdown`` flushes and frees them.
"""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Tracer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from telemetry.metrics import GatewayMetrics, views
from telemetry.system import SystemSampler

SCOPE = "pocketllm.gateway"
PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")
"""The exposition's media type without its charset (the web framework adds ``charset=utf-8``)."""


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """What to build (the gateway fills it from its settings)."""

    service_name: str = "pocketllm-gateway"
    service_version: str = ""
    environment: str = ""
    prometheus: bool = True
    """Serve Prometheus exposition (``Telemetry.prometheus_exposition``)."""
    otlp_traces_endpoint: str | None = None
    """Full URL of an OTLP/HTTP traces receiver (``.../v1/traces``); no trace export when ``None``."""
    otlp_metrics_endpoint: str | None = None
    """Full URL of an OTLP/HTTP metrics receiver (``.../v1/metrics``); no metric export when ``None``."""
    otlp_metrics_interval_s: float = 60.0
    log_content: bool = False
    """Put prompts and completions into the access log."""


class Telemetry:
    """One app's meter and tracer providers, its instruments and its system sampler."""

    def __init__(self, config: TelemetryConfig) -> None:
        self.config = config
        resource = Resource.create(
            {
                "service.name": config.service_name,
                **({"service.version": config.service_version} if config.service_version else {}),
                **({"deployment.environment.name": config.environment} if config.environment else {}),
            }
        )
        readers: list[MetricReader] = []
        self.registry: CollectorRegistry | None = None
        if config.prometheus:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: PLC0415

            self.registry = CollectorRegistry(auto_describe=True)
            readers.append(PrometheusMetricReader(scope_info_enabled=False, registry=self.registry))
        if config.otlp_metrics_endpoint:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415
                OTLPMetricExporter,
            )

            readers.append(
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=config.otlp_metrics_endpoint),
                    export_interval_millis=config.otlp_metrics_interval_s * 1000,
                )
            )
        self.meter_provider = MeterProvider(
            metric_readers=readers, resource=resource, views=views(), shutdown_on_exit=False
        )
        self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        if config.otlp_traces_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter,
            )

            self.tracer_provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_traces_endpoint))
            )
        meter = self.meter_provider.get_meter(SCOPE, config.service_version or None)
        self.tracer: Tracer = self.tracer_provider.get_tracer(SCOPE, config.service_version or None)
        self.metrics = GatewayMetrics(meter)
        self.system = SystemSampler()
        self.system.register(meter)
        self._shut = False

    def prometheus_exposition(self) -> bytes:
        """Every metric in the Prometheus text format (empty when Prometheus is off)."""
        if self.registry is None:
            return b""
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        """Flush the exporters and stop the providers (blocking; idempotent)."""
        if self._shut:
            return
        self._shut = True
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def otlp_endpoints(
    base: str | None, traces: str | None = None, metrics: str | None = None
) -> tuple[str | None, str | None]:
    """The traces and metrics URLs from ``OTEL_EXPORTER_OTLP_ENDPOINT``-style settings.

    Args:
        base: the base URL (``http://collector:4318``), used with ``/v1/traces`` and ``/v1/metrics``.
        traces: a full traces URL, taking precedence over ``base``.
        metrics: a full metrics URL, taking precedence over ``base``.
    """
    root = base.rstrip("/") if base else None
    return (
        traces or (f"{root}/v1/traces" if root else None),
        metrics or (f"{root}/v1/metrics" if root else None),
    )
