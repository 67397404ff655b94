"""Every instrument the gateway records, in one place: names, units, attributes, histogram buckets.

OpenTelemetry GenAI semantic-convention names are used where they exist (``gen_ai.server.*``,
``gen_ai.client.token.usage``, attribute ``gen_ai.provider.name`` which replaced ``gen_ai.system``); the
gateway's own instruments are ``pocketllm.*``. No user id, key or prompt is ever an attribute: the
attributes are the route, the model (a configured id or alias), the status and a few small enums.

``GatewayMetrics`` implements the engine pool's ``PoolObserver`` protocol (``queue_changed``,
``queue_waited``, ``slots_changed``) and offers the hooks the cache and rate limiter call
(``cache_outcome``, ``rate_limited``, ``redis_error``). A loaded model's host-memory KV cache is
observed through ``watch_kv_cache`` (each collection reads the engine's ``kv_cache_stats``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

from engine.base import KVCacheStats
from telemetry.summary import RequestSummary

PROVIDER_NAME = "llama.cpp"
"""Value of ``gen_ai.provider.name``: the engine behind every served model."""

# --- GenAI semantic conventions (development status; names as of semconv 1.37+) -------------------
# (S105: "token" in these names is an LLM token, not a secret)
GEN_AI_TOKEN_USAGE = "gen_ai.client.token.usage"  # noqa: S105
GEN_AI_SERVER_REQUEST_DURATION = "gen_ai.server.request.duration"
GEN_AI_SERVER_TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"  # noqa: S105
GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"  # noqa: S105
# --- HTTP semantic conventions (stable) ----------------------------------------------------------
HTTP_SERVER_REQUEST_DURATION = "http.server.request.duration"
# --- the gateway's own ---------------------------------------------------------------------------
REQUESTS = "pocketllm.requests"
REQUESTS_CANCELLED = "pocketllm.requests.cancelled"
QUEUE_LENGTH = "pocketllm.queue.length"
QUEUE_WAIT = "pocketllm.queue.wait_time"
QUEUE_REJECTIONS = "pocketllm.queue.rejections"
SLOTS_BUSY = "pocketllm.slots.busy"
CACHE_REQUESTS = "pocketllm.cache.requests"
RATE_LIMIT_REJECTIONS = "pocketllm.rate_limit.rejections"
ENGINE_ERRORS = "pocketllm.engine.errors"
REDIS_ERRORS = "pocketllm.redis.errors"
KV_CACHE_SIZE = "pocketllm.kv_cache.size"
KV_CACHE_CAPACITY = "pocketllm.kv_cache.capacity"
KV_CACHE_ENTRIES = "pocketllm.kv_cache.entries"
KV_CACHE_HITS = "pocketllm.kv_cache.hits"
KV_CACHE_MISSES = "pocketllm.kv_cache.misses"
KV_CACHE_EVICTIONS = "pocketllm.kv_cache.evictions"
# --- process and system (semantic-convention names; recorded by telemetry.system) ----------------
PROCESS_CPU_TIME = "process.cpu.time"
PROCESS_CPU_UTILIZATION = "process.cpu.utilization"
PROCESS_MEMORY_USAGE = "process.memory.usage"
PROCESS_THREAD_COUNT = "process.thread.count"
PROCESS_FD_COUNT = "process.unix.file_descriptor.count"
SYSTEM_CPU_UTILIZATION = "system.cpu.utilization"
SYSTEM_MEMORY_USAGE = "system.memory.usage"
SYSTEM_MEMORY_UTILIZATION = "system.memory.utilization"

# --- attribute keys ------------------------------------------------------------------------------
ATTR_OPERATION = "gen_ai.operation.name"
ATTR_PROVIDER = "gen_ai.provider.name"
ATTR_REQUEST_MODEL = "gen_ai.request.model"
ATTR_RESPONSE_MODEL = "gen_ai.response.model"
ATTR_TOKEN_TYPE = "gen_ai.token.type"  # noqa: S105
ATTR_ERROR_TYPE = "error.type"
ATTR_ROUTE = "http.route"
ATTR_METHOD = "http.request.method"
ATTR_STATUS = "http.response.status_code"
ATTR_MODEL = "model"
"""The served model's id (never a client-chosen string: only configured ids and aliases get here)."""

# --- histogram buckets: LLM latencies run from milliseconds to minutes -----------------------------
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 600.0,
)  # fmt: skip
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip

CacheOutcome = Literal["hit", "miss", "bypass"]


