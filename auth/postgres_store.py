"""``IdentityStore`` on PostgreSQL (psycopg 3 and its async connection pool): the store several gateway
replicas share.

The only module that imports the PostgreSQL driver. The queries are ``auth.sql_store``'s; this module
connects them: ``?`` placeholders become psycopg's ``%s``, a unique violation becomes
``DuplicateRowError``, and a server that cannot be reached (down, restarting, no free connection within
``acquire_timeout_s``) becomes ``StoreUnavailableError``. The pool reconnects by itself when the server is
back. No connection check on checkout (it would cost a round trip per request): a pooled connection
found dead fails its query; a read is then tried once more on another connection, and the pool's idle
connections are checked in the background, so a server restart costs at most one failed write.

Identity changes reach every replica at once: a revocation or a disabled user is announced with
``NOTIFY pocketllm_identity``, and each store LISTENs on a connection of its own and reports it to its
``on_identity_change`` listeners (the authenticator's key cache). While that connection is down the
caches' TTL is the bound; on reconnecting, the listeners are told (a change may have been missed).

The schema version is the ``schema_version`` table; the shared ``auth.migrations`` are applied at open
in one transaction under an advisory lock (replicas starting together do not both migrate; PostgreSQL's
DDL is transactional, so a failed migration leaves nothing behind).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from auth.errors import StoreClosedError, StoreUnavailableError
from auth.migrations import SCHEMA_VERSION, statements
from auth.sql_store import DuplicateRowError, Row, SqlStore

logger = logging.getLogger("pocketllm.auth.store")

Connection = AsyncConnection[TupleRow]

MIGRATION_LOCK = 0x706F636B6574  # pg_advisory_xact_lock key: "pocket"
IDENTITY_CHANNEL = "pocketllm_identity"


class _StaleConnectionError(StoreUnavailableError):
    """A pooled connection turned out dead (a read may be tried again on another one)."""


@functools.lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    # The shared SQL has no literal "?" or "%": every "?" is a parameter.
    return sql.replace("?", "%s")


def describe(url: str) -> str:
    """``host:port/dbname`` of a connection URL, without its user or password (for messages and logs)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparsable PostgreSQL URL"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


