"""The rate limiter in Redis: one Lua script per check, so every gateway process enforces one limit.

Per subject under the key prefix ``P`` (times are Redis ``TIME`` in ms, so process clocks never matter):
- ``P<id>:r`` sorted set of admitted ticket ids scored by admission time (requests window);
- ``P<id>:t`` the same for token reservations, ``P<id>:h`` hash ticket id -> tokens, plus ``#sum``;
- ``P<id>:c`` sorted set of in-flight ticket ids scored by lease expiry (admission or last renewal plus
  the lease TTL).
Window keys expire one window after their newest entry, lease sets one lease TTL after theirs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.ratelimit.limiter import (
    Decision,
    RateLimitBackendError,
    Subject,
    SubjectCheck,
    Ticket,
    compose_decision,
)

# KEYS: 4 per subject (r, t, h, c). ARGV: window ms, lease ms, ticket id, tokens, then per subject
# rpm, tpm, concurrency (-1 = unlimited). Returns {admitted, then 7 numbers per subject (ms for times)}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, lease, id, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local n = (#ARGV - 4) / 3
local ok, out = 1, {}
for i = 0, n - 1 do
  local rk, tk, hk, ck = KEYS[i * 4 + 1], KEYS[i * 4 + 2], KEYS[i * 4 + 3], KEYS[i * 4 + 4]
  local rpm, tpm, conc = tonumber(ARGV[5 + i * 3]), tonumber(ARGV[6 + i * 3]), tonumber(ARGV[7 + i * 3])
  local in_flight, count, r_retry, r_reset, total, t_retry, t_reset = 0, 0, 0, 0, 0, 0, 0
  if conc >= 0 then
    redis.call('ZREMRANGEBYSCORE', ck, '-inf', now)
    in_flight = redis.call('ZCARD', ck)
    if in_flight >= conc then ok = 0 end
  end
  if rpm >= 0 then
    redis.call('ZREMRANGEBYSCORE', rk, '-inf', now - window)
    count = redis.call('ZCARD', rk)
    if count > 0 then r_reset = tonumber(redis.call('ZRANGE', rk, -1, -1, 'WITHSCORES')[2]) + window - now end
    if count >= rpm then
      ok = 0
      if rpm == 0 then
        r_retry = window
      else
        local freeing = redis.call('ZRANGE', rk, count - rpm, count - rpm, 'WITHSCORES')
        r_retry = tonumber(freeing[2]) + window - now
      end
    end
  end
  if tpm >= 0 then
    while true do
      local expired = redis.call('ZRANGEBYSCORE', tk, '-inf', now - window, 'LIMIT', 0, 500)
      if #expired == 0 then break end
      local freed = 0
      for _, a in ipairs(redis.call('HMGET', hk, unpack(expired))) do freed = freed + (tonumber(a) or 0) end
      redis.call('HDEL', hk, unpack(expired))
      redis.call('HINCRBY', hk, '#sum', -freed)
      redis.call('ZREM', tk, unpack(expired))
    end
    total = tonumber(redis.call('HGET', hk, '#sum') or '0')
    local newest = redis.call('ZRANGE', tk, -1, -1, 'WITHSCORES')
    if #newest > 0 then t_reset = tonumber(newest[2]) + window - now end
    if total + cost > tpm then
      ok = 0
      t_retry = window
      if cost <= tpm then
        local need, freed, start = total + cost - tpm, 0, 0
        local done = false
        while not done do
          local batch = redis.call('ZRANGE', tk, start, start + 499, 'WITHSCORES')
          if #batch == 0 then break end
          local ids = {}
          for j = 1, #batch, 2 do ids[#ids + 1] = batch[j] end
          local amounts = redis.call('HMGET', hk, unpack(ids))
          for j = 1, #ids do
            freed = freed + (tonumber(amounts[j]) or 0)
            if freed >= need then t_retry = tonumber(batch[j * 2]) + window - now done = true break end
          end
          start = start + 500
        end
      end
    end
  end
  for _, v in ipairs({in_flight, count, r_retry, r_reset, total, t_retry, t_reset}) do out[#out + 1] = v end
end
if ok == 1 then
  for i = 0, n - 1 do
    local rk, tk, hk, ck = KEYS[i * 4 + 1], KEYS[i * 4 + 2], KEYS[i * 4 + 3], KEYS[i * 4 + 4]
    local rpm, tpm, conc = tonumber(ARGV[5 + i * 3]), tonumber(ARGV[6 + i * 3]), tonumber(ARGV[7 + i * 3])
    if rpm >= 0 then
      redis.call('ZADD', rk, now, id)
      redis.call('PEXPIRE', rk, window)
    end
    if tpm >= 0 then
      redis.call('ZADD', tk, now, id)
      redis.call('HSET', hk, id, cost)
      redis.call('HINCRBY', hk, '#sum', cost)
      redis.call('PEXPIRE', tk, window)
      redis.call('PEXPIRE', hk, window)
    end
    if conc >= 0 then
      redis.call('ZADD', ck, now + lease, id)
      redis.call('PEXPIRE', ck, lease)
    end
  end
end
table.insert(out, 1, ok)
return out
"""

