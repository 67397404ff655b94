"""Login throttling: progressive delays per (address, user), a failure limit per address, a bound on
concurrent password hashes.

The policy (``ThrottlePolicy``):

- Per (client address, username): the first ``free_failures`` failed logins cost nothing; after that
  each attempt must wait ``base_delay_s * 2**(failures - free_failures)`` seconds (at most
  ``max_delay_s``) after the previous one. The owner logging in from another address is not slowed down
  by someone guessing their password elsewhere: there is no lock-out of a user as such. The count is
  forgotten after ``window_s`` without an attempt, and cleared by a successful login.
- Per client address: at most ``max_client_failures`` failed logins within a sliding ``window_s``,
  whatever the usernames (password spraying from one address).
- An attempt is counted as a failure *before* the password is checked, in the same step as the check
  (atomically), and a success takes it back; so parallel guesses cannot slip past the delay.

Backends: ``LoginThrottle`` (in process, in memory) and ``auth.redis_throttle.RedisLoginThrottle``
(shared by every replica); ``FallbackLoginThrottle`` uses the shared one and falls back to the local one
while Redis is down. ``PasswordHashGate`` bounds the scrypt hashes that run at once (each holds
``128 * n * r`` bytes: 128 MiB at OWASP's parameters) and refuses at once beyond it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from auth.errors import LoginBusyError

logger = logging.getLogger("pocketllm.auth.throttle")


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    """How logins are throttled (see the module documentation).

    Attributes:
        free_failures: failures per (address, user) before delays start.
        window_s: how long a failure counts (per address), and the quiet time after which a pair's
            count is forgotten.
        base_delay_s: the first delay.
        max_delay_s: the longest delay.
        max_client_failures: failures per address within ``window_s``; 4 x ``free_failures`` when None,
            because many users may share an address (NAT, a proxy).
    """

    free_failures: int = 5
    window_s: float = 300.0
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    max_client_failures: int | None = None

    def __post_init__(self) -> None:
        """Refuse nonsense limits."""
        if (
            self.free_failures < 1
            or self.window_s <= 0
            or self.base_delay_s <= 0
            or self.max_delay_s < self.base_delay_s
            or (self.max_client_failures is not None and self.max_client_failures < 1)
        ):
            raise ValueError("throttle limits must be at least 1, and the window and delays positive")

    @property
    def client_limit(self) -> int:
        """Failures per address within the window."""
        return 4 * self.free_failures if self.max_client_failures is None else self.max_client_failures

    def delay(self, failures: int) -> float:
        """The wait after the previous attempt of a pair with this many failures."""
        if failures < self.free_failures:
            return 0.0
        return min(self.base_delay_s * 2.0 ** min(failures - self.free_failures, 64), self.max_delay_s)


@dataclass(frozen=True, slots=True)
class ThrottleDecision:
    """The answer of ``attempt``.

    Attributes:
        blocked: whether the login must be refused without checking the password.
        retry_after: whole seconds until it may be tried again (0 when not blocked).
        ticket: identifies the counted attempt (a success takes it back).
        backend: the throttle that counted it.
    """

    blocked: bool
    retry_after: int
    ticket: str = ""
    backend: str = ""


def blocked_for(wait_s: float) -> ThrottleDecision:
    """A refusal for ``wait_s`` seconds (rounded up to whole seconds, never 0)."""
    return ThrottleDecision(True, max(1, math.ceil(wait_s)))


class ThrottleBackendError(ConnectionError):
    """A shared throttle's backend cannot be reached (the fallback takes over)."""


class Throttle(Protocol):
    """What the authenticator needs of a login throttle."""

    name: str

    async def attempt(self, username: str, client: str) -> ThrottleDecision:
        """Whether a login may be tried now; when it may, it is counted as a failure until
        ``succeeded``."""
        ...

    async def succeeded(self, username: str, client: str, decision: ThrottleDecision) -> None:
        """Take back an allowed attempt's failure and forget the pair's count."""
        ...


def pair_key(username: str, client: str) -> str:
    """The throttle's key of an (address, user) pair (names compare case-insensitively)."""
    return f"{client}\0{username.casefold()}"


