"""A shared limiter that falls back to the in-process one while its backend is down (fail open, locally)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gateway.circuit import Circuit, OnBackendError
from gateway.ratelimit.limiter import Decision, RateLimitBackendError, RateLimiter, Subject, Ticket

logger = logging.getLogger("gateway.ratelimit.limiter")


class FallbackRateLimiter:
    """``primary`` (Redis) while it answers; ``fallback`` (memory) while it does not. Never raises.

    The fallback enforces the same limits per process, so an outage loosens a global limit to a
    per-process one instead of dropping it. Each failure is reported to ``on_backend_error``; a warning
    is logged once per outage; the primary is tried again every ``retry_after_s``.
    """

    def __init__(
        self,
        primary: RateLimiter,
        fallback: RateLimiter,
        *,
        retry_after_s: float = 1.0,
        on_backend_error: OnBackendError | None = None,
    ) -> None:
        """Combine two limiters (their ``name`` must differ: a ticket names the limiter that issued it).

        Args:
            primary: the shared limiter; may raise ``RateLimitBackendError``.
            fallback: the local limiter; must not raise.
            retry_after_s: how long the primary is skipped after a failure.
            on_backend_error: metrics hook, called with ``(operation, error)`` on each primary failure.
        """
        if primary.name == fallback.name:
            raise ValueError("the primary and the fallback limiter need different names")
        self.primary = primary
        self.fallback = fallback
        self.name = f"{primary.name}+{fallback.name}"
        self.circuit = Circuit(
            f"rate limiter ({primary.name})", logger, retry_after_s=retry_after_s, on_error=on_backend_error
        )

    async def acquire(self, subjects: Sequence[Subject], *, tokens: int) -> Decision:
        """Ask the primary, or the fallback while the primary is unavailable."""
        if self.circuit.allow():
            try:
                decision = await self.primary.acquire(subjects, tokens=tokens)
            except RateLimitBackendError as exc:
                self.circuit.failure("acquire", exc)
            else:
                self.circuit.success()
                return decision
        return await self.fallback.acquire(subjects, tokens=tokens)

    async def release(self, ticket: Ticket, *, used_tokens: int) -> None:
        """Release at the limiter that issued the ticket; a failing primary lets its lease expire."""
        if ticket.backend == self.fallback.name:
            await self.fallback.release(ticket, used_tokens=used_tokens)
            return
        try:
            await self.primary.release(ticket, used_tokens=used_tokens)
        except RateLimitBackendError as exc:
            self.circuit.failure("release", exc)
        else:
            self.circuit.success()

    async def renew(self, tickets: Sequence[Ticket]) -> list[str]:
        """Renew each ticket at the limiter that issued it; while the primary fails its leases cannot be
        renewed (they expire there, as after a crash) and none is reported lost."""
        local = [t for t in tickets if t.backend == self.fallback.name]
        shared = [t for t in tickets if t.backend != self.fallback.name]
        lost = await self.fallback.renew(local) if local else []
        if shared:
            try:
                lost += await self.primary.renew(shared)
            except RateLimitBackendError as exc:
                self.circuit.failure("renew", exc)
            else:
                self.circuit.success()
        return lost

    async def close(self) -> None:
        """Close both limiters."""
        await self.primary.close()
        await self.fallback.close()
