"""Outage tracking for a shared backend: skip it for a moment after a failure, log once per outage."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

OnBackendError = Callable[[str, BaseException], None]
"""Called with the operation name and the error each time a backend call fails (a metrics hook)."""


class Circuit:
    """A small circuit breaker around one backend.

    After a failure the backend is skipped for ``retry_after_s``; then the next call tries it again.
    A warning is logged when an outage starts and an info line when it ends, never once per request.
    """

    def __init__(
        self,
        name: str,
        logger: logging.Logger,
        *,
        retry_after_s: float = 1.0,
        on_error: OnBackendError | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a closed circuit.

        Args:
            name: what the log lines call the backend (e.g. ``"response cache (redis)"``).
            logger: where the outage lines go.
            retry_after_s: how long to skip the backend after a failure.
            on_error: called for every failed call.
            clock: monotonic seconds (injectable for tests).
        """
        self.name = name
        self._logger = logger
        self._retry_after_s = retry_after_s
        self._on_error = on_error
        self._clock = clock
        self._open_until = 0.0
        self.in_outage = False
        self.outages = 0

    def allow(self) -> bool:
        """Whether the backend should be tried now."""
        return not self.in_outage or self._clock() >= self._open_until

    def failure(self, operation: str, error: BaseException) -> None:
        """Record a failed call: open the circuit, log if this starts an outage, call the hook."""
        self._open_until = self._clock() + self._retry_after_s
        if not self.in_outage:
            self.in_outage = True
            self.outages += 1
            self._logger.warning(
                "%s unavailable (%s: %s: %s); bypassing it, retrying every %.1fs",
                self.name,
                operation,
                type(error).__name__,
                error,
                self._retry_after_s,
            )
        if self._on_error is not None:
            self._on_error(operation, error)

    def success(self) -> None:
        """Record a successful call: close the circuit, log the recovery once."""
        if self.in_outage:
            self.in_outage = False
            self._logger.info("%s recovered", self.name)
