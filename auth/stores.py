"""Which identity store a deployment uses: SQLite under the data directory, or a PostgreSQL URL."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from auth.sqlite_store import SQLiteStore
from auth.store import IdentityStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: str | os.PathLike[str]) -> bool:
    """Whether ``target`` names a PostgreSQL database (rather than a data directory)."""
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def open_store(target: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> IdentityStore:
    """The identity store that ``target`` names.

    Args:
        target: a ``postgresql://`` (or ``postgres://``) URL for a store shared by several replicas, or
            a data directory for the embedded SQLite store (``<dir>/pocketllm.sqlite3``, the default).
        clock: the source of timestamps (unix seconds).

    Returns:
        The store. SQLite is open and migrated on return; PostgreSQL connects and migrates on
        ``await store.open()`` (call it at start-up so that a wrong URL fails there) or its first query.
        The PostgreSQL driver is imported only when a URL asks for it.
    """
    if is_postgres_url(target):
        from auth.postgres_store import PostgresStore  # noqa: PLC0415 - the driver only when asked for

        return PostgresStore(str(target), clock)
    return SQLiteStore(target, clock)
