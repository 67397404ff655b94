"""Login throttling: after repeated failures for one username or one client address, refuse for a while.

In-process and in memory (one gateway process; a restart forgets). Memory is bounded: checking never
creates an entry, entries are pruned as their failures age out, and past ``max_entries`` tracked
names the oldest are dropped first.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ThrottleDecision:
    """The answer of ``LoginThrottle.check``.

    Attributes:
        blocked: whether the login must be refused without checking the password.
        retry_after: whole seconds until it may be tried again (0 when not blocked).
    """

    blocked: bool
    retry_after: int


class LoginThrottle:
    """Sliding window of failed logins per username and per client address."""

    def __init__(
        self,
        max_failures: int = 5,
        window_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        max_client_failures: int | None = None,
        max_entries: int = 100_000,
    ) -> None:
        """Configure the throttle.

        Args:
            max_failures: failures within the window after which a username is blocked.
            window_s: the window, in seconds.
            clock: monotonic seconds (injectable for tests).
            max_client_failures: the same for one client address; 4 x ``max_failures`` when None,
                because many users may share an address (NAT, a proxy) and one of them must not be
                able to lock all the others out with a handful of wrong passwords.
            max_entries: how many usernames and addresses are tracked at most.
        """
        if max_failures < 1 or window_s <= 0 or (max_client_failures is not None and max_client_failures < 1):
            raise ValueError("failure limits must be at least 1 and window_s positive")
        self.max_failures = max_failures
        self.max_client_failures = 4 * max_failures if max_client_failures is None else max_client_failures
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._longest = max(self.max_failures, self.max_client_failures)

    @staticmethod
    def _user_key(username: str) -> str:
        return "user:" + username.casefold()

    @staticmethod
    def _client_key(client: str) -> str:
        return "client:" + client

    def _recent(self, key: str, now: float) -> deque[float] | None:
        failures = self._failures.get(key)
        if failures is None:
            return None
        horizon = now - self.window_s
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return None
        return failures

    def check(self, username: str, client: str) -> ThrottleDecision:
        """Whether a login for ``username`` from ``client`` may be tried now.

        Args:
            username: the name sent (compared case-insensitively).
            client: the client address.

        Returns:
            The decision, with the wait when blocked.
        """
        now = self._clock()
        wait = 0.0
        for key, limit in (
            (self._user_key(username), self.max_failures),
            (self._client_key(client), self.max_client_failures),
        ):
            failures = self._recent(key, now)
            if failures is not None and len(failures) >= limit:
                # blocked until the failure that makes the count reach the limit ages out
                wait = max(wait, failures[-limit] + self.window_s - now)
        if wait <= 0:
            return ThrottleDecision(False, 0)
        return ThrottleDecision(True, max(1, math.ceil(wait)))

    def record_failure(self, username: str, client: str) -> None:
        """Count a failed login against the username and the client address.

        Args:
            username: the name sent.
            client: the client address.
        """
        now = self._clock()
        for key in (self._user_key(username), self._client_key(client)):
            failures = self._recent(key, now)
            if failures is None:
                failures = self._failures[key] = deque(maxlen=self._longest)
            failures.append(now)
            self._failures.move_to_end(key)
        while len(self._failures) > self.max_entries:
            self._failures.popitem(last=False)

    def record_success(self, username: str) -> None:
        """Clear the username's failures after a successful login (the address keeps its count).

        Args:
            username: the name that logged in.
        """
        self._failures.pop(self._user_key(username), None)

    def retry_after(self, username: str, client: str) -> int:
        """Seconds until a login may be tried (0: now); shorthand for ``check(...).retry_after``."""
        return self.check(username, client).retry_after

    def tracked(self) -> int:
        """How many usernames and addresses currently hold failures (for tests and metrics)."""
        return len(self._failures)
