"""``IdentityStore`` on SQLite (standard library ``sqlite3``): the embedded default for one machine.

One connection, used only by one dedicated worker thread (a single-thread executor), so it is never on
the event loop and never used by two threads at once. WAL journal, foreign keys on. The schema version
is ``PRAGMA user_version``; the shared ``auth.migrations`` are applied in order at open, in one
``BEGIN IMMEDIATE`` transaction (two processes opening a fresh directory at once cannot both migrate).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from auth.errors import StoreClosedError
from auth.migrations import MIGRATIONS, statements
from auth.sql_store import TITLE_MAX, DuplicateRowError, Row, SqlStore

__all__ = ["DATABASE_NAME", "MIGRATIONS", "TITLE_MAX", "SQLiteStore"]

T = TypeVar("T")

DATABASE_NAME = "pocketllm.sqlite3"

_UNIQUE = {"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"}


def _migrate(conn: sqlite3.Connection) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        for statement in statements("sqlite", version):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS):d}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return version


def _execute(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> int:
    try:
        return conn.execute(sql, args).rowcount
    except sqlite3.IntegrityError as exc:
        if getattr(exc, "sqlite_errorname", "") in _UNIQUE:
            raise DuplicateRowError(str(exc)) from exc
        raise


class SQLiteStore(SqlStore):
    """``IdentityStore`` in ``<data_dir>/pocketllm.sqlite3``.

    The constructor opens the database and migrates it (blocking briefly, on the worker thread);
    ``close`` must be awaited at shutdown.
    """

    dialect = "sqlite"
    insertion_order = "rowid"

    def __init__(self, data_dir: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> None:
        """Open (creating and migrating when needed) the database in ``data_dir``.

        Args:
            data_dir: the data directory (created when missing, mode 0700).
            clock: the source of timestamps (unix seconds).
        """
        super().__init__(clock)
        self.path = Path(data_dir) / DATABASE_NAME
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite-store")
        self._conn: sqlite3.Connection | None = None
        self.migrated_from: int = 0
        """The schema version found at open (0 for a new database)."""
        try:
            self._executor.submit(self._open).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            # password hashes live here: owner-only (SQLite gives -wal/-shm the same mode)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=NORMAL")
            self.migrated_from = _migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def open(self) -> None:
        """See ``IdentityStore.open`` (the constructor opened the database)."""
        if self._conn is None:
            raise StoreClosedError("the identity store is closed")

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreClosedError("the identity store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, conn)

    async def _fetch_one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        row: Row | None = await self._run(lambda c: c.execute(sql, args).fetchone())
        return row

    async def _fetch_all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return await self._run(lambda c: c.execute(sql, args).fetchall())

    async def _execute(self, sql: str, args: Sequence[Any]) -> int:
        return await self._run(lambda c: _execute(c, sql, args))

    async def _execute_if_changed(
        self, guard: str, guard_args: Sequence[Any], then: str, then_rows: Sequence[Sequence[Any]]
    ) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            try:
                changed = conn.execute(guard, guard_args).rowcount > 0
                if changed:
                    conn.executemany(then, then_rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT" if changed else "ROLLBACK")
            return changed

        return await self._run(work)

    async def close(self) -> None:
        """See ``IdentityStore.close``."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)