def views() -> list[View]:
    """Views giving every histogram buckets that fit what it measures."""
    buckets: Mapping[str, tuple[float, ...]] = {
        GEN_AI_SERVER_REQUEST_DURATION: DURATION_BUCKETS,
        HTTP_SERVER_REQUEST_DURATION: DURATION_BUCKETS,
        QUEUE_WAIT: DURATION_BUCKETS,
        GEN_AI_SERVER_TIME_TO_FIRST_TOKEN: TTFT_BUCKETS,
        GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN: TPOT_BUCKETS,
        GEN_AI_TOKEN_USAGE: tuple(float(b) for b in TOKEN_BUCKETS),
    }
    return [
        View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(boundaries))
        for name, boundaries in buckets.items()
    ]


@dataclass(slots=True)
class RequestOutcome:
    """What one finished HTTP request did, as the metrics need it (no user, no content)."""

    route: str
    method: str
    status: int
    duration_s: float
    operation: str | None = None
    request_model: str | None = None
    model: str | None = None
    provider: str = PROVIDER_NAME
    """``gen_ai.provider.name`` of the model that served it."""
    input_tokens: int | None = None
    output_tokens: int | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    error_type: str | None = None
    cancelled: bool = False


class GatewayMetrics:
    """The gateway's instruments on one meter, plus an in-process summary for ``/admin/metrics``."""

    def __init__(self, meter: Meter) -> None:
        self.summary = RequestSummary()
        self._token_usage = meter.create_histogram(
            GEN_AI_TOKEN_USAGE, "{token}", "Input and output tokens per request"
        )
        self._gen_ai_duration = meter.create_histogram(
            GEN_AI_SERVER_REQUEST_DURATION, "s", "Time from request to last output token"
        )
        self._ttft = meter.create_histogram(
            GEN_AI_SERVER_TIME_TO_FIRST_TOKEN, "s", "Time to the first output token (queue wait included)"
        )
        self._tpot = meter.create_histogram(
            GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN, "s", "Time per output token after the first"
        )
        self._http_duration = meter.create_histogram(
            HTTP_SERVER_REQUEST_DURATION, "s", "Duration of HTTP requests (streams: until the last byte)"
        )
        self._requests = meter.create_counter(REQUESTS, "{request}", "HTTP requests by route, model, status")
        self._cancelled = meter.create_counter(
            REQUESTS_CANCELLED, "{request}", "Requests whose client went away before the response ended"
        )
        self._queue_length = meter.create_gauge(QUEUE_LENGTH, "{request}", "Requests waiting for a slot")
        self._queue_wait = meter.create_histogram(
            QUEUE_WAIT, "s", "How long queued requests waited for a slot"
        )
        self._queue_rejections = meter.create_counter(
            QUEUE_REJECTIONS, "{request}", "Requests refused because the queue was full or the wait too long"
        )
        self._slots_busy = meter.create_gauge(SLOTS_BUSY, "{slot}", "Slots running a request")
        self._cache = meter.create_counter(CACHE_REQUESTS, "{request}", "Response cache lookups by outcome")
        self._rate_limited = meter.create_counter(
            RATE_LIMIT_REJECTIONS, "{request}", "Requests refused by a rate limit"
        )
        self._engine_errors = meter.create_counter(ENGINE_ERRORS, "{error}", "Engine failures by type")
        self._redis_errors = meter.create_counter(
            REDIS_ERRORS, "{error}", "Redis failures by component and operation"
        )
        self._kv_sources: dict[str, Callable[[], KVCacheStats]] = {}
        kv_instruments: list[tuple[str, str, str, Callable[[KVCacheStats], int], bool]] = [
            (KV_CACHE_SIZE, "By", "Bytes of KV state kept in host memory", lambda s: s.size_bytes, False),
            (KV_CACHE_CAPACITY, "By", "Bound of the host-memory KV cache", lambda s: s.capacity_bytes, False),
            (KV_CACHE_ENTRIES, "{sequence}", "Sequences kept in host memory", lambda s: s.entries, False),
            (KV_CACHE_HITS, "{request}", "Requests given a kept sequence", lambda s: s.hits, True),
            (KV_CACHE_MISSES, "{request}", "Requests that found no kept sequence", lambda s: s.misses, True),
            (KV_CACHE_EVICTIONS, "{sequence}", "Kept sequences dropped", lambda s: s.evictions, True),
        ]  # fmt: skip
        for name, unit, description, read, monotonic in kv_instruments:
            create = meter.create_observable_counter if monotonic else meter.create_observable_gauge
            create(name, [self._kv_callback(read)], unit, description)

    # --- engine.pool.PoolObserver ----------------------------------------------------------------
    def queue_changed(self, model: str, length: int) -> None:
        """The number of requests waiting for one of ``model``'s slots changed."""
        self._queue_length.set(length, {ATTR_MODEL: model})

    def queue_waited(self, model: str, seconds: float) -> None:
        """A queued request got a slot after ``seconds``."""
        self._queue_wait.record(seconds, {ATTR_MODEL: model})

    def slots_changed(self, model: str, busy: int) -> None:
        """The number of ``model``'s busy slots changed."""
        self._slots_busy.set(busy, {ATTR_MODEL: model})

    # --- hooks for the other parts of the gateway -------------------------------------------------
    def cache_outcome(self, outcome: CacheOutcome, tier: str | None = None) -> None:
        """One response-cache lookup: ``hit``, ``miss`` or ``bypass`` (not cacheable, or cache down).

        A hit also carries ``tier``: where it was answered from (``local``: the process's copy in front of
        Redis; ``redis``; ``memory``: the in-process backend).
        """
        self._cache.add(1, {"outcome": outcome} if tier is None else {"outcome": outcome, "tier": tier})
        self.summary.cache[outcome] += 1

    def rate_limited(self, kind: str) -> None:
        """A request refused by a rate limit; ``kind`` names the limit (``requests``, ``tokens``)."""
        self._rate_limited.add(1, {"limit": kind})
        self.summary.rate_limited += 1

    def redis_error(self, component: str, operation: str) -> None:
        """A Redis call failed (``component``: ``cache``, ``ratelimit``, ...; ``operation``: ``get``, ...)."""
        self._redis_errors.add(1, {"component": component, "operation": operation})
        self.summary.redis_errors += 1

    def engine_error(self, model: str | None, error_type: str) -> None:
        """The engine failed (``error_type``: the engine error's class name)."""
        self._engine_errors.add(1, {ATTR_MODEL: model or "", ATTR_ERROR_TYPE: error_type})
        self.summary.engine_errors += 1

    def queue_rejected(self, model: str | None, reason: Literal["full", "timeout"]) -> None:
        """A request was refused a slot: the queue was full, or it waited too long."""
        self._queue_rejections.add(1, {ATTR_MODEL: model or "", "reason": reason})

    def model_unloaded(self, model: str) -> None:
        """A model was unloaded: its slots and queue read zero, its KV cache is no longer observed."""
        self.queue_changed(model, 0)
        self.slots_changed(model, 0)
        self._kv_sources.pop(model, None)

    def watch_kv_cache(self, model: str, stats: Callable[[], KVCacheStats]) -> None:
        """Observe ``model``'s host-memory KV cache: ``stats`` (the engine's ``kv_cache_stats``) is
        read at each collection, until ``model_unloaded``."""
        self._kv_sources[model] = stats

    def _kv_callback(
        self, read: Callable[[KVCacheStats], int]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(read(stats()), {ATTR_MODEL: model}) for model, stats in self._kv_sources.items()
            ]

        return callback

    def request_finished(self, outcome: RequestOutcome) -> None:
        """Record one finished HTTP request."""
        http_attrs: dict[str, str | int] = {
            ATTR_ROUTE: outcome.route,
            ATTR_METHOD: outcome.method,
            ATTR_STATUS: outcome.status,
        }
        self._http_duration.record(outcome.duration_s, http_attrs)
        self._requests.add(1, {**http_attrs, ATTR_MODEL: outcome.model or ""})
        if outcome.cancelled:
            self._cancelled.add(1, {ATTR_ROUTE: outcome.route, ATTR_MODEL: outcome.model or ""})
        self.summary.add(outcome)
        if outcome.operation is None or outcome.model is None:
            return
        attrs: dict[str, str] = {
            ATTR_OPERATION: outcome.operation,
            ATTR_PROVIDER: outcome.provider,
            ATTR_REQUEST_MODEL: outcome.request_model or outcome.model,
            ATTR_RESPONSE_MODEL: outcome.model,
        }
        error = outcome.error_type or (str(outcome.status) if outcome.status >= 400 else None)
        if outcome.cancelled:
            error = "cancelled"
        self._gen_ai_duration.record(
            outcome.duration_s, {**attrs, ATTR_ERROR_TYPE: error} if error else attrs
        )
        if error is not None:
            return
        if outcome.input_tokens is not None:
            self._token_usage.record(outcome.input_tokens, {**attrs, ATTR_TOKEN_TYPE: "input"})
        if outcome.output_tokens is not None and outcome.operation != "embeddings":
            self._token_usage.record(outcome.output_tokens, {**attrs, ATTR_TOKEN_TYPE: "output"})
        if outcome.ttft_s is not None:
            self._ttft.record(outcome.ttft_s, attrs)
        if outcome.tpot_s is not None:
            self._tpot.record(outcome.tpot_s, attrs)
