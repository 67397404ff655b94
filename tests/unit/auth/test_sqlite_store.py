"""What only the SQLite backend promises: WAL, foreign keys, versioned migrations, its own thread."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from auth.migrations import statements
from auth.sqlite_store import DATABASE_NAME, MIGRATIONS, SQLiteStore
from tests.unit.auth.migration_support import check_version_3_rows_kept, version_3_schema

pytestmark = pytest.mark.anyio


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path / DATABASE_NAME, isolation_level=None)


async def test_schema_is_versioned_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    try:
        assert store.migrated_from == 0 and store.schema_version == len(MIGRATIONS) >= 2
        pragmas = await store._run(
            lambda c: (
                c.execute("PRAGMA foreign_keys").fetchone()[0],
                c.execute("PRAGMA journal_mode").fetchone()[0],
            )
        )
        assert pragmas == (1, "wal")
    finally:
        await store.close()
    conn = _connect(tmp_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    reopened = SQLiteStore(tmp_path)
    assert reopened.migrated_from == len(MIGRATIONS)  # nothing to do the second time
    await reopened.close()


async def test_a_version_3_database_gets_sessions_per_user_keeping_every_message(tmp_path: Path) -> None:
    conn = _connect(tmp_path)
    for statement in version_3_schema("sqlite"):
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    store = SQLiteStore(tmp_path)
    try:
        assert store.migrated_from == 3
        await check_version_3_rows_kept(store)
    finally:
        await store.close()


async def test_a_version_1_database_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    conn = _connect(tmp_path)
    for statement in statements("sqlite")[: len(MIGRATIONS[0])]:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO users (id, username, password_hash, role, created_at) VALUES ('u1', 'old', 'h', 'user', 1.0)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    store = SQLiteStore(tmp_path)
    try:
        assert store.migrated_from == 1
        user = await store.get_user_by_name("old")
        assert user is not None and user.id == "u1" and user.last_login_at is None
        await store.touch_user("u1", 5.0)
        touched = await store.get_user("u1")
        assert touched is not None and touched.last_login_at == 5.0
    finally:
        await store.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = _connect(tmp_path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        SQLiteStore(tmp_path)


def test_a_failed_migration_changes_nothing(tmp_path: Path) -> None:
    conn = _connect(tmp_path)
    conn.execute("CREATE TABLE users (id TEXT)")  # makes migration 1 fail half-way
    conn.close()
    with pytest.raises(sqlite3.OperationalError):
        SQLiteStore(tmp_path)
    conn = _connect(tmp_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"users"}
    finally:
        conn.close()


async def test_the_database_file_is_private(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "data")
    await store.close()
    assert stat.S_IMODE((tmp_path / "data" / DATABASE_NAME).stat().st_mode) == 0o600


async def test_work_runs_on_one_thread_off_the_event_loop(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    try:
        names = await asyncio.gather(
            *(store._run(lambda _: threading.current_thread().name) for _ in range(8))
        )
        assert len(set(names)) == 1 and names[0].startswith("sqlite-store")
        assert names[0] != threading.current_thread().name
        # Another process holds the write lock: the store's write waits on its thread, the loop runs on.
        blocker = _connect(tmp_path)
        blocker.execute("BEGIN IMMEDIATE")
        writing = asyncio.ensure_future(store.create_user("late", None, "user"))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks += 1
        assert not writing.done() and ticks == 20
        blocker.execute("ROLLBACK")
        blocker.close()
        user = await asyncio.wait_for(writing, 10)
        assert user.username == "late"
    finally:
        await store.close()


async def test_a_long_title_is_shortened(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    try:
        user = await store.create_user("a", None, "user")
        session = await store.create_session(user.id, "x" * 1000, "m")
        fetched = await store.get_session(session.id, user.id)
        assert fetched is not None and fetched.title == "x" * 200 == session.title
    finally:
        await store.close()
