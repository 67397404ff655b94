"""One contract for every rate limiter (in-process and a real Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from gateway.ratelimit.leases import LeaseKeeper
from gateway.ratelimit.limiter import LimitSpec, RateLimiter, Subject, format_duration
from gateway.ratelimit.memory import MemoryRateLimiter
from gateway.ratelimit.redis import RedisRateLimiter
from tests.unit.gateway.conftest import client

MakeLimiter = Callable[..., AbstractAsyncContextManager[RateLimiter]]


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request: pytest.FixtureRequest, prefix: str) -> MakeLimiter:
    @asynccontextmanager
    async def make(**options: Any) -> AsyncIterator[RateLimiter]:
        if request.param == "memory":
            yield MemoryRateLimiter(**options)
            return
        redis = client(timeout_s=2.0)  # generous: these tests are about behaviour, not timeouts
        try:
            yield RedisRateLimiter(redis, prefix=prefix, timeout_s=2.0, **options)
        finally:
            await redis.aclose()

    return make


def run(make_limiter: MakeLimiter, body: Callable[[RateLimiter], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        async with make_limiter(**options) as limiter:
            await body(limiter)
            await limiter.close()

    asyncio.run(main())


def subject(
    rpm: int | None = None, tpm: int | None = None, concurrency: int | None = None, name: str = "key:k"
) -> Subject:
    return Subject(name, LimitSpec(rpm=rpm, tpm=tpm, concurrency=concurrency))


def test_requests_per_window_and_headers(make_limiter: MakeLimiter) -> None:
    async def body(limiter: RateLimiter) -> None:
        key = [subject(rpm=3)]
        decisions = [await limiter.acquire(key, tokens=0) for _ in range(5)]
        assert [d.allowed for d in decisions] == [True, True, True, False, False]
        assert [d.requests.remaining for d in decisions if d.requests] == [2, 1, 0, 0, 0]
        refused = decisions[3]
        assert refused.limited_by == "requests" and refused.ticket is None
        assert 59 < refused.retry_after_s <= 60 and refused.state == refused.requests
        headers = refused.headers()
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        assert headers["Retry-After"] == "60" and 59000 < int(headers["retry-after-ms"]) <= 60000
        assert "Retry-After" not in decisions[0].headers()
        assert "x-ratelimit-limit-tokens" not in headers
        other = await limiter.acquire([subject(rpm=3, name="key:other")], tokens=0)
        assert other.allowed  # subjects are independent

    run(make_limiter, body)


def test_sliding_window_has_no_edge_burst(make_limiter: MakeLimiter) -> None:
    async def body(limiter: RateLimiter) -> None:
        key = [subject(rpm=5)]
        assert all([(await limiter.acquire(key, tokens=0)).allowed for _ in range(5)])
        await asyncio.sleep(0.6)  # a fixed 1 s window would start over in between 60% of the time
        late = [await limiter.acquire(key, tokens=0) for _ in range(5)]
        assert not any(d.allowed for d in late)
        assert 0 < late[0].retry_after_s <= 0.42
        await asyncio.sleep(late[0].retry_after_s + 0.05)
        assert all([(await limiter.acquire(key, tokens=0)).allowed for _ in range(5)])
        assert not (await limiter.acquire(key, tokens=0)).allowed

    run(make_limiter, body, window_s=1.0)


def test_concurrency_refusal_uses_no_rpm(make_limiter: MakeLimiter) -> None:
    async def body(limiter: RateLimiter) -> None:
        key = [subject(rpm=3, concurrency=1)]
        first = await limiter.acquire(key, tokens=0)
        assert first.allowed and first.ticket and first.concurrency and first.concurrency.remaining == 0
        for _ in range(5):
            refused = await limiter.acquire(key, tokens=0)
            assert refused.limited_by == "concurrency" and refused.headers()["Retry-After"] == "1"
            assert refused.requests and refused.requests.remaining == 2
        await limiter.release(first.ticket, used_tokens=0)
        await limiter.release(first.ticket, used_tokens=0)  # twice changes nothing
        second = await limiter.acquire(key, tokens=0)
        assert second.allowed and second.ticket
        assert (await limiter.acquire(key, tokens=0)).limited_by == "concurrency"
        await limiter.release(second.ticket, used_tokens=0)  # e.g. the request failed or was cancelled
        assert (await limiter.acquire(key, tokens=0)).allowed
        assert (await limiter.acquire(key, tokens=0)).limited_by in {"concurrency", "requests"}

    run(make_limiter, body)


def test_leases_expire_after_the_safety_ttl(make_limiter: MakeLimiter) -> None:
    async def body(limiter: RateLimiter) -> None:
        key = [subject(concurrency=1)]
        assert (await limiter.acquire(key, tokens=0)).allowed  # never released: a crashed process
        assert not (await limiter.acquire(key, tokens=0)).allowed
        await asyncio.sleep(0.4)
        assert (await limiter.acquire(key, tokens=0)).allowed

    run(make_limiter, body, lease_ttl_s=0.3)


def test_renewed_leases_outlive_the_ttl_and_are_never_revived(make_limiter: MakeLimiter) -> None:
    async def body(limiter: RateLimiter) -> None:
        key, other = [subject(concurrency=1)], [subject(concurrency=1, name="user:u")]
        held = (await limiter.acquire(key, tokens=0)).ticket
        expiring = (await limiter.acquire(other, tokens=0)).ticket
        unlimited = (await limiter.acquire([subject(rpm=100, name="key:free")], tokens=0)).ticket
        assert held and expiring and unlimited and not unlimited.holds_lease
        for _ in range(8):  # 0.8 s, far past the 0.3 s TTL
            await asyncio.sleep(0.1)
            assert await limiter.renew([held, unlimited]) == []
        assert (await limiter.acquire(key, tokens=0)).limited_by == "concurrency"
        assert (await limiter.acquire(other, tokens=0)).allowed  # never renewed: expired
        assert await limiter.renew([expiring]) == [expiring.id]  # expired, and not revived
        await limiter.release(held, used_tokens=0)
        assert await limiter.renew([held]) == [held.id]  # released: not revived either
        again = await limiter.acquire(key, tokens=0)
        assert again.allowed and again.ticket
        assert (await limiter.acquire(key, tokens=0)).limited_by == "concurrency"

    run(make_limiter, body, lease_ttl_s=0.3)


def test_the_heartbeat_keeps_leases_until_release_or_death(make_limiter: MakeLimiter) -> None:
    async def body(limiter: RateLimiter) -> None:
        keeper = LeaseKeeper(limiter, interval_s=0.1)
        key = [subject(concurrency=2)]
        first, second = [(await keeper.acquire(key, tokens=0)).ticket for _ in range(2)]
        assert first and second and keeper.live == 2
        await asyncio.sleep(1.0)  # three TTLs: only the heartbeat keeps both slots
        assert (await keeper.acquire(key, tokens=0)).limited_by == "concurrency"
        await keeper.release(first, used_tokens=0)
        assert keeper.live == 1
        third = (await keeper.acquire(key, tokens=0)).ticket
        assert third and keeper.live == 2
        await keeper.release(third, used_tokens=0)
        await keeper.close()  # as if the process died holding ``second``: no release, no renewal
        died = time.monotonic()
        while not (await limiter.acquire(key, tokens=0)).allowed:
            await asyncio.sleep(0.02)
        assert time.monotonic() - died < 0.3 + 0.15  # back within the TTL

    run(make_limiter, body, lease_ttl_s=0.3)


def test_the_heartbeat_forgets_leases_it_was_too_late_for(
    make_limiter: MakeLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(limiter: RateLimiter) -> None:
        keeper = LeaseKeeper(limiter, interval_s=10.0)  # far slower than the 0.3 s TTL
        key = [subject(concurrency=1)]
        assert (await keeper.acquire(key, tokens=0)).allowed and keeper.live == 1
        await asyncio.sleep(0.4)
        await keeper.renew_live()
        assert keeper.live == 0
        assert (await keeper.acquire(key, tokens=0)).allowed  # the lost lease was not revived
        await keeper.close()

    run(make_limiter, body, lease_ttl_s=0.3)
    assert "1 concurrency leases expired before their requests ended" in caplog.text


def test_tokens_reserved_then_reconciled(make_limiter: MakeLimiter) -> None:
    async def body(limiter: RateLimiter) -> None:
        key = [subject(tpm=100)]
        first = await limiter.acquire(key, tokens=60)  # prompt + max_tokens
        assert first.allowed and first.ticket and first.tokens and first.tokens.remaining == 40
        refused = await limiter.acquire(key, tokens=50)
        assert refused.limited_by == "tokens" and refused.tokens and refused.tokens.remaining == 40
        assert 59 < refused.retry_after_s <= 60
        assert refused.headers()["x-ratelimit-limit-tokens"] == "100"
        await limiter.release(first.ticket, used_tokens=20)  # it generated less than max_tokens
        await limiter.release(first.ticket, used_tokens=20)
        second = await limiter.acquire(key, tokens=50)
        assert second.allowed and second.ticket and second.tokens and second.tokens.remaining == 30
        await limiter.release(second.ticket, used_tokens=0)  # failed: the reservation is refunded
        third = await limiter.acquire(key, tokens=80)
        assert third.allowed and third.tokens and third.tokens.remaining == 0
        too_big = await limiter.acquire([subject(tpm=100, name="key:new")], tokens=101)
        assert too_big.limited_by == "tokens" and too_big.retry_after_s == pytest.approx(60, abs=0.5)

    run(make_limiter, body)


def test_every_subject_must_allow(make_limiter: MakeLimiter) -> None:
    async def body(limiter: RateLimiter) -> None:
        key, user = subject(rpm=10, name="key:k"), subject(rpm=2, tpm=1000, name="user:u")
        results = [await limiter.acquire([key, user], tokens=10) for _ in range(3)]
        assert [d.allowed for d in results] == [True, True, False]
        assert results[2].requests and results[2].requests.limit == 2  # the tightest subject's state
        alone = await limiter.acquire([key], tokens=10)
        assert alone.requests and alone.requests.remaining == 10 - 3  # the refused one recorded nothing
        unlimited = await limiter.acquire([subject(name="user:free")], tokens=10**9)
        assert unlimited.allowed and unlimited.headers() == {}

    run(make_limiter, body)


def test_two_processes_on_one_redis_enforce_one_limit(prefix: str) -> None:
    async def main() -> int:
        clients = [client(timeout_s=2.0), client(timeout_s=2.0)]  # two pools, as two processes have
        limiters = [RedisRateLimiter(c, prefix=prefix, timeout_s=2.0) for c in clients]
        key = [subject(rpm=20, concurrency=100)]
        decisions = await asyncio.gather(*(limiters[i % 2].acquire(key, tokens=1) for i in range(60)))
        for c in clients:
            await c.aclose()
        return sum(d.allowed for d in decisions)

    assert asyncio.run(main()) == 20


def test_window_edge_with_a_clock() -> None:
    now = [59.9]
    limiter = MemoryRateLimiter(clock=lambda: now[0])

    async def main() -> list[bool]:
        key = [subject(rpm=20)]
        admitted = [(await limiter.acquire(key, tokens=0)).allowed for _ in range(20)]
        now[0] = 60.1  # a fixed per-minute window would start over here and admit 20 more
        admitted += [(await limiter.acquire(key, tokens=0)).allowed for _ in range(20)]
        now[0] = 119.95
        admitted.append((await limiter.acquire(key, tokens=0)).allowed)
        return admitted

    assert asyncio.run(main()) == [True] * 20 + [False] * 20 + [True]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.25, "250ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.999, "59.999s"),
        (60, "1m0s"),
        (360.25, "6m0.25s"),
    ],
)
def test_reset_durations_as_openai_writes_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
