"""``IdentityStore`` on SQLite (standard library ``sqlite3``).

One connection, used only by one dedicated worker thread (a single-thread executor), so it is never on
the event loop and never used by two threads at once. WAL journal, foreign keys on. The schema version
is ``PRAGMA user_version``; ``MIGRATIONS`` are applied in order at open, in one ``BEGIN IMMEDIATE``
transaction (two processes opening a fresh directory at once cannot both migrate).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from auth.errors import SessionExistsError, SessionNotFoundError, StoreClosedError, UserExistsError
from auth.principal import Role, as_role
from auth.store import ApiKey, ChatMessage, ChatSession, LimitOverride, StoredApiKey, User

T = TypeVar("T")

DATABASE_NAME = "pocketllm.sqlite3"

MIGRATIONS: list[tuple[str, ...]] = [
    (  # 1: users, keys, sessions, messages
        "CREATE TABLE users (id TEXT PRIMARY KEY, username TEXT NOT NULL UNIQUE, password_hash TEXT, "
        "role TEXT NOT NULL, created_at REAL NOT NULL, disabled_at REAL)",
        "CREATE TABLE api_keys (id TEXT PRIMARY KEY, "
        "user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, key_hash TEXT NOT NULL UNIQUE, "
        "last4 TEXT NOT NULL, scopes TEXT NOT NULL, models TEXT, created_at REAL NOT NULL, "
        "expires_at REAL, revoked_at REAL)",
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, "
        "user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, title TEXT NOT NULL, "
        "model TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL)",
        "CREATE INDEX sessions_by_user ON sessions(user_id, updated_at DESC)",
        "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE, role TEXT NOT NULL, "
        "content TEXT NOT NULL, created_at REAL NOT NULL)",
        "CREATE INDEX messages_by_session ON messages(session_id, id)",
    ),
    (  # 2: last login time; keys by owner
        "ALTER TABLE users ADD COLUMN last_login_at REAL",
        "CREATE INDEX api_keys_by_user ON api_keys(user_id, created_at)",
    ),
    (  # 3: rate-limit overrides per key / user ("key:<id>", "user:<id>"); NULL keeps the default
        "CREATE TABLE limit_overrides (subject TEXT PRIMARY KEY, rpm INTEGER, tpm INTEGER, "
        "concurrency INTEGER, updated_at REAL NOT NULL)",
    ),
]

_SELECT_USER = "SELECT id, username, role, created_at, disabled_at, password_hash, last_login_at FROM users"
_SELECT_KEY = (
    "SELECT id, user_id, last4, scopes, models, created_at, expires_at, revoked_at, key_hash FROM api_keys"
)
_SELECT_SESSION = (
    "SELECT s.id, s.user_id, s.title, s.model, s.created_at, s.updated_at, "
    "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) FROM sessions s"
)
TITLE_MAX = 200


def _user(row: Sequence[Any]) -> User:
    return User(row[0], row[1], as_role(row[2]), row[3], row[4], row[5], row[6])


def _key(row: Sequence[Any]) -> StoredApiKey:
    scopes = tuple(s for s in row[3].split(",") if s)
    models = tuple(json.loads(row[4])) if row[4] is not None else None
    return StoredApiKey(row[0], row[1], row[2], scopes, models, row[5], row[6], row[7], row[8])


def _public(key: StoredApiKey) -> ApiKey:
    return ApiKey(
        key.id, key.user_id, key.last4, key.scopes, key.models, key.created_at, key.expires_at, key.revoked_at
    )


def _migrate(conn: sqlite3.Connection) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"the identity database is at schema version {version}, newer than this program "
                f"knows ({len(MIGRATIONS)}); upgrade PocketLLM Gateway"
            )
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS):d}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return version


class SQLiteStore:
    """``IdentityStore`` in ``<data_dir>/pocketllm.sqlite3``.

    Ids are uuid4 hex strings; timestamps are unix float seconds. The constructor opens the database
    and migrates it (blocking briefly, on the worker thread); ``close`` must be awaited at shutdown.
    """

    def __init__(self, data_dir: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> None:
        """Open (creating and migrating when needed) the database in ``data_dir``.

        Args:
            data_dir: the data directory (created when missing, mode 0700).
            clock: the source of timestamps (unix seconds).
        """
        self.path = Path(data_dir) / DATABASE_NAME
        self._clock = clock
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

    @property
    def schema_version(self) -> int:
        """The schema version after migrations."""
        return len(MIGRATIONS)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreClosedError("the identity store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, conn)

    async def _one(self, sql: str, args: Sequence[Any]) -> Any:
        return await self._run(lambda c: c.execute(sql, args).fetchone())

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return await self._run(lambda c: c.execute(sql, args).fetchall())

    async def _change(self, sql: str, args: Sequence[Any]) -> int:
        return await self._run(lambda c: c.execute(sql, args).rowcount)

    # users
    async def create_user(self, username: str, password_hash: str | None, role: Role) -> User:
        """See ``IdentityStore.create_user``."""
        user = User(uuid.uuid4().hex, username, as_role(role), self._clock(), None, password_hash)

        def work(conn: sqlite3.Connection) -> User:
            try:
                conn.execute(
                    "INSERT INTO users (id, username, role, created_at, password_hash) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (user.id, user.username, user.role, user.created_at, password_hash),
                )
            except sqlite3.IntegrityError:
                raise UserExistsError(f"the user {username!r} exists already") from None
            return user

        return await self._run(work)

    async def get_user(self, user_id: str) -> User | None:
        """See ``IdentityStore.get_user``."""
        row = await self._one(_SELECT_USER + " WHERE id = ?", (user_id,))
        return _user(row) if row else None

    async def get_user_by_name(self, username: str) -> User | None:
        """See ``IdentityStore.get_user_by_name``."""
        row = await self._one(_SELECT_USER + " WHERE username = ?", (username,))
        return _user(row) if row else None

    async def list_users(self) -> list[User]:
        """See ``IdentityStore.list_users``."""
        return [_user(row) for row in await self._all(_SELECT_USER + " ORDER BY created_at, rowid")]

    async def disable_user(self, user_id: str) -> User | None:
        """See ``IdentityStore.disable_user``."""
        sql = "UPDATE users SET disabled_at = COALESCE(disabled_at, ?) WHERE id = ?"
        await self._change(sql, (self._clock(), user_id))
        return await self.get_user(user_id)

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        """See ``IdentityStore.set_password_hash``."""
        await self._change("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id))

    async def touch_user(self, user_id: str, at: float | None = None) -> None:
        """See ``IdentityStore.touch_user``."""
        when = self._clock() if at is None else at
        await self._change("UPDATE users SET last_login_at = ? WHERE id = ?", (when, user_id))

    # keys
    async def create_key(
        self,
        user_id: str,
        key_hash: str,
        last4: str,
        scopes: Sequence[str],
        models: Sequence[str] | None,
        expires_at: float | None,
    ) -> ApiKey:
        """See ``IdentityStore.create_key``."""
        key = StoredApiKey(
            uuid.uuid4().hex,
            user_id,
            last4,
            tuple(scopes),
            tuple(models) if models is not None else None,
            self._clock(),
            expires_at,
            None,
            key_hash,
        )
        await self._change(
            "INSERT INTO api_keys (id, user_id, key_hash, last4, scopes, models, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key.id,
                user_id,
                key_hash,
                last4,
                ",".join(key.scopes),
                json.dumps(list(key.models)) if key.models is not None else None,
                key.created_at,
                expires_at,
            ),
        )
        return _public(key)

    async def get_key_by_hash(self, key_hash: str) -> StoredApiKey | None:
        """See ``IdentityStore.get_key_by_hash``."""
        row = await self._one(_SELECT_KEY + " WHERE key_hash = ?", (key_hash,))
        return _key(row) if row else None

    async def list_keys(self, user_id: str | None = None) -> list[ApiKey]:
        """See ``IdentityStore.list_keys``."""
        if user_id is None:
            rows = await self._all(_SELECT_KEY + " ORDER BY created_at, rowid")
        else:
            rows = await self._all(_SELECT_KEY + " WHERE user_id = ? ORDER BY created_at, rowid", (user_id,))
        return [_public(_key(row)) for row in rows]

    async def revoke_key(self, key_id: str) -> bool:
        """See ``IdentityStore.revoke_key``."""
        sql = "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?"
        return await self._change(sql, (self._clock(), key_id)) > 0

    # rate-limit overrides
    async def get_limit_overrides(self, subjects: Sequence[str]) -> dict[str, LimitOverride]:
        """See ``IdentityStore.get_limit_overrides``."""
        wanted = list(dict.fromkeys(subjects))
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        sql = f"SELECT subject, rpm, tpm, concurrency FROM limit_overrides WHERE subject IN ({marks})"  # noqa: S608 - placeholders only
        rows = await self._all(sql, wanted)
        return {row[0]: LimitOverride(row[1], row[2], row[3]) for row in rows}

    async def set_limit_override(self, subject: str, override: LimitOverride) -> None:
        """See ``IdentityStore.set_limit_override``."""
        if override.empty:
            await self._change("DELETE FROM limit_overrides WHERE subject = ?", (subject,))
            return
        await self._change(
            "INSERT INTO limit_overrides (subject, rpm, tpm, concurrency, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(subject) DO UPDATE SET rpm = excluded.rpm, tpm = excluded.tpm, "
            "concurrency = excluded.concurrency, updated_at = excluded.updated_at",
            (subject, override.rpm, override.tpm, override.concurrency, self._clock()),
        )

    # sessions
    async def create_session(
        self, user_id: str, title: str, model: str, session_id: str | None = None
    ) -> ChatSession:
        """See ``IdentityStore.create_session``."""
        now = self._clock()
        session = ChatSession(session_id or uuid.uuid4().hex, user_id, title[:TITLE_MAX], model, now, now, 0)

        def work(conn: sqlite3.Connection) -> ChatSession:
            try:
                conn.execute(
                    "INSERT INTO sessions (id, user_id, title, model, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (session.id, user_id, session.title, model, now, now),
                )
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                    raise SessionExistsError("a chat session with this id exists already") from None
                raise
            return session

        return await self._run(work)

    async def get_session(self, session_id: str, user_id: str) -> ChatSession | None:
        """See ``IdentityStore.get_session``."""
        row = await self._one(_SELECT_SESSION + " WHERE s.id = ? AND s.user_id = ?", (session_id, user_id))
        return ChatSession(*row) if row else None

    async def session_owner(self, session_id: str) -> str | None:
        """See ``IdentityStore.session_owner``."""
        row = await self._one("SELECT user_id FROM sessions WHERE id = ?", (session_id,))
        return str(row[0]) if row else None

    async def list_sessions(self, user_id: str, limit: int, offset: int) -> tuple[list[ChatSession], int]:
        """See ``IdentityStore.list_sessions``."""
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")

        def work(conn: sqlite3.Connection) -> tuple[list[ChatSession], int]:
            rows = conn.execute(
                _SELECT_SESSION + " WHERE s.user_id = ? "
                "ORDER BY s.updated_at DESC, s.created_at DESC, s.rowid DESC LIMIT ? OFFSET ?",
                (user_id, limit, offset),
            ).fetchall()
            total = conn.execute("SELECT COUNT(*) FROM sessions WHERE user_id = ?", (user_id,)).fetchone()
            return [ChatSession(*row) for row in rows], int(total[0])

        return await self._run(work)

    async def delete_session(self, session_id: str, user_id: str) -> bool:
        """See ``IdentityStore.delete_session``."""
        sql = "DELETE FROM sessions WHERE id = ? AND user_id = ?"
        return await self._change(sql, (session_id, user_id)) > 0

    async def count_sessions(self) -> tuple[int, dict[str, int]]:
        """See ``IdentityStore.count_sessions``."""
        rows = await self._all(
            "SELECT u.username, COUNT(s.id) FROM users u JOIN sessions s ON s.user_id = u.id "
            "GROUP BY u.username ORDER BY u.username"
        )
        per_user = {str(name): int(count) for name, count in rows}
        return sum(per_user.values()), per_user

    async def add_messages(self, session_id: str, messages: Sequence[tuple[str, str]]) -> None:
        """See ``IdentityStore.add_messages``."""
        now = self._clock()
        rows = [(session_id, role, content, now) for role, content in messages]

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute(
                    "UPDATE sessions SET updated_at = ? WHERE id = ?", (now, session_id)
                ).rowcount:
                    conn.executemany(
                        "INSERT INTO messages (session_id, role, content, created_at) VALUES (?, ?, ?, ?)",
                        rows,
                    )
                    conn.execute("COMMIT")
                    return
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("ROLLBACK")
            raise SessionNotFoundError("no such chat session")

        await self._run(work)

    async def list_messages(self, session_id: str) -> list[ChatMessage]:
        """See ``IdentityStore.list_messages``."""
        sql = "SELECT role, content, created_at FROM messages WHERE session_id = ? ORDER BY id"
        return [ChatMessage(*row) for row in await self._all(sql, (session_id,))]

    async def close(self) -> None:
        """See ``IdentityStore.close``."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)