class PostgresStore(SqlStore):
    """``IdentityStore`` in a PostgreSQL database.

    The constructor does no I/O; ``open`` connects and migrates (call it at start-up to fail early), and
    the first query opens the store otherwise. ``close`` must be awaited at shutdown.
    """

    dialect = "postgresql"
    insertion_order = "id"

    def __init__(
        self,
        url: str,
        clock: Callable[[], float] = time.time,
        *,
        min_size: int = 1,
        max_size: int = 10,
        acquire_timeout_s: float = 2.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        """Configure the store.

        Args:
            url: a libpq URL or connection string (``postgresql://user@host:5432/dbname``).
            clock: the source of timestamps (unix seconds).
            min_size: connections kept open.
            max_size: connections at most (the pool grows on demand).
            acquire_timeout_s: the longest wait for a free connection before ``StoreUnavailableError``.
            connect_timeout_s: the longest wait to connect at open (and per connection attempt).
        """
        super().__init__(clock)
        self.url = url
        self.where = describe(url)
        self._min_size = min_size
        self._max_size = max_size
        self._acquire_timeout_s = acquire_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._opening = asyncio.Lock()
        self._closed = False
        self._checking: asyncio.Task[None] | None = None
        self._listening: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        """Set while this store receives other replicas' identity changes."""
        self.migrated_from: int | None = None
        """The schema version found at open (0 for a new database); None before ``open``."""

    async def open(self) -> None:
        """Connect and migrate now (idempotent).

        Raises:
            StoreUnavailableError: the server cannot be reached within ``connect_timeout_s``.
            StoreClosedError: the store has been closed.
        """
        await self._ready()

    async def _ready(self) -> AsyncConnectionPool[Connection]:
        if self._closed:
            raise StoreClosedError("the identity store is closed")
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    self._pool = await self._open_pool()
                    self._listening = asyncio.create_task(self._listen(), name="pocketllm-identity-listen")
        return self._pool

    async def _listen(self) -> None:
        """Receive identity changes from every replica; reconnect (every second) when the server goes."""
        while not self._closed:
            try:
                conn = await AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=max(1, round(self._connect_timeout_s))
                )
                async with conn:
                    await conn.execute(f"LISTEN {IDENTITY_CHANNEL}")
                    self._identity_changed()  # whatever happened while nobody listened
                    self.listening.set()
                    async for _ in conn.notifies():
                        self._identity_changed()
            except psycopg.OperationalError as exc:
                if self.listening.is_set():
                    logger.warning("identity change notifications from %s lost: %s", self.where, exc)
            self.listening.clear()
            await asyncio.sleep(1.0)

    async def _announce_identity_change(self) -> None:
        self._identity_changed()
        await self._execute("SELECT pg_notify(?, '')", (IDENTITY_CHANNEL,))

    async def _open_pool(self) -> AsyncConnectionPool[Connection]:
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self.url,
            open=False,
            min_size=self._min_size,
            max_size=self._max_size,
            timeout=self._acquire_timeout_s,
            # a dead server is given up after this and the pool grows again on demand
            reconnect_timeout=max(self._connect_timeout_s, 5.0),
            kwargs={"autocommit": True, "connect_timeout": max(1, round(self._connect_timeout_s))},
            name="pocketllm-identity",
        )
        try:
            await pool.open(wait=True, timeout=self._connect_timeout_s)
            async with pool.connection() as conn:
                self.migrated_from = await _migrate(conn)
        except psycopg.OperationalError as exc:
            await pool.close()
            raise StoreUnavailableError(f"cannot reach the identity store at {self.where}") from exc
        except BaseException:
            await pool.close()
            raise
        return pool

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        pool = await self._ready()
        conn: Connection | None = None
        try:
            async with pool.connection() as conn:
                yield conn
        except psycopg.errors.UniqueViolation as exc:
            raise DuplicateRowError(str(exc)) from exc
        except psycopg.OperationalError as exc:
            if isinstance(exc, PoolTimeout) or conn is None:
                raise StoreUnavailableError(f"the identity store at {self.where} is unavailable") from exc
            self._check_idle_connections(pool)
            raise _StaleConnectionError(f"the identity store at {self.where} is unavailable") from exc

    def _check_idle_connections(self, pool: AsyncConnectionPool[Connection]) -> None:
        if self._checking is None or self._checking.done():
            self._checking = asyncio.create_task(pool.check(), name="pocketllm-identity-pool-check")

    async def _read(self, sql: str, args: Sequence[Any], one: bool) -> Any:
        try:
            return await self._read_once(sql, args, one)
        except _StaleConnectionError:
            return await self._read_once(sql, args, one)

    async def _read_once(self, sql: str, args: Sequence[Any], one: bool) -> Any:
        async with self._connection() as conn:
            cursor = await conn.execute(_placeholders(sql), args)
            return await (cursor.fetchone() if one else cursor.fetchall())

    async def _fetch_one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        row: Row | None = await self._read(sql, args, one=True)
        return row

    async def _fetch_all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        rows: list[Row] = await self._read(sql, args, one=False)
        return rows

    async def _execute(self, sql: str, args: Sequence[Any]) -> int:
        async with self._connection() as conn:
            return (await conn.execute(_placeholders(sql), args)).rowcount

    async def _execute_if_changed(
        self, guard: str, guard_args: Sequence[Any], then: str, then_rows: Sequence[Sequence[Any]]
    ) -> bool:
        async with self._connection() as conn, conn.transaction():
            if (await conn.execute(_placeholders(guard), guard_args)).rowcount == 0:
                return False  # nothing written: the transaction commits nothing
            async with conn.cursor() as cursor:
                await cursor.executemany(_placeholders(then), then_rows)
            return True

    async def close(self) -> None:
        """See ``IdentityStore.close``."""
        self._closed = True
        for task in (self._checking, self._listening):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        async with self._opening:
            pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


async def _migrate(conn: Connection) -> int:
    """Bring the database to ``SCHEMA_VERSION``; the version it was at."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = await (await conn.execute("SELECT version FROM schema_version")).fetchone()
        version = int(row[0]) if row else 0
        for statement in statements("postgresql", version):
            await conn.execute(statement)
        if row is None:
            await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
        elif version != SCHEMA_VERSION:
            await conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
    return version
