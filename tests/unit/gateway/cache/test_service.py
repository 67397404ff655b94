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


@pytest.fixture(params=["memory", "redis"])
def make_cache(request: pytest.FixtureRequest, prefix: str) -> MakeCache:
    @asynccontextmanager
    async def make(**options: Any) -> AsyncIterator[ResponseCache]:
        if request.param == "memory":
            yield ResponseCache(MemoryCacheBackend(), **options)
            return
        redis = client(timeout_s=2.0)
        try:
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