class LoginThrottle:
    """The throttle in this process's memory (one replica; a restart forgets).

    Memory is bounded: a refused attempt creates nothing, pairs and addresses are pruned as they age
    out, and past ``max_entries`` of either the oldest are dropped first.
    """

    name = "memory"

    def __init__(
        self,
        free_failures: int = 5,
        window_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        max_client_failures: int | None = None,
        max_entries: int = 100_000,
        *,
        policy: ThrottlePolicy | None = None,
    ) -> None:
        """Configure the throttle.

        Args:
            free_failures: ``ThrottlePolicy.free_failures``.
            window_s: ``ThrottlePolicy.window_s``.
            clock: seconds (monotonic; injectable for tests).
            max_client_failures: ``ThrottlePolicy.max_client_failures``.
            max_entries: how many pairs and addresses are tracked at most (each).
            policy: the whole policy (instead of the three fields above).
        """
        self.policy = policy or ThrottlePolicy(
            free_failures, window_s, max_client_failures=max_client_failures
        )
        self.max_entries = max_entries
        self._clock = clock
        self._pairs: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._clients: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()

    def _pair(self, key: str, now: float) -> tuple[int, float]:
        state = self._pairs.get(key)
        if state is not None and now - state[1] >= self.policy.window_s:
            del self._pairs[key]
            return 0, 0.0
        return state or (0, 0.0)

    def _client(self, client: str, now: float) -> deque[tuple[float, str]]:
        failures = self._clients.get(client)
        if failures is None:
            return deque()
        horizon = now - self.policy.window_s
        while failures and failures[0][0] <= horizon:
            failures.popleft()
        if not failures:
            del self._clients[client]
        return failures

    async def attempt(self, username: str, client: str) -> ThrottleDecision:
        """See ``Throttle.attempt``."""
        return self.attempt_now(username, client)

    def attempt_now(self, username: str, client: str) -> ThrottleDecision:
        """``attempt`` without the event loop (one atomic step: nothing awaits in between)."""
        now = self._clock()
        key = pair_key(username, client)
        failures, last = self._pair(key, now)
        wait = last + self.policy.delay(failures) - now if failures else 0.0
        recent = self._client(client, now)
        limit = self.policy.client_limit
        if len(recent) >= limit:
            wait = max(wait, recent[-limit][0] + self.policy.window_s - now)
        if wait > 0:
            return blocked_for(wait)
        ticket = uuid.uuid4().hex
        self._pairs[key] = (failures + 1, now)
        self._pairs.move_to_end(key)
        recent.append((now, ticket))
        self._clients[client] = recent
        self._clients.move_to_end(client)
        for table in (self._pairs, self._clients):
            while len(table) > self.max_entries:
                table.popitem(last=False)
        return ThrottleDecision(False, 0, ticket, self.name)

    async def succeeded(self, username: str, client: str, decision: ThrottleDecision) -> None:
        """See ``Throttle.succeeded``."""
        self._pairs.pop(pair_key(username, client), None)
        recent = self._clients.get(client)
        if recent is not None:
            for item in recent:
                if item[1] == decision.ticket:
                    recent.remove(item)
                    break
            if not recent:
                del self._clients[client]

    def tracked(self) -> int:
        """How many pairs and addresses currently hold failures (for tests and metrics)."""
        return len(self._pairs) + len(self._clients)


class FallbackLoginThrottle:
    """The shared throttle while it answers, the local one while it does not (never raises).

    During an outage each replica throttles on its own: the limits hold per replica instead of across
    them. The shared throttle is tried again ``retry_after_s`` after a failure; a warning is logged
    once per outage.
    """

    def __init__(self, primary: Throttle, fallback: Throttle, retry_after_s: float = 1.0) -> None:
        """Combine two throttles (their ``name`` must differ: a decision names the one that counted it).

        Args:
            primary: the shared throttle; may raise ``ThrottleBackendError``.
            fallback: the local throttle; must not raise.
            retry_after_s: how long the primary is skipped after a failure.
        """
        if primary.name == fallback.name:
            raise ValueError("the primary and the fallback throttle need different names")
        self.primary = primary
        self.fallback = fallback
        self.name = f"{primary.name}+{fallback.name}"
        self.retry_after_s = retry_after_s
        self._skip_until = 0.0
        self.in_outage = False

    def _failed(self, operation: str, error: ThrottleBackendError) -> None:
        self._skip_until = time.monotonic() + self.retry_after_s
        if not self.in_outage:
            self.in_outage = True
            logger.warning(
                "login throttle (%s) unavailable (%s: %s); throttling in this process, retrying every %.1fs",
                self.primary.name,
                operation,
                error,
                self.retry_after_s,
            )

    async def attempt(self, username: str, client: str) -> ThrottleDecision:
        """See ``Throttle.attempt``."""
        if time.monotonic() >= self._skip_until:
            try:
                decision = await self.primary.attempt(username, client)
            except ThrottleBackendError as exc:
                self._failed("attempt", exc)
            else:
                if self.in_outage:
                    self.in_outage = False
                    logger.info("login throttle (%s) recovered", self.primary.name)
                return decision
        return await self.fallback.attempt(username, client)

    async def succeeded(self, username: str, client: str, decision: ThrottleDecision) -> None:
        """See ``Throttle.succeeded``: at the throttle that counted the attempt."""
        if decision.backend != self.primary.name:
            await self.fallback.succeeded(username, client, decision)
            return
        try:
            await self.primary.succeeded(username, client, decision)
        except ThrottleBackendError as exc:
            self._failed("succeeded", exc)


class PasswordHashGate:
    """At most ``limit`` password hashes at once in this process; beyond it a login is refused at once
    (``LoginBusyError``) instead of queueing memory-hungry work."""

    def __init__(self, limit: int = 2) -> None:
        """Set the bound.

        Args:
            limit: hashes at once (each holds 128 MiB at OWASP's scrypt parameters).
        """
        if limit < 1:
            raise ValueError("the hash limit must be at least 1")
        self.limit = limit
        self.running = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the slots for the duration of the block.

        Raises:
            LoginBusyError: every slot is taken.
        """
        if self.running >= self.limit:
            raise LoginBusyError(1)
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
