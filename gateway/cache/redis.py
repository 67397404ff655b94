"""The response cache in Redis: shared by every gateway process, entries indexed per model.

Layout under the key prefix ``P``:
- ``P e:<key>``   the value, with its TTL (``PX``);
- ``P m:<model>`` sorted set of that model's entry keys, scored by expiry (ms, Redis clock);
- ``P s:<model>`` hash entry key -> value size, for the stats;
- ``P models``    set of models that have (or had) entries.
Index upkeep happens inside Lua scripts (EVALSHA, loaded again if Redis lost them), so it is atomic.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from gateway.cache.backend import BackendStats, CacheBackendError, CacheCallRefusedError

_NOW_MS = (
    "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
)

# KEYS: entry, model index, model sizes, models set. ARGV: value, ttl ms, entry key, model.
_SET = (
    _NOW_MS
    + """
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 200)
if #expired > 0 then
  redis.call('ZREM', KEYS[2], unpack(expired))
  redis.call('HDEL', KEYS[3], unpack(expired))
end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], string.len(ARGV[1]))
redis.call('SADD', KEYS[4], ARGV[4])
if redis.call('PTTL', KEYS[2]) < ttl then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return 1
"""
)

# KEYS: entry. The value and its remaining ms (atomically: the entry cannot expire in between), or nil.
_GET_WITH_TTL = """
local value = redis.call('GET', KEYS[1])
if not value then return false end
return {value, redis.call('PTTL', KEYS[1])}
"""

# KEYS: model index, model sizes, models set. ARGV: model, entry key prefix.
_DELETE_MODEL = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local dropped = 0
for i = 1, #members, 500 do
  local batch = {}
  for j = i, math.min(i + 499, #members) do batch[#batch + 1] = ARGV[2] .. members[j] end
  dropped = dropped + redis.call('UNLINK', unpack(batch))
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return dropped
"""

# KEYS: models set. ARGV: key prefix.
_STATS = (
    _NOW_MS
    + """
local entries, size = 0, 0
for _, model in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local index, sizes = ARGV[1] .. 'm:' .. model, ARGV[1] .. 's:' .. model
  while true do
    local expired = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, 500)
    if #expired == 0 then break end
    redis.call('ZREM', index, unpack(expired))
    redis.call('HDEL', sizes, unpack(expired))
  end
  local live = redis.call('ZCARD', index)
  if live == 0 then
    redis.call('DEL', sizes)
    redis.call('SREM', KEYS[1], model)
  else
    entries = entries + live
    for _, v in ipairs(redis.call('HVALS', sizes)) do size = size + tonumber(v) end
  end
end
return {entries, size}
"""
)


MAX_TTL_S = 10 * 365 * 86400.0
"""The longest entry lifetime this backend accepts (the configured ``cache.max_ttl_s`` is far below)."""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisCacheBackend:
    """Cache entries in Redis under a key prefix; every call is bounded by a short timeout."""

    name = "redis"

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "pocketllm:cache:",
        timeout_s: float = 0.1,
        admin_timeout_s: float = 5.0,
    ) -> None:
        """Wrap a client (see ``redis_client.create_redis_client``).

        Args:
            client: the shared redis.asyncio client; not closed by ``close`` (its owner closes it).
            prefix: namespace of every key this backend touches.
            timeout_s: bound of ``get``/``set`` on top of the client's socket timeout.
            admin_timeout_s: bound of ``flush``/``stats``/``delete_model`` (they walk the index).
        """
        self._client = client
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._admin_timeout_s = admin_timeout_s
        self._set = client.register_script(_SET)
        self._get_with_ttl = client.register_script(_GET_WITH_TTL)
        self._delete_model = client.register_script(_DELETE_MODEL)
        self._stats = client.register_script(_STATS)

    @asynccontextmanager
    async def _guard(self, operation: str, timeout_s: float) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(timeout_s):
                yield
        except ResponseError as exc:  # Redis answered: it is up, this one call was refused
            raise CacheCallRefusedError(f"redis {operation} refused: {exc}") from exc
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheBackendError(f"redis {operation} failed: {type(exc).__name__}: {exc}") from exc

    async def _call(self, operation: str, timeout_s: float, call: Awaitable[Any]) -> Any:
        async with self._guard(operation, timeout_s):
            return await call

    def _model_keys(self, model: str) -> list[str]:
        return [f"{self._prefix}m:{model}", f"{self._prefix}s:{model}", f"{self._prefix}models"]

    async def get(self, key: str) -> bytes | None:
        """The live value under ``key``, or ``None``."""
        value = await self._call("get", self._timeout_s, self._client.get(f"{self._prefix}e:{key}"))
        return bytes(value) if value is not None else None

    async def get_with_ttl(self, key: str) -> tuple[bytes, float | None] | None:
        """The live value under ``key`` and its remaining seconds (``PTTL``), or ``None``: one script
        call (``EVALSHA``), so one round trip."""
        call = self._get_with_ttl(keys=[f"{self._prefix}e:{key}"])
        found = await self._call("get", self._timeout_s, call)
        if found is None:
            return None
        value, pttl_ms = found
        return bytes(value), (int(pttl_ms) / 1000 if int(pttl_ms) >= 0 else None)

    async def set(self, key: str, value: bytes, *, ttl_s: float, model: str) -> None:
        """Store ``value`` for ``ttl_s`` seconds and index it under ``model``."""
        if not 0 < ttl_s <= MAX_TTL_S:  # NaN fails too; the service never sends such a value
            raise ValueError(f"a cache entry's ttl must be in (0, {MAX_TTL_S}] seconds, not {ttl_s!r}")
        ttl_ms = max(1, round(ttl_s * 1000))
        index, sizes, models = self._model_keys(model)
        keys = [f"{self._prefix}e:{key}", index, sizes, models]
        await self._call("set", self._timeout_s, self._set(keys=keys, args=[value, ttl_ms, key, model]))

    async def delete_model(self, model: str) -> int:
        """Drop every entry of ``model``."""
        call = self._delete_model(keys=self._model_keys(model), args=[model, f"{self._prefix}e:"])
        return int(await self._call("delete_model", self._admin_timeout_s, call))

    async def flush(self) -> int:
        """Drop every key under the prefix; returns how many entries (values) were dropped."""
        entry_prefix = f"{self._prefix}e:".encode()
        dropped = 0
        async with self._guard("flush", self._admin_timeout_s):
            batch: list[bytes] = []
            async for key in self._client.scan_iter(match=_glob_escape(self._prefix) + "*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    await self._client.unlink(*batch)
                    dropped += sum(k.startswith(entry_prefix) for k in batch)
                    batch = []
            if batch:
                await self._client.unlink(*batch)
                dropped += sum(k.startswith(entry_prefix) for k in batch)
        return dropped

    async def stats(self) -> BackendStats:
        """Live entries and value bytes over every model (prunes the indexes on the way)."""
        call = self._stats(keys=[f"{self._prefix}models"], args=[self._prefix])
        entries, size = await self._call("stats", self._admin_timeout_s, call)
        return BackendStats(int(entries), int(size))

    async def close(self) -> None:
        """Nothing to release: the client belongs to whoever created it."""
