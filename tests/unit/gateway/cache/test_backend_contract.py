"""One contract for every response-cache backend (memory and a real Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from gateway.cache.backend import BackendStats, CacheBackend, MemoryCacheBackend
from gateway.cache.redis import RedisCacheBackend
from tests.unit.gateway.conftest import client

MakeBackend = Callable[[], AbstractAsyncContextManager[CacheBackend]]


@pytest.fixture(params=["memory", "redis"])
def make_backend(request: pytest.FixtureRequest, prefix: str) -> MakeBackend:
    @asynccontextmanager
    async def make() -> AsyncIterator[CacheBackend]:
        if request.param == "memory":
            yield MemoryCacheBackend()
            return
        redis = client(timeout_s=2.0)  # generous: these tests are about behaviour, not timeouts
        try:
            yield RedisCacheBackend(redis, prefix=prefix, timeout_s=2.0)
        finally:
            await redis.aclose()

    return make


def run(make_backend: MakeBackend, body: Callable[[CacheBackend], Awaitable[None]]) -> None:
    async def main() -> None:
        async with make_backend() as backend:
            await body(backend)
            await backend.close()

    asyncio.run(main())


def test_get_set_replace(make_backend: MakeBackend) -> None:
    async def body(backend: CacheBackend) -> None:
        assert await backend.get("k1") is None
        await backend.set("k1", b"one", ttl_s=60, model="m")
        await backend.set("k2", b"\x00\xffbinary", ttl_s=60, model="m")
        assert await backend.get("k1") == b"one"
        assert await backend.get("k2") == b"\x00\xffbinary"
        await backend.set("k1", b"uno!", ttl_s=60, model="m")
        assert await backend.get("k1") == b"uno!"
        assert await backend.stats() == BackendStats(entries=2, bytes=4 + 8)

    run(make_backend, body)


def test_get_with_ttl(make_backend: MakeBackend) -> None:
    async def body(backend: CacheBackend) -> None:
        assert await backend.get_with_ttl("absent") is None
        await backend.set("k", b"value", ttl_s=60, model="m")
        found = await backend.get_with_ttl("k")
        assert found is not None
        value, remaining = found
        assert value == b"value" and remaining is not None and 59 < remaining <= 60

    run(make_backend, body)


def test_ttl_expiry(make_backend: MakeBackend) -> None:
    async def body(backend: CacheBackend) -> None:
        await backend.set("short", b"s", ttl_s=0.5, model="m")
        await backend.set("long", b"l", ttl_s=60, model="m")
        assert await backend.get("short") == b"s"
        await asyncio.sleep(0.6)
        assert await backend.get("short") is None
        assert await backend.get("long") == b"l"
        assert await backend.stats() == BackendStats(entries=1, bytes=1)

    run(make_backend, body)


def test_delete_model_drops_only_that_model(make_backend: MakeBackend) -> None:
    async def body(backend: CacheBackend) -> None:
        for i in range(3):
            await backend.set(f"a{i}", b"aa", ttl_s=60, model="model-a")
        await backend.set("b0", b"bbb", ttl_s=60, model="model-b")
        assert await backend.delete_model("model-a") == 3
        assert [await backend.get(f"a{i}") for i in range(3)] == [None] * 3
        assert await backend.get("b0") == b"bbb"
        assert await backend.stats() == BackendStats(entries=1, bytes=3)
        assert await backend.delete_model("model-a") == 0
        await backend.set("a0", b"new", ttl_s=60, model="model-a")  # the model is used again after a reload
        assert await backend.get("a0") == b"new"

    run(make_backend, body)


def test_flush(make_backend: MakeBackend) -> None:
    async def body(backend: CacheBackend) -> None:
        await backend.set("x", b"1", ttl_s=60, model="m1")
        await backend.set("y", b"2", ttl_s=60, model="m2")
        assert await backend.flush() == 2
        assert await backend.get("x") is None and await backend.get("y") is None
        assert await backend.stats() == BackendStats(entries=0, bytes=0)

    run(make_backend, body)


def test_memory_lru_bounds() -> None:
    async def main() -> None:
        backend = MemoryCacheBackend(max_entries=3, max_bytes=10)
        for key in "abc":
            await backend.set(key, b"xx", ttl_s=60, model="m")
        assert await backend.get("a") == b"xx"  # a is now the most recently used
        await backend.set("d", b"xx", ttl_s=60, model="m")  # entry bound: b goes
        assert await backend.get("b") is None
        await backend.set("e", b"xxxxxx", ttl_s=60, model="m")  # byte bound: c (least recent) goes
        assert [await backend.get(k) for k in "acde"] == [b"xx", None, b"xx", b"xxxxxx"]
        assert await backend.stats() == BackendStats(entries=3, bytes=10)
        await backend.set("huge", b"x" * 11, ttl_s=60, model="m")  # larger than the whole cache
        assert await backend.get("huge") is None

    asyncio.run(main())
