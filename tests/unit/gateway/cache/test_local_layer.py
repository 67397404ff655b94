"""The per-process layer in front of the Redis response cache (``cache.local_ttl_s``), on a real Redis.

What reaches Redis is read from Redis's own ``MONITOR`` (commands naming the test's key prefix), so "a
second hit makes no Redis call" is observed on the server, not inferred from the gateway's counters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from gateway.backends import build_backends
from gateway.cache.backend import CacheBackendError
from gateway.cache.key import CacheOptions, CachePolicy, cache_policy
from gateway.cache.redis import RedisCacheBackend
from gateway.cache.service import CacheLookup, CacheOutcome, ResponseCache
from gateway.redis_client import RedisClient
from gateway.settings import load_settings
from tests.unit.gateway.cache.test_service import REQUEST, answer
from tests.unit.gateway.conftest import RedisMonitor, RedisServer, client


@asynccontextmanager
async def redis_client(port: int | None = None) -> AsyncIterator[RedisClient]:
    redis = client(port, timeout_s=2.0) if port is not None else client(timeout_s=2.0)
    try:
        yield redis
    finally:
        await redis.aclose()


def replica(redis: RedisClient, prefix: str, **options: Any) -> ResponseCache:
    """One gateway process's cache service on the shared key prefix (its own local layer)."""
    options.setdefault("local_ttl_s", 30.0)
    return ResponseCache(RedisCacheBackend(redis, prefix=prefix, timeout_s=2.0), retry_after_s=30, **options)


async def lookup(
    cache: ResponseCache, user: str = "alice", policy: CachePolicy | None = None, **request: Any
) -> CacheLookup:
    return await cache.lookup(
        user=user,
        model_id="m",
        model_digest="d",
        request={**REQUEST, **request},
        policy=policy or CachePolicy(),
    )


async def stored(
    cache: ResponseCache, user: str = "alice", policy: CachePolicy | None = None, **request: Any
) -> str:
    """Store an answer through ``cache``; returns its Redis entry key."""
    miss = await lookup(cache, user, policy, **request)
    assert miss.outcome is CacheOutcome.MISS and miss.key
    assert await cache.store(miss, answer())
    return miss.key


def entry(prefix: str, key: str) -> str:
    return f"{prefix}e:{key}"


def test_a_second_hit_makes_no_redis_call(prefix: str, monitor: RedisMonitor) -> None:
    async def main() -> None:
        async with redis_client() as redis:
            writer, reader = replica(redis, prefix), replica(redis, prefix)
            key = await stored(writer)
            await lookup(reader, user="warm-up")  # loads the read script: later reads are one EVALSHA each
            monitor.commands()

            first = await lookup(reader)  # not in the reader's memory yet: read from Redis, kept
            assert (first.outcome, first.tier, first.value) == (CacheOutcome.HIT, "redis", answer())
            ran = monitor.commands(lua=True)
            assert [c for c in ran if c[0] == "get"] == [["get", entry(prefix, key)]]
            assert [c[0] for c in ran if c[0] != "get"] == ["evalsha", "pttl"]  # one call, value + TTL

            for _ in range(3):
                again = await lookup(reader)
                assert (again.outcome, again.tier, again.value) == (CacheOutcome.HIT, "local", answer())
            assert monitor.commands(lua=True) == []  # nothing under the prefix reached Redis

            writer_hit = await lookup(writer)  # the writer kept what it stored
            assert writer_hit.tier == "local" and monitor.commands(lua=True) == []

            stats = await reader.stats()
            assert (stats["hits"], stats["misses"]) == (4, 1)  # every hit counts, wherever it came from
            assert stats["local"] == {"ttl_s": 30.0, "entries": 1, "bytes": stats["bytes"], "hits": 3}

    asyncio.run(main())


def test_the_tenant_scope_is_the_keys(prefix: str) -> None:
    async def main() -> None:
        async with redis_client() as redis:
            cache = replica(redis, prefix)
            await stored(cache, user="alice")
            assert (await lookup(cache, user="alice")).tier == "local"
            assert (await lookup(cache, user="bob")).outcome is CacheOutcome.MISS  # never alice's copy
            shared = replica(redis, prefix, shared_scope=True)
            await stored(shared, user="alice", seed=1)
            assert (await lookup(shared, user="bob", seed=1)).tier == "local"

    asyncio.run(main())


def test_a_flush_or_reload_on_this_process_drops_its_copies_at_once(
    prefix: str, monitor: RedisMonitor
) -> None:
    async def main() -> None:
        async with redis_client() as redis:
            cache = replica(redis, prefix)
            key = await stored(cache)
            assert (await lookup(cache)).tier == "local"
            assert await cache.flush() == 1
            assert (await cache.stats())["local"]["entries"] == 0
            monitor.commands()
            assert (await lookup(cache)).outcome is CacheOutcome.MISS
            assert ["get", entry(prefix, key)] in monitor.commands(lua=True)  # asked Redis, not memory

            await stored(cache)
            await stored(cache, seed=1)  # a second entry of the same model
            assert (await lookup(cache)).tier == "local"
            assert await cache.invalidate_model("m") == 2
            assert (await lookup(cache)).outcome is CacheOutcome.MISS

    asyncio.run(main())


