"""Whose limits apply to a request: the overrides a principal carries from its credential's lookup, or
those read from the store (cached) for a principal without them. Over a real SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from auth.limits import UNLIMITED, CredentialLimits, LimitOverride
from auth.principal import Principal
from auth.sqlite_store import SQLiteStore
from gateway.ratelimit.admission import LimitOverrides, subjects_for
from gateway.ratelimit.limiter import LimitSpec, Subject
from gateway.settings import RateLimitSettings
from tests.unit.auth.conftest import CountingStore

pytestmark = pytest.mark.anyio

DEFAULTS = RateLimitSettings(key_rpm=10, key_concurrency=3, user_tpm=100)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path)
    yield opened
    await opened.close()


def _principal(limits: CredentialLimits | None) -> Principal:
    return Principal("u1", "user1", "user", frozenset({"inference"}), key_id="k1", limits=limits)


async def test_a_principal_carrying_its_limits_costs_no_round_trip(store: SQLiteStore) -> None:
    counting = CountingStore(store)
    overrides = LimitOverrides(counting)  # type: ignore[arg-type]
    await store.set_limit_override("user:u1", LimitOverride(rpm=50))  # stored, but not what it carries
    carried = _principal(CredentialLimits(key=LimitOverride(rpm=2, concurrency=UNLIMITED), user=None))
    assert await subjects_for(carried, DEFAULTS, overrides) == [
        Subject("key:k1", LimitSpec(rpm=2)),  # the default concurrency lifted
        Subject("user:u1", LimitSpec(tpm=100)),  # the defaults: the lookup found no user override
    ]
    none_stored = _principal(CredentialLimits())
    assert await subjects_for(none_stored, DEFAULTS, overrides) == [
        Subject("key:k1", LimitSpec(rpm=10, concurrency=3)),
        Subject("user:u1", LimitSpec(tpm=100)),
    ]
    assert counting.calls == []


async def test_a_principal_without_limits_has_them_read_and_cached(store: SQLiteStore) -> None:
    counting = CountingStore(store)
    overrides = LimitOverrides(counting)  # type: ignore[arg-type]
    bare = _principal(None)
    await store.set_limit_override("key:k1", LimitOverride(rpm=7))
    expected = [Subject("key:k1", LimitSpec(rpm=7, concurrency=3)), Subject("user:u1", LimitSpec(tpm=100))]
    assert await subjects_for(bare, DEFAULTS, overrides) == expected
    assert await subjects_for(bare, DEFAULTS, overrides) == expected
    assert counting.calls == ["get_limit_overrides"]  # once for both subjects, then from the cache
    await store.set_limit_override("key:k1", LimitOverride(rpm=8))  # the store reports it: dropped here
    assert (await subjects_for(bare, DEFAULTS, overrides))[0] == Subject(
        "key:k1", LimitSpec(rpm=8, concurrency=3)
    )
    overrides.forget("user:u1")
    await subjects_for(bare, DEFAULTS, overrides)
    assert counting.calls == ["get_limit_overrides"] * 3
