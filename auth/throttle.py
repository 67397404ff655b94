"""Login throttling: after repeated failures for one username or one client, refuse for a while."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable


class LoginThrottle:
    """In-process sliding window of failures per username and per client address.

    One address may hold many users (NAT, a proxy), so it gets ``client_factor`` times the room of
    one username.
    """

    def __init__(
        self,
        max_failures: int = 5,
        window_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        client_factor: int = 4,
    ) -> None:
        self.max_failures = max_failures
        self.max_client_failures = max_failures * client_factor
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, key: str) -> deque[float]:
        failures = self._failures[key]
        horizon = self._clock() - self.window_s
        while failures and failures[0] <= horizon:
            failures.popleft()
        return failures

    def retry_after(self, username: str, client: str) -> int:
        """Seconds until a login may be tried again (0: allowed now)."""
        wait = 0.0
        for key, limit in (
            (f"user:{username.lower()}", self.max_failures),
            (f"client:{client}", self.max_client_failures),
        ):
            failures = self._recent(key)
            if len(failures) >= limit:
                wait = max(wait, failures[0] + self.window_s - self._clock())
        return int(wait) + 1 if wait > 0 else 0

    def failed(self, username: str, client: str) -> None:
        """Count a failed attempt."""
        now = self._clock()
        self._recent(f"user:{username.lower()}").append(now)
        self._recent(f"client:{client}").append(now)

    def succeeded(self, username: str) -> None:
        """A successful login clears the username's failures."""
        self._failures.pop(f"user:{username.lower()}", None)
