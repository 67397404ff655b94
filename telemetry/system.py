"""Process and host statistics from psutil, observed through observable instruments.

One sample is taken at most every ``min_interval_s`` and shared by every instrument callback and by
``/admin/metrics``, so a scrape costs a handful of cheap system calls.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import psutil
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from telemetry import metrics as names


@dataclass(frozen=True, slots=True)
class SystemSample:
    """One reading of the process and the host."""

    process_cpu_user_s: float
    process_cpu_system_s: float
    process_cpu_percent: float
    """CPU use since the previous sample, in percent of one core (may exceed 100 with threads)."""
    process_rss_bytes: int
    process_threads: int
    process_open_fds: int
    system_cpu_percent: float
    """Host CPU use since the previous sample, in percent of all cores."""
    system_memory_total_bytes: int
    system_memory_used_bytes: int
    system_memory_percent: float
    cpu_count: int


_Reader = Callable[[SystemSample], float | int]
_Callback = Callable[[CallbackOptions], Iterable[Observation]]


class SystemSampler:
    """Samples this process and the host with psutil, at most once every ``min_interval_s``."""

    def __init__(self, min_interval_s: float = 1.0) -> None:
        self._process = psutil.Process(os.getpid())
        self._min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._last: SystemSample | None = None
        self._taken = 0.0
        # prime the percent counters: psutil compares each call with the previous one
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)

    def sample(self) -> SystemSample:
        """The latest sample, taken now if the previous one is older than ``min_interval_s``."""
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._taken < self._min_interval_s:
                return self._last
            process = self._process
            with process.oneshot():
                cpu = process.cpu_times()
                sample = SystemSample(
                    process_cpu_user_s=cpu.user,
                    process_cpu_system_s=cpu.system,
                    process_cpu_percent=process.cpu_percent(None),
                    process_rss_bytes=process.memory_info().rss,
                    process_threads=process.num_threads(),
                    process_open_fds=process.num_fds() if hasattr(process, "num_fds") else 0,
                    system_cpu_percent=psutil.cpu_percent(None),
                    system_memory_total_bytes=(memory := psutil.virtual_memory()).total,
                    system_memory_used_bytes=memory.total - memory.available,
                    system_memory_percent=memory.percent,
                    cpu_count=psutil.cpu_count() or 1,
                )
            self._last, self._taken = sample, now
            return sample

    def snapshot(self) -> dict[str, float | int]:
        """The latest sample as JSON-ready data."""
        return asdict(self.sample())

    def register(self, meter: Meter) -> None:
        """Create the observable instruments reading this sampler on ``meter``."""
        meter.create_observable_counter(
            names.PROCESS_CPU_TIME, [self._cpu_time], "s", "CPU time of the gateway process"
        )
        meter.create_observable_gauge(
            names.PROCESS_CPU_UTILIZATION,
            [self._gauge(lambda s: s.process_cpu_percent / 100 / s.cpu_count)],
            "1",
            "CPU use of the gateway process, as a fraction of all cores",
        )
        meter.create_observable_gauge(
            names.PROCESS_MEMORY_USAGE,
            [self._gauge(lambda s: s.process_rss_bytes)],
            "By",
            "Resident memory of the gateway process",
        )
        meter.create_observable_gauge(
            names.PROCESS_THREAD_COUNT, [self._gauge(lambda s: s.process_threads)], "{thread}", "Threads"
        )
        meter.create_observable_gauge(
            names.PROCESS_FD_COUNT,
            [self._gauge(lambda s: s.process_open_fds)],
            "{file_descriptor}",
            "Open file descriptors",
        )
        meter.create_observable_gauge(
            names.SYSTEM_CPU_UTILIZATION,
            [self._gauge(lambda s: s.system_cpu_percent / 100)],
            "1",
            "Host CPU use, as a fraction of all cores",
        )
        meter.create_observable_gauge(
            names.SYSTEM_MEMORY_USAGE,
            [self._gauge(lambda s: s.system_memory_used_bytes)],
            "By",
            "Host memory in use (total minus available)",
        )
        meter.create_observable_gauge(
            names.SYSTEM_MEMORY_UTILIZATION,
            [self._gauge(lambda s: s.system_memory_percent / 100)],
            "1",
            "Host memory in use, as a fraction of the total",
        )

    def _cpu_time(self, _: CallbackOptions) -> Iterable[Observation]:
        sample = self.sample()
        return [
            Observation(sample.process_cpu_user_s, {"cpu.mode": "user"}),
            Observation(sample.process_cpu_system_s, {"cpu.mode": "system"}),
        ]

    def _gauge(self, read: _Reader) -> _Callback:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read(self.sample()))]

        return callback
