"""Shared fixtures of the identity unit tests: the store backends, cheap hashing parameters, a fake clock."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from auth.passwords import ScryptParams
from auth.postgres_store import PostgresStore
from auth.sqlite_store import SQLiteStore
from auth.store import IdentityStore
from tests.postgres_support import create_schema, temporary_database, unreachable_reason

# Where the parameter value is not what a test is about, hashing at N=2^10 keeps the suite fast.
FAST = ScryptParams(n=2**10)

StoreOpener = Callable[[], IdentityStore]

_schemas = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of this test run on the shared PostgreSQL server, dropped at the end."""
    reason = unreachable_reason()
    if reason is not None:
        pytest.skip(reason)
    with temporary_database() as url:
        yield url


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> StoreOpener:
    return lambda: SQLiteStore(tmp_path)


def _postgres(request: pytest.FixtureRequest, tmp_path: Path) -> StoreOpener:
    # each test gets an empty schema of the run's database: the same state a fresh SQLite file gives
    url = create_schema(request.getfixturevalue("postgres_database"), f"test_{next(_schemas)}")
    return lambda: PostgresStore(url)


# A backend joins the contract suite by adding an entry: a function of the test's request and a fresh
# directory that returns a function opening the store there (called twice by the restart test).
BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], StoreOpener]] = {
    "sqlite": _sqlite,
    "postgresql": _postgres,
}


@pytest.fixture
def anyio_backend() -> str:
    """The stores use asyncio's executor integration."""
    return "asyncio"


@pytest.fixture(params=sorted(BACKENDS))
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreOpener:
    """Opens the backend's store on this test's own location (the same one every call)."""
    return BACKENDS[request.param](request, tmp_path)


@pytest.fixture
async def store(open_store: StoreOpener) -> AsyncIterator[IdentityStore]:
    """An open store, closed after the test."""
    opened = open_store()
    yield opened
    await opened.close()


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at a fixed time."""
    return FakeClock()


class CountingStore:
    """A real store that counts the calls made to it (each store call is one round trip on the hot paths
    it is used for; non-coroutine members, such as ``on_identity_change``, reach the store itself)."""

    def __init__(self, store: IdentityStore) -> None:
        self.store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)
        if not inspect.iscoroutinefunction(method):
            return method

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await method(*args, **kwargs)

        return counted
