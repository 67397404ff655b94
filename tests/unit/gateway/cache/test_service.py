"""The response cache service: outcomes, tenant scope, policy, invalidation, stats."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from gateway.cache.backend import MemoryCacheBackend
from gateway.cache.entry import CachedChoice, CachedCompletion
from gateway.cache.key import CacheOptions, CachePolicy, cache_policy
from gateway.cache.redis import RedisCacheBackend
from gateway.cache.service import CacheOutcome, ResponseCache
from tests.unit.gateway.conftest import client

REQUEST: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
MakeCache = Callable[..., AbstractAsyncContextManager[ResponseCache]]


def answer(text: str = "Hello there.", finish_reason: str = "stop") -> CachedCompletion:
    return CachedCompletion(
        choices=[CachedChoice(index=0, text=text, finish_reason=finish_reason)],
        prompt_tokens=3,
        completion_tokens=4,
    )


@pytest.fixture(params=["memory", "redis", "redis+local"])
def make_cache(request: pytest.FixtureRequest, prefix: str) -> MakeCache:
    """The service on the in-process backend, on Redis, and on Redis with a local layer in front."""

    @asynccontextmanager
    async def make(**options: Any) -> AsyncIterator[ResponseCache]:
        if request.param == "memory":
            yield ResponseCache(MemoryCacheBackend(), **options)
            return
        redis = client(timeout_s=2.0)
        try:
            if request.param == "redis+local":
                options.setdefault("local_ttl_s", 30.0)
            yield ResponseCache(RedisCacheBackend(redis, prefix=prefix, timeout_s=2.0), **options)
        finally:
            await redis.aclose()

    return make


async def lookup(
    cache: ResponseCache, user: str = "alice", policy: CachePolicy | None = None, **request: Any
) -> Any:
    return await cache.lookup(
        user=user,
        model_id="m",
        model_digest="d",
        request={**REQUEST, **request},
        policy=policy or CachePolicy(),
    )


def run(make_cache: MakeCache, body: Callable[[ResponseCache], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        async with make_cache(**options) as cache:
            await body(cache)

    asyncio.run(main())


def test_miss_store_hit_and_tenant_scope(make_cache: MakeCache) -> None:
    async def body(cache: ResponseCache) -> None:
        first = await lookup(cache)
        assert first.outcome is CacheOutcome.MISS and first.key
        assert await cache.store(first, answer())
        hit = await lookup(cache)
        assert hit.outcome is CacheOutcome.HIT and hit.value == answer()
        other = await lookup(cache, user="bob")  # user B neither gets nor sees user A's entry
        assert other.outcome is CacheOutcome.MISS and other.value is None
        stats = await cache.stats()
        assert stats["entries"] == 1 and stats["bytes"] > 0
        assert (stats["hits"], stats["misses"], stats["hit_ratio"]) == (1, 2, pytest.approx(1 / 3))

    run(make_cache, body)


def test_shared_scope(make_cache: MakeCache) -> None:
    async def body(cache: ResponseCache) -> None:
        await cache.store(await lookup(cache), answer())
        assert (await lookup(cache, user="bob")).outcome is CacheOutcome.HIT

    run(make_cache, body, shared_scope=True)


def test_bypass_and_policies(make_cache: MakeCache) -> None:
    async def body(cache: ResponseCache) -> None:
        sampled = await lookup(cache, temperature=0.7)
        assert sampled.outcome is CacheOutcome.BYPASS and sampled.key is None
        assert not await cache.store(sampled, answer())
        no_cache = await lookup(cache, policy=cache_policy("no-cache"))
        assert no_cache.outcome is CacheOutcome.BYPASS and no_cache.key  # not read, but stored
        assert await cache.store(no_cache, answer("fresh"))
        hit = await lookup(cache)
        assert hit.value is not None and hit.value.choices[0].text == "fresh"
        no_store = await lookup(cache, policy=cache_policy("no-store"), seed=3)
        assert no_store.outcome is CacheOutcome.MISS and not await cache.store(no_store, answer())
        both = await lookup(cache, policy=cache_policy("no-cache, no-store"))
        assert both.outcome is CacheOutcome.BYPASS and both.key is None
        opted_in = await lookup(cache, policy=cache_policy(None, CacheOptions(ttl=0.5)), temperature=0.9)
        assert opted_in.outcome is CacheOutcome.MISS and opted_in.ttl_s == 0.5
        assert await cache.store(opted_in, answer())
        assert (
            await lookup(cache, policy=cache_policy(None, CacheOptions()), temperature=0.9)
        ).outcome is CacheOutcome.HIT
        await asyncio.sleep(0.6)
        assert (
            await lookup(cache, policy=cache_policy(None, CacheOptions()), temperature=0.9)
        ).outcome is CacheOutcome.MISS
        assert (await cache.stats())["bypasses"] == 3

    run(make_cache, body)


def test_unfinished_answers_are_never_stored(make_cache: MakeCache) -> None:
    async def body(cache: ResponseCache) -> None:
        miss = await lookup(cache)
        assert not await cache.store(miss, answer(finish_reason="cancelled"))
        assert not await cache.store(miss, answer(finish_reason="error"))
        assert (await lookup(cache)).outcome is CacheOutcome.MISS
        assert (await cache.stats())["stores"] == 0

    run(make_cache, body)


def test_invalidate_model_and_flush(make_cache: MakeCache) -> None:
    async def body(cache: ResponseCache) -> None:
        await cache.store(await lookup(cache), answer())
        await cache.store(await lookup(cache, user="bob"), answer())
        assert await cache.invalidate_model("m") == 2
        assert (await lookup(cache)).outcome is CacheOutcome.MISS
        await cache.store(await lookup(cache), answer())
        assert await cache.flush() == 1
        assert (await cache.stats())["entries"] == 0

    run(make_cache, body)


def test_disabled(make_cache: MakeCache) -> None:
    async def body(cache: ResponseCache) -> None:
        result = await lookup(cache)
        assert result.outcome is CacheOutcome.BYPASS and not await cache.store(result, answer())
        assert (await cache.stats())["enabled"] is False

    run(make_cache, body, enabled=False)


def test_a_request_ttl_is_capped_and_never_reaches_the_backend_unbounded(make_cache: MakeCache) -> None:
    async def body(cache: ResponseCache) -> None:
        for seed, asked in enumerate((1e12, 1e15, 1e300, float("inf"))):  # 31,000 years; Redis refuses 1e15
            policy = cache_policy(None, CacheOptions(ttl=asked))
            found = await lookup(cache, policy=policy, temperature=0.9, seed=seed)
            assert found.ttl_s == 120.0
            assert await cache.store(found, answer())
        assert cache.circuit.outages == 0 and (await cache.stats())["errors"] == 0
        short = await lookup(cache, policy=cache_policy(None, CacheOptions(ttl=5)), temperature=0.8)
        assert short.ttl_s == 5

    run(make_cache, body, default_ttl_s=60.0, max_ttl_s=120.0)


def test_the_default_cap_is_a_day_or_the_default_ttl() -> None:
    assert ResponseCache(MemoryCacheBackend()).max_ttl_s == 86400
    assert ResponseCache(MemoryCacheBackend(), default_ttl_s=2 * 86400).max_ttl_s == 2 * 86400


def test_a_call_redis_refuses_does_not_open_the_shared_circuit(prefix: str) -> None:
    async def main() -> None:
        redis = client(timeout_s=2.0)
        try:
            cache = ResponseCache(RedisCacheBackend(redis, prefix=prefix, timeout_s=2.0), retry_after_s=30)
            await redis.set(f"{prefix}m:poisoned", "not a sorted set")  # makes this model's SET script fail
            poisoned = await cache.lookup(
                user="mallory", model_id="poisoned", model_digest="d", request=REQUEST, policy=CachePolicy()
            )
            assert not await cache.store(poisoned, answer())  # WRONGTYPE: refused, counted
            assert (await cache.stats())["errors"] == 1
            assert not cache.circuit.in_outage and cache.circuit.allow()
            first = await lookup(cache, user="victim")  # another user's requests still use the cache
            assert await cache.store(first, answer())
            assert (await lookup(cache, user="victim")).outcome is CacheOutcome.HIT
            with pytest.raises(ValueError, match="ttl"):
                await cache.backend.set("k", b"v", ttl_s=1e15, model="m")
        finally:
            await redis.aclose()

    asyncio.run(main())
