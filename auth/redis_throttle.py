"""The login throttle in Redis, shared by every replica (``auth.throttle`` describes the policy).

Per (address, user) a hash ``{n: failures, t: last attempt}`` that expires ``window_s`` after the last
attempt; per address a sorted set of attempt tickets scored by time (a sliding window). The check and
the count are one Lua script, so attempts in parallel on several replicas cannot slip past a delay.
Times are wall-clock seconds of the calling replica (replicas keep their clocks in step with NTP).
Redis failures raise ``ThrottleBackendError`` (``FallbackLoginThrottle`` then throttles in process).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from auth.throttle import ThrottleBackendError, ThrottleDecision, ThrottlePolicy, blocked_for, pair_key

# KEYS: pair hash, address set. ARGV: now, window_s, free_failures, base_delay_s, max_delay_s,
# client_limit, ticket. Returns the wait in seconds as a string ("0": allowed and counted).
_ATTEMPT = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local free, base, max_delay = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local limit = tonumber(ARGV[6])
local wait = 0
local state = redis.call('HMGET', KEYS[1], 'n', 't')
local n, last = tonumber(state[1]) or 0, tonumber(state[2]) or 0
if now - last >= window then
  n = 0
end
if n >= free then
  wait = last + math.min(base * 2 ^ math.min(n - free, 64), max_delay) - now
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[2])
if count >= limit then
  local edge = redis.call('ZRANGE', KEYS[2], count - limit, count - limit, 'WITHSCORES')
  wait = math.max(wait, tonumber(edge[2]) + window - now)
end
if wait > 0 then
  return tostring(wait)
end
local ttl = math.ceil(window * 1000)
redis.call('HSET', KEYS[1], 'n', n + 1, 't', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now, ARGV[7])
redis.call('PEXPIRE', KEYS[2], ttl)
return '0'
"""


def _digest(text: str) -> str:
    # bounded key length whatever the username sent
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class RedisLoginThrottle:
    """``Throttle`` in Redis."""

    name = "redis"

    def __init__(
        self,
        client: Redis,
        policy: ThrottlePolicy | None = None,
        *,
        prefix: str = "pocketllm:login:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Configure the throttle.

        Args:
            client: a redis.asyncio client (the gateway's shared one, with short timeouts).
            policy: the throttle policy (the defaults when None).
            prefix: the keys' prefix.
            clock: wall-clock seconds (shared by the replicas).
        """
        self.client = client
        self.policy = policy or ThrottlePolicy()
        self.prefix = prefix
        self._clock = clock
        self._script = client.register_script(_ATTEMPT)

    def _keys(self, username: str, client: str) -> tuple[str, str]:
        return (
            f"{self.prefix}pair:{_digest(pair_key(username, client))}",
            f"{self.prefix}client:{_digest(client)}",
        )

    async def attempt(self, username: str, client: str) -> ThrottleDecision:
        """See ``Throttle.attempt``."""
        policy = self.policy
        ticket = uuid.uuid4().hex
        args = (
            repr(self._clock()),
            repr(policy.window_s),
            policy.free_failures,
            repr(policy.base_delay_s),
            repr(policy.max_delay_s),
            policy.client_limit,
            ticket,
        )
        try:
            answer = await self._script(keys=self._keys(username, client), args=args)
        except (RedisError, OSError) as exc:
            raise ThrottleBackendError(str(exc)) from exc
        wait = float(answer)
        if wait > 0:
            return blocked_for(wait)
        return ThrottleDecision(False, 0, ticket, self.name)

    async def succeeded(self, username: str, client: str, decision: ThrottleDecision) -> None:
        """See ``Throttle.succeeded``."""
        pair, address = self._keys(username, client)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(pair)
                pipe.zrem(address, decision.ticket)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise ThrottleBackendError(str(exc)) from exc
