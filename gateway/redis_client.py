"""One redis.asyncio client (one connection pool) for the response cache and the rate limiter."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

RedisClient = Redis
"""The client type, for annotations outside the ``redis*`` modules (which may not import redis)."""


def create_redis_client(
    host: str,
    port: int = 6379,
    db: int = 0,
    password: str | None = None,
    *,
    socket_timeout_s: float = 0.1,
    connect_timeout_s: float = 0.1,
    max_connections: int = 256,
) -> Redis:
    """A client whose every command fails fast instead of hanging a request.

    Retries are off (redis-py retries 10 times with backoff by default, which would turn an outage into
    seconds of latency); callers fall back on their own. Values are bytes (``decode_responses=False``).

    Args:
        host: Redis host.
        port: Redis port.
        db: database number.
        password: ``AUTH`` password, if any.
        socket_timeout_s: longest wait for one reply.
        connect_timeout_s: longest wait to connect.
        max_connections: pool size; beyond it a command fails (and the caller bypasses Redis).

    Returns:
        A client; close it with ``await client.aclose()``.
    """
    return Redis(
        host=host,
        port=port,
        db=db,
        password=password,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        max_connections=max_connections,
    )
