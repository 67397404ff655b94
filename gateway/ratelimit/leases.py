"""Concurrency leases kept alive while their requests run, by one heartbeat per process.

A concurrency slot (a lease) lives ``lease_ttl_s`` unless renewed. ``LeaseKeeper`` wraps the process's
limiter: it remembers every admitted ticket that holds a slot until the ticket is released, and one task
renews all of them every ``interval_s`` (a third of the TTL) in one call (one Redis round trip), however
many requests are in flight. A process that dies stops renewing, so its slots come back within the TTL
instead of being stranded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from gateway.ratelimit.limiter import Decision, RateLimitBackendError, RateLimiter, Subject, Ticket

logger = logging.getLogger("gateway.ratelimit.leases")


class LeaseKeeper:
    """A limiter that renews the leases of its live tickets in the background (see the module)."""

    def __init__(self, limiter: RateLimiter, *, interval_s: float) -> None:
        """Wrap ``limiter``.

        Args:
            limiter: the limiter that issues and renews the leases.
            interval_s: time between two renewals; well under the lease TTL (a third of it), so that one
                late or failed renewal does not lose a lease.
        """
        self.inner = limiter
        self.name = limiter.name
        self.interval_s = interval_s
        self._live: dict[str, Ticket] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def live(self) -> int:
        """Tickets holding a lease that this process renews."""
        return len(self._live)

    async def acquire(self, subjects: Sequence[Subject], *, tokens: int) -> Decision:
        """Acquire at the wrapped limiter; an admitted ticket with a slot is renewed until released."""
        decision = await self.inner.acquire(subjects, tokens=tokens)
        ticket = decision.ticket
        if ticket is not None and ticket.holds_lease:
            self._live[ticket.id] = ticket
            self._start()
        return decision

    async def release(self, ticket: Ticket, *, used_tokens: int) -> None:
        """Stop renewing the ticket, then release it at the wrapped limiter."""
        self._live.pop(ticket.id, None)
        await self.inner.release(ticket, used_tokens=used_tokens)

    async def renew(self, tickets: Sequence[Ticket]) -> list[str]:
        """Renew at the wrapped limiter (the heartbeat calls ``renew_live`` instead)."""
        return await self.inner.renew(tickets)

    async def renew_live(self) -> None:
        """One heartbeat: renew every live lease in one call; forget the ones found lost."""
        if not self._live:
            return
        try:
            lost = await self.inner.renew(list(self._live.values()))
        except RateLimitBackendError as exc:  # a bare shared limiter (a fallback never raises)
            logger.warning("renewing %d concurrency leases failed: %s", len(self._live), exc)
            return
        forgotten = sum(self._live.pop(ticket_id, None) is not None for ticket_id in lost)
        if forgotten:
            logger.warning(
                "%d concurrency leases expired before their requests ended (renewals were late, or the "
                "limiter lost them in an outage); those requests run on without holding a slot",
                forgotten,
            )

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._heartbeat
        if task is None or task.done() or task.get_loop() is not loop:
            self._heartbeat = loop.create_task(self._beat(), name="pocketllm-lease-heartbeat")

    async def _beat(self) -> None:
        while self._live:  # ends when nothing is held; the next admission starts it again
            await asyncio.sleep(self.interval_s)
            try:
                await self.renew_live()
            except Exception:  # keep beating: the next renewal may succeed
                logger.exception("renewing concurrency leases failed")

    async def close(self) -> None:
        """Stop the heartbeat (leases still held then expire within their TTL) and close the limiter."""
        task, self._heartbeat = self._heartbeat, None
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.inner.close()
