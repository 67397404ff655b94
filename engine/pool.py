"""Admission to a model's slots: a bounded FIFO queue with a wait limit, slot choice with affinity.

The pool lives on the event loop; engines run on their own threads. A request first *reserves*
(fails at once when the queue is full), then *waits* for a slot (fails after ``max_wait_s``), runs,
and *releases*. Cancelling a waiting reservation removes it from the queue: it never reaches the engine.

A request that runs in turns (embeddings) reserves again for each turn, behind whoever waits, so that
requests take turns. Only its first turn is admitted (queue bound, wait limit): a later turn is a
``continuation`` that is neither refused nor timed out, so work already done is never thrown away by a
503. Each request has at most one turn waiting, so the queue still holds at most ``max_queue`` new
requests plus the continuations of those already running.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.base import EngineError

MIN_SHARED_PREFIX = 16
"""A cached prefix shorter than this is no reason to pick a slot."""


def _runs(slots: set[int]) -> int:
    """How many runs of adjacent numbers ``slots`` falls into ({0, 1, 3}: two)."""
    return sum(1 for slot in slots if slot - 1 not in slots)


class PoolRefusalError(EngineError):
    """The pool cannot run the request now; ``retry_after`` says when trying again makes sense."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(PoolRefusalError):
    """Every slot is busy and the queue is at its bound."""


class QueueTimeoutError(PoolRefusalError):
    """The request waited longer than the configured limit for a slot."""


class ShuttingDownError(PoolRefusalError):
    """The server is shutting down and gave up waiting for this request (``SlotPool.abort``)."""


class PoolObserver(Protocol):
    """Hooks for metrics (telemetry implements them; the pool imports nothing from it)."""

    def queue_changed(self, model: str, length: int) -> None:
        """The number of waiting requests changed."""

    def queue_waited(self, model: str, seconds: float) -> None:
        """A request left the queue for a slot after ``seconds``."""

    def slots_changed(self, model: str, busy: int) -> None:
        """The number of busy slots changed."""


class _NoObserver:
    def queue_changed(self, model: str, length: int) -> None:
        pass

    def queue_waited(self, model: str, seconds: float) -> None:
        pass

    def slots_changed(self, model: str, busy: int) -> None:
        pass


@dataclass(eq=False)
class Reservation:
    """A request's place in the pool: waiting, then holding a slot, then released."""

    pool: SlotPool
    prompt: Sequence[int]
    session: str | None
    max_wait_s: float | None
    """How long it may wait for a slot; None for a continuation, which waits its turn however long."""
    created: float = field(default_factory=time.monotonic)
    slot: int | None = None
    _future: asyncio.Future[int] | None = None
    _released: bool = False

    async def wait(self) -> int:
        """Wait for a slot (at most the pool's ``max_wait_s`` since the reservation was made, unless it is
        a continuation)."""
        if self.slot is not None:
            return self.slot
        assert self._future is not None
        remaining = None if self.max_wait_s is None else self.max_wait_s - (time.monotonic() - self.created)
        try:
            async with asyncio.timeout(None if remaining is None else max(0.0, remaining)):
                return await asyncio.shield(self._future)
        except TimeoutError:
            self.release()
            raise QueueTimeoutError(
                f"the request waited {self.max_wait_s:g}s for a free slot of {self.pool.model}",
                self.pool.retry_after(),
            ) from None
        except asyncio.CancelledError:
            self.release()
            raise

    def release(self) -> None:
        """Give the slot back, or leave the queue; idempotent."""
        if self._released:
            return
        self._released = True
        self.pool._release(self)


