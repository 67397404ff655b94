"""Slot admission: FIFO, bounds, waits, cancellation and affinity."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from engine.pool import QueueFullError, QueueTimeoutError, ShuttingDownError, SlotPool


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_first_come_first_served() -> None:
    async def main() -> list[int]:
        pool = SlotPool("m", 1, max_queue=5, max_wait_s=5)
        first = pool.reserve()
        order: list[int] = []

        async def wait(i: int) -> None:
            reservation = pool.reserve()
            await reservation.wait()
            order.append(i)
            await asyncio.sleep(0)
            reservation.release()

        tasks = [asyncio.create_task(wait(i)) for i in range(4)]
        await asyncio.sleep(0.01)
        assert pool.waiting == 4
        first.release()
        await asyncio.gather(*tasks)
        assert pool.busy == 0 and pool.waiting == 0
        return order

    assert run(main()) == [0, 1, 2, 3]


def test_queue_bound_and_wait_limit() -> None:
    async def main() -> None:
        pool = SlotPool("m", 1, max_queue=1, max_wait_s=0.05)
        held = pool.reserve()
        queued = pool.reserve()
        with pytest.raises(QueueFullError):
            pool.reserve()
        with pytest.raises(QueueTimeoutError):
            await queued.wait()
        assert pool.waiting == 0
        held.release()
        assert pool.busy == 0

    run(main())


def test_a_continuation_is_neither_refused_nor_timed_out() -> None:
    async def main() -> None:
        pool = SlotPool("m", 1, max_queue=1, max_wait_s=0.05)
        held = pool.reserve()
        queued = pool.reserve()
        with pytest.raises(QueueFullError):  # a new request: refused
            pool.reserve()
        later_turn = pool.reserve(continuation=True)  # a started request's next turn: queued
        assert pool.waiting == 2
        await asyncio.sleep(0.1)  # past the wait limit
        with pytest.raises(QueueTimeoutError):
            await queued.wait()
        held.release()
        assert await later_turn.wait() == 0
        later_turn.release()
        assert pool.busy == 0 and pool.waiting == 0

    run(main())


def test_cancelled_waiter_never_gets_the_slot() -> None:
    async def main() -> None:
        pool = SlotPool("m", 1, max_queue=5, max_wait_s=5)
        held = pool.reserve()
        cancelled = pool.reserve()
        task = asyncio.create_task(cancelled.wait())
        following = pool.reserve()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.waiting == 1
        held.release()
        assert await following.wait() == 0
        assert cancelled.slot is None
        following.release()
        assert pool.busy == 0

    run(main())


def test_release_is_idempotent() -> None:
    async def main() -> None:
        pool = SlotPool("m", 2, max_queue=0, max_wait_s=1)
        reservation = pool.reserve()
        reservation.release()
        reservation.release()
        assert pool.busy == 0
        pool.reserve()
        pool.reserve()
        with pytest.raises(QueueFullError):
            pool.reserve()

    run(main())


def test_affinity_prefers_session_then_a_long_prefix_then_lru() -> None:
    system = list(range(100, 140))  # a shared 40-token system prompt
    cached = {0: [1, 2, 3], 1: [*system, 7, 8], 2: []}

    def prefix(slot: int, prompt: Sequence[int]) -> int:
        n = 0
        for a, b in zip(cached[slot], prompt, strict=False):
            if a != b:
                break
            n += 1
        return n

    async def main() -> None:
        pool = SlotPool("m", 3, max_queue=0, max_wait_s=1, prefix_match=prefix)
        by_prefix = pool.reserve([*system, 9, 9])
        assert by_prefix.slot == 1  # 40 of 42 tokens cached there
        by_prefix.release()
        session = pool.reserve([5], session="s1")
        slot = session.slot
        session.release()
        # a short shared prefix is no reason to take the session's slot: the LRU other slot is used
        stranger = pool.reserve([1, 2, 3, 4])
        assert stranger.slot != slot
        stranger.release()
        again = pool.reserve([1, 2, 3], session="s1")
        assert again.slot == slot
        again.release()

    run(main())


def test_busy_slots_are_kept_side_by_side() -> None:
    """The batched engine decodes adjacent slots in one pass: a new request joins next to busy ones."""
    system = list(range(100, 140))

    async def main() -> None:
        pool = SlotPool("m", 4, max_queue=0, max_wait_s=1, prefix_match=lambda slot, prompt: 40)
        first = [pool.reserve([*system, i]) for i in range(4)]
        assert [r.slot for r in first] == [0, 1, 2, 3]
        for index in (0, 2, 1, 3):  # least recently used now: 0, then 2, then 1, then 3
            first[index].release()
            await asyncio.sleep(0.001)
        a = pool.reserve([*system, 7])
        b = pool.reserve([*system, 8])
        assert (a.slot, b.slot) == (0, 1)  # LRU alone would have put b on slot 2
        a.release()
        c = pool.reserve([7, 7, 7])  # no shared prefix: a slot next to the busy one, LRU among those
        assert c.slot == 2
        assert pool.busy == 2

    run(main())


def test_a_slightly_longer_cached_prefix_does_not_split_the_busy_slots() -> None:
    cached = {(1, "a"): 40, (3, "a"): 42, (1, "b"): 40, (3, "b"): 60}

    def prefix(slot: int, prompt: Sequence[int]) -> int:
        return cached.get((slot, "ab"[prompt[0]]), 0)

    async def main() -> None:
        pool = SlotPool("m", 4, max_queue=0, max_wait_s=1, prefix_match=prefix)
        running = pool.reserve([])
        assert running.slot == 0
        close_call = pool.reserve([0] * 50)  # 42 tokens cached on slot 3, 40 on slot 1 next to slot 0
        assert close_call.slot == 1
        close_call.release()
        far_better = pool.reserve([1] * 70)  # 60 against 40: the cache wins
        assert far_better.slot == 3

    run(main())


def test_abort_fails_queued_refuses_new_and_flags_running() -> None:
    async def main() -> None:
        pool = SlotPool("m", 1, max_queue=5, max_wait_s=5)
        running = pool.reserve()
        queued = pool.reserve()
        waiter = asyncio.create_task(queued.wait())
        await asyncio.sleep(0.01)
        pool.raise_if_aborted()  # nothing yet
        pool.abort("shutting down")
        with pytest.raises(ShuttingDownError):
            await waiter
        assert pool.waiting == 0
        with pytest.raises(ShuttingDownError):
            pool.reserve()
        with pytest.raises(ShuttingDownError):
            pool.raise_if_aborted()
        queued.release()
        running.release()
        assert pool.busy == 0
        await asyncio.wait_for(pool.drained(), 1)

    run(main())
