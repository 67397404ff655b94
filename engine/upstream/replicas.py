"""The replicas of one upstream model: their health, and which one takes the next request.

- **Choice**: among healthy replicas with room (``max_concurrency``), the one with the fewest requests in
  flight (least outstanding requests).
- **Stickiness**: a request with an affinity key (``X-Session-Id``, the ``/chat`` session,
  ``prompt_cache_key``) goes to the replica that rendezvous (highest-random-weight) hashing picks among the
  healthy ones, so a session stays on one replica, and its KV cache there is reused, for as long as that
  replica is healthy; when it is ejected only its own sessions move, and they come back when it returns.
- **Passive ejection**: a connect error, a first-byte timeout or a 502/503/504 ejects a replica at once;
  other 5xx after ``EJECT_AFTER_5XX`` in a row.
- **Ejection ends waits**: a request sent to a replica that has not had its first byte yet registers a
  callback (``begin_wait``); ejecting the replica calls it, so the request gives up at once and is retried
  on another replica (nothing has reached its client). Streams already under way are left alone.
- **Re-admission**: the active health check (``UpstreamModel``) probes ejected replicas and re-admits one
  that answers.
- When every replica is ejected, requests still try them (each once) rather than failing on state that
  may be stale: a replica that is back serves at once, before its next probe.

Everything here runs on the event loop; no locks are needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

ReplicaState = Literal["healthy", "ejected"]
EJECT_AFTER_5XX = 3


@dataclass(eq=False)
class Replica:
    """One upstream server."""

    index: int
    url: str
    """Base URL including ``/v1``, without a trailing slash."""
    max_concurrency: int = 0
    state: ReplicaState = "healthy"
    outstanding: int = 0
    requests: int = 0
    failures: int = 0
    """Failures counted against this replica in total."""
    consecutive_5xx: int = 0
    ejected_at: float | None = None
    last_error: str | None = None
    """What ejected it (a kind such as ``connect``, ``timeout``, ``status 503``), never a message."""
    _hash_key: bytes = field(default=b"", repr=False)
    _waiting: dict[Callable[[], None], float] = field(default_factory=dict, repr=False)
    """Requests waiting for their first byte here: the callback that ends each wait, and when it began."""

    @property
    def host(self) -> str:
        """``host:port`` (what /health shows; no path, no credentials)."""
        parts = urlsplit(self.url)
        return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else ""

    @property
    def has_room(self) -> bool:
        """Whether another request may start here now."""
        return not self.max_concurrency or self.outstanding < self.max_concurrency

    def longest_wait(self, now: float) -> float:
        """Seconds (to ``now``, from ``time.monotonic``) the oldest request still waiting for its first byte
        here has waited; 0 when none waits."""
        return now - min(self._waiting.values()) if self._waiting else 0.0

    def weight(self, key: str) -> bytes:
        """This replica's rendezvous weight for ``key`` (the highest wins)."""
        return hashlib.blake2b(key.encode(), key=self._hash_key, digest_size=8).digest()


class ReplicaSet:
    """The replicas of one upstream model and their state."""

    def __init__(self, urls: Sequence[str], max_concurrency: int = 0) -> None:
        self.replicas = [
            Replica(index, url.rstrip("/"), max_concurrency, _hash_key=url.rstrip("/").encode()[:64])
            for index, url in enumerate(urls)
        ]
        self._room = asyncio.Event()

    @property
    def outstanding(self) -> int:
        """Requests in flight on every replica."""
        return sum(r.outstanding for r in self.replicas)

    @property
    def healthy(self) -> list[Replica]:
        """Replicas taking requests."""
        return [r for r in self.replicas if r.state == "healthy"]

    def choose(self, key: str | None, exclude: AbstractSet[int] = frozenset()) -> Replica | None:
        """The replica for the next request, or ``None`` when every candidate is at its limit.

        Candidates: healthy replicas not in ``exclude`` (those already tried for this request); when there
        is none, the ejected ones not tried (their state may be stale). Raises ``LookupError`` when no
        replica is left to try at all.
        """
        candidates = [r for r in self.replicas if r.index not in exclude and r.state == "healthy"]
        if not candidates:
            candidates = [r for r in self.replicas if r.index not in exclude]
        if not candidates:
            raise LookupError("every replica was tried")
        if key is not None:
            ranked = sorted(candidates, key=lambda r: r.weight(key), reverse=True)
            return next((r for r in ranked if r.has_room), None)
        roomy = [r for r in candidates if r.has_room]
        if not roomy:
            return None
        return min(roomy, key=lambda r: (r.outstanding, r.requests, r.index))

    async def acquire(self, key: str | None, exclude: AbstractSet[int], timeout_s: float) -> Replica:
        """``choose``, waiting up to ``timeout_s`` for room; the replica's count is taken.

        Raises:
            LookupError: no replica is left to try.
            TimeoutError: every candidate stayed at its concurrency limit.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            replica = self.choose(key, exclude)
            if replica is not None:
                replica.outstanding += 1
                replica.requests += 1
                return replica
            self._room.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                await self._room.wait()

    def release(self, replica: Replica) -> None:
        """The request on ``replica`` ended (whatever the outcome)."""
        replica.outstanding -= 1
        self._room.set()

    def succeeded(self, replica: Replica) -> None:
        """``replica`` answered (its first byte arrived)."""
        replica.consecutive_5xx = 0

    def failed(self, replica: Replica, kind: str, *, eject: bool = True) -> None:
        """``replica`` failed with ``kind`` (``connect``, ``timeout``, ``status 503``...); ``eject``: at
        once, else only after ``EJECT_AFTER_5XX`` such failures in a row."""
        replica.failures += 1
        replica.last_error = kind
        if not eject:
            replica.consecutive_5xx += 1
            if replica.consecutive_5xx < EJECT_AFTER_5XX:
                return
        self.eject(replica)

    def eject(self, replica: Replica) -> None:
        """Stop sending new requests to ``replica`` until a probe re-admits it, and end the waits of the
        requests there that have not had their first byte (they are retried elsewhere)."""
        if replica.state != "ejected":
            replica.state = "ejected"
            replica.ejected_at = time.monotonic()
        for give_up in list(replica._waiting):
            give_up()
        self._room.set()  # waiters re-choose among the others

    def begin_wait(self, replica: Replica, give_up: Callable[[], None]) -> None:
        """A request on ``replica`` waits for its first byte: ``give_up`` is called if the replica is
        ejected meanwhile (it must only signal the request, never raise), until ``end_wait``."""
        replica._waiting[give_up] = time.monotonic()

    def end_wait(self, replica: Replica, give_up: Callable[[], None]) -> None:
        """The wait registered with ``give_up`` ended (the first byte came, or the request failed); from
        now on an ejection leaves that request alone. Idempotent."""
        replica._waiting.pop(give_up, None)

    def admit(self, replica: Replica) -> None:
        """A probe found ``replica`` answering: it takes requests again."""
        replica.state = "healthy"
        replica.ejected_at = None
        replica.consecutive_5xx = 0
        self._room.set()
