"""The login throttle, on a fake clock."""

from __future__ import annotations

import pytest

from auth.throttle import LoginThrottle, ThrottleDecision
from tests.unit.auth.conftest import FakeClock


def test_a_username_is_blocked_after_five_failures_in_the_window(clock: FakeClock) -> None:
    throttle = LoginThrottle(clock=clock)
    assert (throttle.max_failures, throttle.window_s) == (5, 300.0)
    for i in range(5):
        assert throttle.check("bob", f"10.0.0.{i}") == ThrottleDecision(False, 0)
        throttle.record_failure("bob", f"10.0.0.{i}")
        clock.advance(10)
    # failures at t=0,10,20,30,40; now t=50: blocked until the first ages out at t=300
    decision = throttle.check("bob", "10.9.9.9")
    assert decision == ThrottleDecision(True, 250)
    assert throttle.check("BoB", "10.9.9.9").blocked  # names compare case-insensitively
    assert not throttle.check("alice", "10.9.9.9").blocked
    clock.advance(249.5)
    assert throttle.check("bob", "10.9.9.9") == ThrottleDecision(True, 1)  # rounded up, never 0
    clock.advance(0.5)
    assert throttle.check("bob", "10.9.9.9") == ThrottleDecision(False, 0)


def test_the_window_slides(clock: FakeClock) -> None:
    throttle = LoginThrottle(max_failures=3, window_s=60, clock=clock)
    for _ in range(2):
        throttle.record_failure("bob", "c")
    clock.advance(61)
    throttle.record_failure("bob", "c")
    throttle.record_failure("bob", "c")
    assert not throttle.check("bob", "c").blocked  # the first two have aged out
    throttle.record_failure("bob", "c")
    assert throttle.check("bob", "c") == ThrottleDecision(True, 60)


def test_one_client_address_is_blocked_across_usernames(clock: FakeClock) -> None:
    throttle = LoginThrottle(max_failures=5, window_s=300, clock=clock, max_client_failures=3)
    for name in ("a", "b", "c"):
        throttle.record_failure(name, "10.0.0.1")
    decision = throttle.check("d", "10.0.0.1")
    assert decision.blocked and decision.retry_after == 300
    assert not throttle.check("d", "10.0.0.2").blocked
    assert not throttle.check("a", "10.0.0.2").blocked  # one failure for "a" is far from five


def test_an_address_has_more_room_than_a_username_by_default(clock: FakeClock) -> None:
    throttle = LoginThrottle(clock=clock)
    assert throttle.max_client_failures == 20
    for i in range(19):
        throttle.record_failure(f"user{i}", "proxy")
    assert not throttle.check("someone", "proxy").blocked
    throttle.record_failure("user19", "proxy")
    assert throttle.check("someone", "proxy").blocked


def test_success_clears_the_username_but_not_the_address(clock: FakeClock) -> None:
    throttle = LoginThrottle(max_failures=3, clock=clock, max_client_failures=4)
    for _ in range(3):
        throttle.record_failure("bob", "c")
    assert throttle.check("bob", "elsewhere").blocked
    throttle.record_success("BOB")
    assert not throttle.check("bob", "elsewhere").blocked
    throttle.record_failure("eve", "c")
    assert throttle.check("carol", "c").blocked  # the address kept its three failures, now four


def test_memory_stays_bounded(clock: FakeClock) -> None:
    throttle = LoginThrottle(max_failures=2, window_s=10, clock=clock, max_entries=50)
    for i in range(1000):
        assert not throttle.check(f"probe{i}", f"addr{i}").blocked
    assert throttle.tracked() == 0  # checking never creates an entry
    for i in range(100):
        throttle.record_failure(f"user{i}", f"addr{i}")
    assert throttle.tracked() == 50  # the oldest names were dropped first
    assert not throttle.check("user0", "x").blocked
    throttle.record_failure("user99", "addr99")
    assert throttle.check("user99", "x").blocked
    for _ in range(100):
        throttle.record_failure("user99", "addr99")
    clock.advance(11)
    assert not throttle.check("user99", "addr99").blocked
    assert throttle.tracked() < 50  # aged-out entries are pruned when looked at


@pytest.mark.parametrize(
    "kwargs", [{"max_failures": 0}, {"window_s": 0}, {"max_client_failures": 0}, {"window_s": -1}]
)
def test_nonsense_limits_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="limits"):
        LoginThrottle(**kwargs)  # type: ignore[arg-type]
