"""The in-process rate limiter: sliding-window logs in dicts (one gateway process, or Redis's fallback)."""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.ratelimit.limiter import (
    Decision,
    Subject,
    SubjectCheck,
    Ticket,
    compose_decision,
    refusals,
)


@dataclass(slots=True)
class _Windows:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, str]] = field(default_factory=deque)
    amounts: dict[str, int] = field(default_factory=dict)
    token_total: int = 0
    leases: dict[str, float] = field(default_factory=dict)
    """Ticket id -> when the lease expires on its own."""

    def prune(self, now: float, window_s: float) -> None:
        horizon = now - window_s
        while self.requests and self.requests[0] <= horizon:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= horizon:
            self.token_total -= self.amounts.pop(self.tokens.popleft()[1], 0)
        for ticket_id in [t for t, expires in self.leases.items() if expires <= now]:
            del self.leases[ticket_id]

    def empty(self) -> bool:
        return not (self.requests or self.tokens or self.leases)

    def check(self, now: float, window_s: float, rpm: int | None, tpm: int | None, cost: int) -> SubjectCheck:
        requests_retry = 0.0
        if rpm is not None and len(self.requests) >= rpm:
            requests_retry = (
                window_s if rpm == 0 else self.requests[len(self.requests) - rpm] + window_s - now
            )
        tokens_retry = 0.0
        if tpm is not None and self.token_total + cost > tpm:
            tokens_retry = window_s
            if cost <= tpm:
                need, freed = self.token_total + cost - tpm, 0
                for at, ticket_id in self.tokens:
                    freed += self.amounts.get(ticket_id, 0)
                    if freed >= need:
                        tokens_retry = at + window_s - now
                        break
        return SubjectCheck(
            in_flight=len(self.leases),
            requests=len(self.requests),
            requests_retry_s=requests_retry,
            requests_reset_s=self.requests[-1] + window_s - now if self.requests else 0.0,
            tokens=self.token_total,
            tokens_retry_s=tokens_retry,
            tokens_reset_s=self.tokens[-1][0] + window_s - now if self.tokens else 0.0,
        )


class MemoryRateLimiter:
    """Exact sliding-window limits for one process. Never raises."""

    name = "memory"

    def __init__(
        self,
        *,
        window_s: float = 60.0,
        lease_ttl_s: float = 6.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create an empty limiter.

        Args:
            window_s: the window of ``rpm``/``tpm`` (60 s: per minute).
            lease_ttl_s: a concurrency slot neither renewed nor released within this is freed anyway.
            clock: monotonic seconds (injectable for tests).
        """
        self.window_s = window_s
        self.lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._windows: dict[str, _Windows] = {}
        self._calls = 0

    def _sweep(self, now: float) -> None:
        """Forget subjects whose windows are empty (so idle keys do not accumulate)."""
        for subject_id, window in list(self._windows.items()):
            window.prune(now, self.window_s)
            if window.empty():
                del self._windows[subject_id]

    async def acquire(self, subjects: Sequence[Subject], *, tokens: int) -> Decision:
        """Admit the request if every limit of every subject allows ``tokens`` more."""
        now = self._clock()
        self._calls += 1
        if self._calls % 1024 == 0:
            self._sweep(now)
        windows = [self._windows.setdefault(s.id, _Windows()) for s in subjects]
        checks = []
        for subject, window in zip(subjects, windows, strict=True):
            window.prune(now, self.window_s)
            checks.append(window.check(now, self.window_s, subject.limits.rpm, subject.limits.tpm, tokens))
        admitted = not any(refusals(s.limits, c, tokens) for s, c in zip(subjects, checks, strict=True))
        ticket = None
        if admitted:
            ticket = Ticket(uuid.uuid4().hex, tuple(subjects), tokens, self.name)
            for subject, window in zip(subjects, windows, strict=True):
                spec = subject.limits
                if spec.rpm is not None:
                    window.requests.append(now)
                if spec.tpm is not None:
                    window.tokens.append((now, ticket.id))
                    window.amounts[ticket.id] = tokens
                    window.token_total += tokens
                if spec.concurrency is not None:
                    window.leases[ticket.id] = now + self.lease_ttl_s
        return compose_decision(subjects, checks, tokens=tokens, window_s=self.window_s, ticket=ticket)

    async def release(self, ticket: Ticket, *, used_tokens: int) -> None:
        """Free the ticket's slot and charge ``used_tokens`` instead of the reservation."""
        for subject in ticket.subjects:
            window = self._windows.get(subject.id)
            if window is None:
                continue
            window.leases.pop(ticket.id, None)
            if ticket.id in window.amounts:
                window.token_total += used_tokens - window.amounts[ticket.id]
                window.amounts[ticket.id] = used_tokens

    async def renew(self, tickets: Sequence[Ticket]) -> list[str]:
        """Extend the live leases of ``tickets`` to ``lease_ttl_s`` from now; the ids of the lost ones."""
        now = self._clock()
        lost = []
        for ticket in tickets:
            held = True
            for subject in ticket.subjects:
                if subject.limits.concurrency is None:
                    continue
                window = self._windows.get(subject.id)
                if window is not None and window.leases.get(ticket.id, now) > now:
                    window.leases[ticket.id] = now + self.lease_ttl_s
                else:
                    held = False
                    if window is not None:
                        window.leases.pop(ticket.id, None)
            if not held:
                lost.append(ticket.id)
        return lost

    async def close(self) -> None:
        """Nothing to release."""
