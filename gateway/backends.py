"""The response cache and the rate limiter for the settings: Redis when configured, else in-process."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.cache.backend import CacheBackend, MemoryCacheBackend
from gateway.cache.redis import RedisCacheBackend
from gateway.cache.service import ResponseCache
from gateway.circuit import OnBackendError
from gateway.ratelimit.fallback import FallbackRateLimiter
from gateway.ratelimit.leases import LeaseKeeper
from gateway.ratelimit.limiter import RateLimiter
from gateway.ratelimit.memory import MemoryRateLimiter
from gateway.ratelimit.redis import RedisRateLimiter
from gateway.redis_client import RedisClient, create_redis_client
from gateway.settings import Settings

logger = logging.getLogger("pocketllm.backends")


@dataclass(slots=True)
class Backends:
    """The cache and the limiter of one gateway process, and the Redis client they share (if any)."""

    cache: ResponseCache
    limiter: RateLimiter
    redis: RedisClient | None = None

    async def close(self) -> None:
        """Close the limiter, the cache backend and the Redis connections."""
        await self.limiter.close()
        await self.cache.backend.close()
        if self.redis is not None:
            await self.redis.aclose()


def build_backends(
    settings: Settings,
    *,
    on_cache_error: OnBackendError | None = None,
    on_limiter_error: OnBackendError | None = None,
) -> Backends:
    """The cache and limiter for ``settings`` (no connection is made until the first call).

    With ``redis.host`` set: the cache lives in Redis (bypassed while Redis fails; hits are kept in
    process memory for ``cache.local_ttl_s`` in front of it) and the limiter is
    Redis's, falling back to an in-process limiter while Redis fails (fail open, per process). Without
    it: both are in-process. Either way one heartbeat renews the concurrency leases of the requests in
    flight every third of ``ratelimit.lease_ttl_s``.

    Args:
        settings: the whole configuration.
        on_cache_error: metrics hook for each failed cache backend call ``(operation, error)``.
        on_limiter_error: metrics hook for each failed Redis limiter call.
    """
    redis_settings, limits = settings.redis, settings.ratelimit
    memory_limiter = MemoryRateLimiter(window_s=limits.window_s, lease_ttl_s=limits.lease_ttl_s)
    redis: RedisClient | None = None
    backend: CacheBackend
    limiter: RateLimiter
    if redis_settings.host:
        redis = create_redis_client(
            redis_settings.host,
            redis_settings.port,
            redis_settings.db,
            redis_settings.password,
            socket_timeout_s=redis_settings.timeout_s,
            connect_timeout_s=redis_settings.connect_timeout_s,
        )
        backend = RedisCacheBackend(
            redis, prefix=f"{redis_settings.key_prefix}cache:", timeout_s=redis_settings.timeout_s
        )
        limiter = FallbackRateLimiter(
            RedisRateLimiter(
                redis,
                prefix=f"{redis_settings.key_prefix}rl:",
                window_s=limits.window_s,
                lease_ttl_s=limits.lease_ttl_s,
                timeout_s=redis_settings.timeout_s,
            ),
            memory_limiter,
            retry_after_s=redis_settings.retry_after_s,
            on_backend_error=on_limiter_error,
        )
        logger.info(
            "response cache and rate limits on redis %s:%d db %d (prefix %r)",
            redis_settings.host,
            redis_settings.port,
            redis_settings.db,
            redis_settings.key_prefix,
        )
    else:
        backend = MemoryCacheBackend(
            max_entries=settings.cache.memory_max_entries, max_bytes=settings.cache.memory_max_bytes
        )
        limiter = memory_limiter
    limiter = LeaseKeeper(limiter, interval_s=limits.lease_ttl_s / 3)
    cache = ResponseCache(
        backend,
        default_ttl_s=settings.cache.ttl_s,
        max_ttl_s=settings.cache.max_ttl_s,
        shared_scope=settings.cache.shared_scope,
        enabled=settings.cache.enabled,
        retry_after_s=redis_settings.retry_after_s,
        on_backend_error=on_cache_error,
        # per-process copies in front of Redis (none in front of the in-process backend)
        local_ttl_s=settings.cache.local_ttl_s if redis is not None else 0.0,
        local_max_entries=settings.cache.local_max_entries,
        local_max_bytes=settings.cache.local_max_bytes,
    )
    return Backends(cache, limiter, redis)
