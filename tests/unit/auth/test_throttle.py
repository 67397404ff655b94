"""The login throttle: one contract for the in-process and the Redis backend (on a fake clock), the
fallback while Redis is down, and the bound on concurrent password hashes."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from auth.errors import LoginBusyError
from auth.redis_throttle import RedisLoginThrottle
from auth.throttle import (
    FallbackLoginThrottle,
    LoginThrottle,
    PasswordHashGate,
    Throttle,
    ThrottleDecision,
    ThrottlePolicy,
)
from tests.unit.auth.conftest import FakeClock
from tests.unit.gateway.conftest import RedisServer, client

pytestmark = pytest.mark.anyio

Maker = Callable[[ThrottlePolicy], Throttle]


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Maker]:
    """Makes throttles of one backend on the fake clock; Redis ones share one key prefix (as replicas)."""
    if request.param == "memory":
        yield lambda policy: LoginThrottle(policy=policy, clock=clock)
        return
    redis = client(timeout_s=2.0)
    prefix = f"pocketllm-test:{uuid.uuid4().hex}:"
    yield lambda policy: RedisLoginThrottle(redis, policy, prefix=prefix, clock=clock)
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis.unlink(*keys)
    await redis.aclose()


async def _fail(throttle: Throttle, username: str, client_: str) -> ThrottleDecision:
    decision = await throttle.attempt(username, client_)
    assert not decision.blocked, decision
    return decision


async def test_a_pair_gets_progressive_delays(make: Maker, clock: FakeClock) -> None:
    throttle = make(ThrottlePolicy(free_failures=3, base_delay_s=1, max_delay_s=8, window_s=300))
    for _ in range(3):
        await _fail(throttle, "bob", "10.0.0.1")  # free
    waits = []
    for _ in range(6):
        decision = await throttle.attempt("bob", "10.0.0.1")
        assert decision.blocked
        waits.append(decision.retry_after)
        clock.advance(decision.retry_after)
        await _fail(throttle, "bob", "10.0.0.1")
    assert waits == [1, 2, 4, 8, 8, 8]  # doubling, capped
    assert (await throttle.attempt("BoB", "10.0.0.1")).blocked  # names compare case-insensitively
    clock.advance(7.5)
    assert (await throttle.attempt("bob", "10.0.0.1")) == ThrottleDecision(True, 1)  # rounded up, never 0


async def test_the_owner_elsewhere_is_not_slowed_down(make: Maker) -> None:
    throttle = make(ThrottlePolicy(free_failures=2, max_client_failures=50))
    for _ in range(2):
        await _fail(throttle, "alice", "203.0.113.9")
    assert (await throttle.attempt("alice", "203.0.113.9")).blocked  # the guesser waits
    assert not (await throttle.attempt("alice", "198.51.100.1")).blocked  # the owner does not
    assert not (await throttle.attempt("carol", "203.0.113.9")).blocked  # nor another user there


async def test_an_address_is_limited_across_usernames(make: Maker, clock: FakeClock) -> None:
    throttle = make(ThrottlePolicy(free_failures=5, window_s=300, max_client_failures=3))
    for name in ("a", "b", "c"):
        await _fail(throttle, name, "10.0.0.1")
        clock.advance(10)
    assert await throttle.attempt("d", "10.0.0.1") == ThrottleDecision(True, 270)  # until "a"'s ages out
    assert not (await throttle.attempt("d", "10.0.0.2")).blocked
    clock.advance(270)
    assert not (await throttle.attempt("d", "10.0.0.1")).blocked


async def test_an_address_has_four_times_a_pairs_room_by_default(make: Maker) -> None:
    policy = ThrottlePolicy()
    assert (policy.free_failures, policy.window_s, policy.client_limit) == (5, 300.0, 20)
    throttle = make(policy)
    for i in range(20):
        await _fail(throttle, f"user{i}", "proxy")
    assert (await throttle.attempt("someone", "proxy")).blocked


async def test_a_success_takes_its_attempt_back_and_clears_the_pair(make: Maker) -> None:
    throttle = make(ThrottlePolicy(free_failures=2, max_client_failures=3))
    await _fail(throttle, "bob", "c")
    await _fail(throttle, "bob", "c")
    ok = await throttle.attempt("eve", "c")  # the address's third attempt, which succeeds
    await throttle.succeeded("eve", "c", ok)
    assert not (await throttle.attempt("carol", "c")).blocked  # eve's success did not count
    assert (await throttle.attempt("dave", "c")).blocked  # bob x2 + carol: the address is full
    fresh = make(ThrottlePolicy(free_failures=2))
    for _ in range(2):
        last = await _fail(fresh, "bob", "x")
    await fresh.succeeded("bob", "x", last)
    for _ in range(2):
        await _fail(fresh, "bob", "x")  # the pair starts over


async def test_a_quiet_window_forgets_a_pair(make: Maker, clock: FakeClock) -> None:
    throttle = make(ThrottlePolicy(free_failures=1, window_s=60, max_delay_s=60))
    await _fail(throttle, "bob", "c")
    clock.advance(1)
    await _fail(throttle, "bob", "c")
    assert (await throttle.attempt("bob", "c")).retry_after == 2
    clock.advance(61)
    await _fail(throttle, "bob", "c")  # forgotten: the first attempt is free again
    assert (await throttle.attempt("bob", "c")).retry_after == 1


async def test_parallel_attempts_cannot_slip_past_the_delay(make: Maker) -> None:
    policy = ThrottlePolicy(free_failures=1, max_client_failures=100)
    throttle, replica = make(policy), make(policy)
    decisions = await asyncio.gather(*(t.attempt("bob", "c") for _ in range(10) for t in (throttle, replica)))
    allowed = [d for d in decisions if not d.blocked]
    if isinstance(throttle, LoginThrottle):
        allowed = [d for d in decisions[::2] if not d.blocked]  # two in-process throttles share nothing
    assert len(allowed) == 1


async def test_failures_on_one_replica_count_on_another(clock: FakeClock) -> None:
    redis = client(timeout_s=2.0)
    prefix = f"pocketllm-test:{uuid.uuid4().hex}:"
    policy = ThrottlePolicy(free_failures=3)
    a, b = (RedisLoginThrottle(redis, policy, prefix=prefix, clock=clock) for _ in range(2))
    try:
        for replica in (a, b, a):
            await _fail(replica, "bob", "10.0.0.7")
        assert (await b.attempt("bob", "10.0.0.7")).blocked
    finally:
        await redis.unlink(*[key async for key in redis.scan_iter(match=f"{prefix}*")])
        await redis.aclose()


async def test_memory_stays_bounded(clock: FakeClock) -> None:
    throttle = LoginThrottle(policy=ThrottlePolicy(free_failures=1, window_s=10), clock=clock, max_entries=50)
    for i in range(100):
        await _fail(throttle, f"user{i}", f"addr{i}")
    assert throttle.tracked() == 100  # 50 pairs and 50 addresses, the oldest dropped first
    for i in range(50, 100):
        assert (await throttle.attempt(f"user{i}", f"addr{i}")).blocked
    assert throttle.tracked() == 100  # a refused attempt creates nothing
    await _fail(throttle, "user0", "addr0")  # dropped: forgotten
    clock.advance(11)
    for i in range(50, 100):
        await _fail(throttle, f"user{i}", f"addr{i}")  # aged out: free again


@pytest.mark.parametrize(
    "kwargs",
    [
        {"free_failures": 0},
        {"window_s": 0},
        {"max_client_failures": 0},
        {"base_delay_s": 0},
        {"base_delay_s": 10, "max_delay_s": 5},
    ],
)
def test_nonsense_limits_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="limits"):
        ThrottlePolicy(**kwargs)  # type: ignore[arg-type]


async def test_the_fallback_throttles_in_process_while_redis_is_down_and_returns_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    own_redis = RedisServer()  # a private Redis, to stop and start
    own_redis.start()
    redis = client(own_redis.port)
    policy = ThrottlePolicy(free_failures=2)
    throttle = FallbackLoginThrottle(
        RedisLoginThrottle(redis, policy), LoginThrottle(policy=policy), retry_after_s=0.2
    )
    try:
        assert (await throttle.attempt("bob", "c")).backend == "redis"
        own_redis.stop()
        with caplog.at_level(logging.WARNING, logger="pocketllm.auth.throttle"):
            local = [await throttle.attempt("bob", "c") for _ in range(3)]
        assert [d.backend for d in local[:2]] == ["memory", "memory"] and local[2].blocked
        assert len([r for r in caplog.records if "unavailable" in r.message]) == 1  # once per outage
        await throttle.succeeded("bob", "c", local[1])  # taken back where it was counted
        assert not (await throttle.attempt("bob", "c")).blocked
        own_redis.start()  # the same port, empty
        await asyncio.sleep(0.3)
        back = await throttle.attempt("alice", "c")
        assert back.backend == "redis" and not throttle.in_outage
    finally:
        await redis.aclose()
        own_redis.stop()


async def test_the_hash_gate_refuses_beyond_its_bound() -> None:
    gate = PasswordHashGate(2)
    with gate.slot(), gate.slot():
        with pytest.raises(LoginBusyError) as busy, gate.slot():
            pass
        assert busy.value.retry_after == 1
        assert gate.running == 2
    assert gate.running == 0
    with gate.slot():
        assert gate.running == 1
    with pytest.raises(ValueError, match="at least 1"):
        PasswordHashGate(0)