# KEYS: 2 per subject (h, c). ARGV: ticket id, used tokens.
_RELEASE = """
local used = tonumber(ARGV[2])
for i = 1, #KEYS, 2 do
  redis.call('ZREM', KEYS[i + 1], ARGV[1])
  local old = redis.call('HGET', KEYS[i], ARGV[1])
  if old then
    redis.call('HSET', KEYS[i], ARGV[1], used)
    redis.call('HINCRBY', KEYS[i], '#sum', used - tonumber(old))
  end
end
return 1
"""


# KEYS: the lease sets (``P<id>:c``) to renew in. ARGV: lease ms, then the ticket id for each key.
# A lease that expired or was released is not revived; the script returns those ticket ids.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local lost = {}
for i = 1, #KEYS do
  local id = ARGV[i + 1]
  local expires = redis.call('ZSCORE', KEYS[i], id)
  if expires and tonumber(expires) > now then
    redis.call('ZADD', KEYS[i], now + lease, id)
    redis.call('PEXPIRE', KEYS[i], lease)
  else
    if expires then redis.call('ZREM', KEYS[i], id) end
    lost[#lost + 1] = id
  end
end
return lost
"""


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class RedisRateLimiter:
    """Sliding-window limits shared by every process on one Redis; raises ``RateLimitBackendError``."""

    name = "redis"

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "pocketllm:rl:",
        window_s: float = 60.0,
        lease_ttl_s: float = 6.0,
        timeout_s: float = 0.1,
    ) -> None:
        """Wrap a client (see ``redis_client.create_redis_client``).

        Args:
            client: the shared redis.asyncio client (not closed here).
            prefix: namespace of every key this limiter touches.
            window_s: the window of ``rpm``/``tpm``.
            lease_ttl_s: a concurrency slot neither renewed nor released within this expires (the
                process that held it died).
            timeout_s: bound of each call on top of the client's socket timeout.
        """
        self._prefix = prefix
        self.window_s = window_s
        self.lease_ttl_s = lease_ttl_s
        self._timeout_s = timeout_s
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)

    async def _run(self, operation: str, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RateLimitBackendError(f"redis {operation} failed: {type(exc).__name__}: {exc}") from exc

    async def acquire(self, subjects: Sequence[Subject], *, tokens: int) -> Decision:
        """Check and record atomically in one script run."""
        ticket_id = uuid.uuid4().hex
        keys: list[str] = []
        args: list[Any] = [round(self.window_s * 1000), round(self.lease_ttl_s * 1000), ticket_id, tokens]
        for subject in subjects:
            base = f"{self._prefix}{subject.id}"
            keys += [f"{base}:r", f"{base}:t", f"{base}:h", f"{base}:c"]
            spec = subject.limits
            args += [_limit(spec.rpm), _limit(spec.tpm), _limit(spec.concurrency)]
        reply = await self._run("acquire", self._acquire, keys, args)
        admitted, numbers = int(reply[0]) == 1, [int(v) for v in reply[1:]]
        checks = []
        for i in range(len(subjects)):
            f, c, rr, rs, tt, tr, ts = numbers[i * 7 : i * 7 + 7]
            checks.append(SubjectCheck(f, c, rr / 1000, rs / 1000, tt, tr / 1000, ts / 1000))
        ticket = Ticket(ticket_id, tuple(subjects), tokens, self.name) if admitted else None
        return compose_decision(subjects, checks, tokens=tokens, window_s=self.window_s, ticket=ticket)

    async def release(self, ticket: Ticket, *, used_tokens: int) -> None:
        """Free the slot and correct the token charge, atomically for every subject."""
        keys = [k for s in ticket.subjects for k in (f"{self._prefix}{s.id}:h", f"{self._prefix}{s.id}:c")]
        await self._run("release", self._release, keys, [ticket.id, used_tokens])

    async def renew(self, tickets: Sequence[Ticket]) -> list[str]:
        """Extend every lease of ``tickets`` in one script run; the ids of the lost ones."""
        keys: list[str] = []
        args: list[Any] = [round(self.lease_ttl_s * 1000)]
        for ticket in tickets:
            for subject in ticket.subjects:
                if subject.limits.concurrency is not None:
                    keys.append(f"{self._prefix}{subject.id}:c")
                    args.append(ticket.id)
        if not keys:
            return []
        lost = await self._run("renew", self._renew, keys, args)
        return list(dict.fromkeys(v.decode() if isinstance(v, bytes) else str(v) for v in lost))

    async def close(self) -> None:
        """Nothing to release: the client belongs to whoever created it."""