def test_a_read_that_overlaps_a_flush_keeps_no_copy(own_redis: RedisServer) -> None:
    """A lookup's Redis read that was answered before the flush ran in Redis, but returned after the flush
    began on this process: its value must not become a local copy that outlives the flush."""

    async def main() -> None:
        async with redis_client(own_redis.port) as redis:
            prefix = "overlap:"
            await stored(replica(redis, prefix))
            cache = replica(redis, prefix)  # an empty local layer: the next lookup reads Redis
            await lookup(cache, user="warm-up")  # the read script is loaded
            own_redis.pause()
            try:
                reading = asyncio.create_task(lookup(cache))  # sent first: Redis answers it first
                await asyncio.sleep(0.1)
                flushing = asyncio.create_task(cache.flush())
                await asyncio.sleep(0.1)
            finally:
                own_redis.resume()
            found, dropped = await reading, await flushing
            assert (found.outcome, found.tier, dropped) == (CacheOutcome.HIT, "redis", 1)
            assert (await lookup(cache)).outcome is CacheOutcome.MISS  # no stale copy survived the flush

    asyncio.run(main())


def test_local_ttl_zero_turns_the_layer_off(prefix: str, monitor: RedisMonitor) -> None:
    async def main() -> None:
        async with redis_client() as redis:
            cache = replica(redis, prefix, local_ttl_s=0.0)
            assert cache.local is None
            key = await stored(cache)
            monitor.commands()
            for _ in range(3):
                hit = await lookup(cache)
                assert (hit.outcome, hit.tier) == (CacheOutcome.HIT, "redis")
            assert monitor.commands() == [["get", entry(prefix, key)]] * 3  # a plain GET each, as before
            assert (await cache.stats())["local"] is None

    asyncio.run(main())


def test_a_copy_never_outlives_its_redis_entry(prefix: str) -> None:
    async def main() -> None:
        async with redis_client() as redis:
            writer, reader = replica(redis, prefix), replica(redis, prefix)
            await stored(writer, user="a", policy=cache_policy(None, CacheOptions(ttl=0.6)))  # local: 30 s
            assert (await lookup(reader, user="a")).tier == "redis"  # the copy gets what PTTL said was left
            assert (await lookup(reader, user="a")).tier == "local"
            assert (await lookup(writer, user="a")).tier == "local"  # the writer's copy: the entry's TTL
            await asyncio.sleep(0.7)
            assert (await lookup(reader, user="a")).outcome is CacheOutcome.MISS
            assert (await lookup(writer, user="a")).outcome is CacheOutcome.MISS

    asyncio.run(main())


def test_another_process_flush_is_seen_within_local_ttl(prefix: str) -> None:
    async def main() -> None:
        async with redis_client() as redis:
            local_ttl_s = 0.5
            first, second = replica(redis, prefix, local_ttl_s=local_ttl_s), replica(redis, prefix)
            await stored(second)
            assert (await lookup(first)).tier == "redis"
            clock = asyncio.get_running_loop().time
            kept_at = clock()
            assert await second.flush() == 1
            outcomes: list[CacheOutcome] = []
            while (not outcomes or outcomes[-1] is CacheOutcome.HIT) and clock() - kept_at < 2 * local_ttl_s:
                outcomes.append((await lookup(first)).outcome)
                await asyncio.sleep(0.02)
            gone_after = clock() - kept_at
            # stale (hits of the flushed entry) for at most local_ttl_s after the copy was made
            assert outcomes[-1] is CacheOutcome.MISS and gone_after <= local_ttl_s + 0.1, (
                outcomes,
                gone_after,
            )

    asyncio.run(main())


def test_local_copies_answer_while_redis_is_down(own_redis: RedisServer) -> None:
    async def main() -> None:
        async with redis_client(own_redis.port) as redis:
            cache = replica(redis, "outage:")
            await stored(cache)
            own_redis.stop()
            hit = await lookup(cache)
            assert (hit.outcome, hit.tier) == (CacheOutcome.HIT, "local")
            assert (await lookup(cache, seed=5)).outcome is CacheOutcome.BYPASS  # not kept: Redis is asked
            with pytest.raises(CacheBackendError):
                await cache.flush()
            assert (await lookup(cache)).outcome is CacheOutcome.BYPASS  # the copy went with the flush

    asyncio.run(main())


def test_the_local_layer_is_bounded(prefix: str) -> None:
    async def main() -> None:
        async with redis_client() as redis:
            cache = replica(redis, prefix, local_max_entries=2)
            for seed in range(4):
                await stored(cache, seed=seed)
            local = (await cache.stats())["local"]
            assert local["entries"] == 2
            # the two stored last are kept; looking the older ones up reads Redis
            assert [(await lookup(cache, seed=s)).tier for s in (3, 2, 1, 0)] == [
                "local",
                "local",
                "redis",
                "redis",
            ]

    asyncio.run(main())


def test_the_layer_sits_in_front_of_redis_only() -> None:
    async def main() -> None:
        with_redis = build_backends(load_settings(env={"REDIS_HOST": "127.0.0.1"}))
        alone = build_backends(load_settings(env={}))
        try:
            assert with_redis.cache.local is not None and with_redis.cache.local_ttl_s == 3.0
            assert alone.cache.local is None  # the in-process backend is local already
        finally:
            await with_redis.close()
            await alone.close()

    asyncio.run(main())