class SlotPool:
    """First come, first served admission to ``slots`` slots with a bounded queue."""

    def __init__(
        self,
        model: str,
        slots: int,
        *,
        max_queue: int,
        max_wait_s: float,
        prefix_match: Callable[[int, Sequence[int]], int] | None = None,
        observer: PoolObserver | None = None,
    ) -> None:
        self.model = model
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self._free: list[int] = list(range(slots))
        self._slots = slots
        self._waiting: deque[Reservation] = deque()
        self._prefix_match = prefix_match
        self._observer: PoolObserver = observer or _NoObserver()
        self._last_session: dict[int, str] = {}
        self._last_used: dict[int, float] = dict.fromkeys(range(slots), 0.0)
        self._idle = asyncio.Event()
        self._idle.set()
        self._aborted: EngineError | None = None

    @property
    def busy(self) -> int:
        """Slots running a request."""
        return self._slots - len(self._free)

    @property
    def waiting(self) -> int:
        """Requests in the queue."""
        return len(self._waiting)

    @property
    def slots(self) -> int:
        """Total slots."""
        return self._slots

    async def drained(self) -> None:
        """Return once no slot is busy and nobody waits."""
        await self._idle.wait()

    def reserve(
        self, prompt: Sequence[int] = (), session: str | None = None, *, continuation: bool = False
    ) -> Reservation:
        """Take a slot now or a place in the queue; raises ``QueueFullError`` when neither is possible.

        Args:
            prompt: the prompt's tokens (slot affinity).
            session: the conversation it continues, if any (slot affinity).
            continuation: a later turn of a request this pool admitted already: it joins the back of the
                queue whatever its length and waits without a limit (it still fails on ``abort``).
        """
        if self._aborted is not None:
            raise self._aborted
        reservation = Reservation(self, prompt, session, None if continuation else self.max_wait_s)
        if self._free and not self._waiting:
            self._assign(reservation)
            return reservation
        if len(self._waiting) >= self.max_queue and not continuation:
            raise QueueFullError(
                f"all {self._slots} slots of {self.model} are busy and the queue is full", self.retry_after()
            )
        reservation._future = asyncio.get_running_loop().create_future()
        self._waiting.append(reservation)
        self._observer.queue_changed(self.model, len(self._waiting))
        return reservation

    def abort(self, reason: str) -> None:
        """Refuse new reservations, fail the queued ones and make running ones stop at their next token.

        Running requests notice through ``raise_if_aborted``, which the generation loop calls per token.
        """
        self._aborted = ShuttingDownError(reason, self.retry_after())
        while self._waiting:
            waiter = self._waiting.popleft()
            if waiter._future is not None and not waiter._future.done():
                waiter._future.set_exception(ShuttingDownError(reason, self.retry_after()))
                waiter._future.exception()  # retrieved: a waiter that went away must not log it
        self._observer.queue_changed(self.model, 0)
        if not self.busy:
            self._idle.set()

    def raise_if_aborted(self) -> None:
        """Raise ``ShuttingDownError`` once ``abort`` was called."""
        if self._aborted is not None:
            raise ShuttingDownError(str(self._aborted), self.retry_after())

    def retry_after(self) -> int:
        """A sensible Retry-After (seconds) for a refused request."""
        return max(1, min(30, int(self.max_wait_s / 4)))

    def _choose(self, reservation: Reservation) -> int:
        """Pick a free slot, keeping KV caches where they are useful and busy slots side by side.

        1. the slot that last ran this session (its cache holds the conversation so far);
        2. the slot whose cache shares the longest prefix with the prompt, if that prefix is at least
           half the prompt (the same system prompt and history: llama-server's similarity rule);
        3. otherwise a slot that holds no other session's conversation.
        Among slots equal so far (for 2, caching within ``MIN_SHARED_PREFIX`` tokens of the best),
        the one that leaves the busy slots in the fewest runs of adjacent slots, then the longest
        prefix, then the least recently used. The batched engine decodes a run of adjacent slots in
        one pass over the weights and each further run in another: two sequences on slots 0 and 2
        take about 10% longer per step than on 0 and 1, three on 0, 1 and 3 15-30% longer than on
        0-1-2, for every step of the request; a few more cached tokens save their prompt pass once.
        """
        free = self._free
        if reservation.session is not None:
            for slot in free:
                if self._last_session.get(slot) == reservation.session:
                    return slot
        busy = set(range(self._slots)).difference(free)
        runs = {slot: _runs(busy | {slot}) for slot in free}
        prompt = reservation.prompt
        if self._prefix_match is not None and prompt:
            scores = {slot: self._prefix_match(slot, prompt) for slot in free}
            top = max(scores.values())
            if top >= max(MIN_SHARED_PREFIX, len(prompt) // 2):
                near = [slot for slot in free if scores[slot] > top - MIN_SHARED_PREFIX]
                return min(near, key=lambda slot: (runs[slot], -scores[slot], self._last_used[slot]))
        return min(free, key=lambda slot: (slot in self._last_session, runs[slot], self._last_used[slot]))

    def _assign(self, reservation: Reservation) -> None:
        slot = self._choose(reservation)
        self._free.remove(slot)
        self._idle.clear()
        reservation.slot = slot
        if reservation.session is not None:
            self._last_session[slot] = reservation.session
        else:
            self._last_session.pop(slot, None)
        self._observer.slots_changed(self.model, self.busy)

    def _release(self, reservation: Reservation) -> None:
        if reservation.slot is None:  # still queued, timed out or cancelled before a slot came
            if reservation in self._waiting:
                self._waiting.remove(reservation)
                self._observer.queue_changed(self.model, len(self._waiting))
            return
        self._last_used[reservation.slot] = time.monotonic()
        self._free.append(reservation.slot)
        reservation.slot = None
        self._observer.slots_changed(self.model, self.busy)
        self._hand_over()
        if not self.busy and not self._waiting:
            self._idle.set()

    def _hand_over(self) -> None:
        while self._free and self._waiting:
            waiter = self._waiting.popleft()
            future = waiter._future
            if future is None or future.done():
                continue
            self._assign(waiter)
            assert waiter.slot is not None
            future.set_result(waiter.slot)
            self._observer.queue_waited(self.model, time.monotonic() - waiter.created)
        self._observer.queue_changed(self.model, len(self._waiting))
