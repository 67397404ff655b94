"""Redis stopped or stuck mid-run (a Redis of the test's own): the cache bypasses, the limiter falls
back to the in-process one; both log once per outage, report each failure, and recover by themselves."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from gateway.cache.key import CachePolicy
from gateway.cache.redis import RedisCacheBackend
from gateway.cache.service import CacheLookup, CacheOutcome, ResponseCache
from gateway.ratelimit.fallback import FallbackRateLimiter
from gateway.ratelimit.limiter import LimitSpec, Subject
from gateway.ratelimit.memory import MemoryRateLimiter
from gateway.ratelimit.redis import RedisRateLimiter
from tests.unit.gateway.cache.test_service import REQUEST, answer
from tests.unit.gateway.conftest import RedisServer, client


def outage_lines(caplog: pytest.LogCaptureFixture, logger: str) -> tuple[int, int]:
    records = [r for r in caplog.records if r.name == logger]
    return (
        sum(r.levelno == logging.WARNING and "unavailable" in r.getMessage() for r in records),
        sum("recovered" in r.getMessage() for r in records),
    )


def test_cache_bypasses_a_dead_or_stuck_redis_and_recovers(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    failures: list[str] = []

    async def main() -> None:
        redis = client(own_redis.port)
        cache = ResponseCache(
            RedisCacheBackend(redis, prefix="t:"),
            retry_after_s=0.3,
            on_backend_error=lambda operation, _: failures.append(operation),
        )

        async def timed_lookup() -> tuple[CacheLookup, float]:
            start = time.monotonic()
            result = await cache.lookup(
                user="u", model_id="m", model_digest="d", request=REQUEST, policy=CachePolicy()
            )
            return result, time.monotonic() - start

        assert await cache.store((await timed_lookup())[0], answer())
        assert (await timed_lookup())[0].outcome is CacheOutcome.HIT

        own_redis.stop()
        results = []
        for _ in range(12):
            results.append(await timed_lookup())
            await asyncio.sleep(0.05)
        assert {r.outcome for r, _ in results} == {CacheOutcome.BYPASS}
        assert max(elapsed for _, elapsed in results) < 0.25
        assert not await cache.store(results[-1][0], answer())
        assert 1 <= len(failures) < 12  # tried again every 0.3 s, not on every request
        stats = await cache.stats()
        assert stats["available"] is False and stats["bypasses"] >= 12

        own_redis.start()  # empty: it keeps nothing on disk
        await asyncio.sleep(0.35)
        miss = (await timed_lookup())[0]
        assert miss.outcome is CacheOutcome.MISS and await cache.store(miss, answer())
        assert (await timed_lookup())[0].outcome is CacheOutcome.HIT

        own_redis.pause()  # stuck, not dead: replies never come
        try:
            stuck, elapsed = await timed_lookup()
            assert stuck.outcome is CacheOutcome.BYPASS and elapsed < 0.5
        finally:
            own_redis.resume()
        await asyncio.sleep(0.35)
        assert (await timed_lookup())[0].outcome is CacheOutcome.HIT
        await redis.aclose()

    asyncio.run(main())
    assert outage_lines(caplog, "gateway.services.cache") == (2, 2)


def test_limiter_falls_back_to_memory_and_recovers(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    failures: list[tuple[str, Any]] = []

    async def main() -> None:
        redis = client(own_redis.port)
        limiter = FallbackRateLimiter(
            RedisRateLimiter(redis, prefix="t:"),
            MemoryRateLimiter(),
            retry_after_s=0.3,
            on_backend_error=lambda operation, error: failures.append((operation, error)),
        )
        key = [Subject("key:k", LimitSpec(rpm=3, concurrency=10))]
        shared = await limiter.acquire(key, tokens=5)
        assert shared.allowed and shared.ticket and shared.ticket.backend == "redis"

        own_redis.stop()
        start = time.monotonic()
        local = [await limiter.acquire(key, tokens=5) for _ in range(4)]
        assert time.monotonic() - start < 0.5
        assert [d.allowed for d in local] == [True, True, True, False]  # fail open to the local limit
        assert {d.ticket.backend for d in local if d.ticket} == {"memory"}
        await limiter.release(shared.ticket, used_tokens=5)  # no exception; its lease expires in Redis
        assert failures and failures[0][0] == "acquire"
        local_tickets = [d.ticket for d in local if d.ticket]
        assert await limiter.renew([shared.ticket, *local_tickets]) == []  # local ones renewed, no raise
        assert [operation for operation, _ in failures][-2:] == ["release", "renew"]

        own_redis.start()
        await asyncio.sleep(0.35)
        again = await limiter.acquire(key, tokens=5)
        assert again.allowed and again.ticket and again.ticket.backend == "redis"
        for decision in local:
            if decision.ticket:
                await limiter.release(decision.ticket, used_tokens=1)
        await limiter.release(again.ticket, used_tokens=1)
        await limiter.close()
        await redis.aclose()

    asyncio.run(main())
    assert outage_lines(caplog, "gateway.ratelimit.limiter") == (1, 1)
