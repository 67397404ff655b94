"""An in-process summary of the traffic for ``GET /admin/metrics``: totals and recent-latency percentiles.

Prometheus and OTLP get histograms; people and dashboards reading JSON get p50/p95/p99 computed from the
last ``RECENT`` requests (exact over that window, cheap: a bounded deque sorted on demand).
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from telemetry.metrics import RequestOutcome

RECENT = 2048
"""How many recent generation requests the percentiles are computed over."""
PROBE_ROUTES = frozenset({"/health", "/metrics"})
"""Health checks and scrapes: in the Prometheus counters, not in this summary of the traffic."""


def percentiles(samples: Sequence[float], points: Sequence[int] = (50, 95, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles of ``samples`` (``None`` when there are none), keyed ``p50`` etc."""
    ordered = sorted(samples)
    result: dict[str, float | None] = {}
    for point in points:
        if not ordered:
            result[f"p{point}"] = None
            continue
        rank = max(1, math.ceil(point / 100 * len(ordered)))
        result[f"p{point}"] = round(ordered[rank - 1], 6)
    return result


class RequestSummary:
    """Counts since start-up and a window of recent latencies (updated on the event loop)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.started_at = time.time()
        self.requests = 0
        self.by_status: Counter[str] = Counter()
        self.cancelled = 0
        self.generations = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cache: Counter[str] = Counter({"hit": 0, "miss": 0, "bypass": 0})
        self.rate_limited = 0
        self.redis_errors = 0
        self.engine_errors = 0
        self._latency: deque[float] = deque(maxlen=RECENT)
        self._ttft: deque[float] = deque(maxlen=RECENT)
        self._decode_rate: deque[float] = deque(maxlen=RECENT)

    @property
    def uptime_s(self) -> float:
        """Seconds since start-up."""
        return time.monotonic() - self.started

    def add(self, outcome: RequestOutcome) -> None:
        """Count one finished request."""
        if outcome.route in PROBE_ROUTES:
            return
        self.requests += 1
        self.by_status[f"{outcome.status // 100}xx"] += 1
        self.cancelled += outcome.cancelled
        if outcome.operation is None or outcome.status >= 400 or outcome.cancelled:
            return
        self.generations += 1
        self.input_tokens += outcome.input_tokens or 0
        self.output_tokens += outcome.output_tokens or 0
        self._latency.append(outcome.duration_s)
        if outcome.ttft_s is not None:
            self._ttft.append(outcome.ttft_s)
        if outcome.tpot_s:
            self._decode_rate.append(1.0 / outcome.tpot_s)

    def snapshot(self) -> dict[str, Any]:
        """The summary as JSON-ready data."""
        uptime = self.uptime_s
        errors = sum(n for status, n in self.by_status.items() if status[0] in "45")
        lookups = sum(self.cache.values())
        return {
            "uptime_s": round(uptime, 3),
            "started_at": self.started_at,
            "requests": {
                "total": self.requests,
                "by_status": dict(sorted(self.by_status.items())),
                "errors": errors,
                "server_errors": self.by_status.get("5xx", 0),
                "cancelled": self.cancelled,
                "generations": self.generations,
            },
            "tokens": {
                "input": self.input_tokens,
                "output": self.output_tokens,
                "output_per_s_since_start": round(self.output_tokens / uptime, 3) if uptime > 0 else 0.0,
            },
            "latency_s": {**percentiles(self._latency), "window": len(self._latency)},
            "ttft_s": {**percentiles(self._ttft), "window": len(self._ttft)},
            "decode_tokens_per_s": {**percentiles(self._decode_rate), "window": len(self._decode_rate)},
            "cache": {
                **dict(self.cache),
                "hit_ratio": round(self.cache["hit"] / lookups, 4) if lookups else None,
            },
            "rate_limited": self.rate_limited,
            "engine_errors": self.engine_errors,
            "redis_errors": self.redis_errors,
        }
