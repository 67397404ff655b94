"""The identity and chat-session store: one interface, a SQLite backend.

SQLite runs on one dedicated thread (never on the event loop, never two threads on one connection),
in WAL mode; the schema is versioned with ``PRAGMA user_version`` and migrated at open.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

T = TypeVar("T")


class UserExistsError(Exception):
    """A user with this name exists already."""


@dataclass(frozen=True, slots=True)
class User:
    """A user account."""

    id: str
    username: str
    role: str
    created_at: float
    disabled_at: float | None
    password_hash: str | None

    @property
    def disabled(self) -> bool:
        """Whether the account is disabled."""
        return self.disabled_at is not None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored API key (never the key itself: its SHA-256 digest and last four characters)."""

    id: str
    user_id: str
    key_hash: str
    last4: str
    scopes: tuple[str, ...]
    models: tuple[str, ...] | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class ChatSession:
    """A conversation."""

    id: str
    user_id: str
    title: str
    model: str
    created_at: float
    updated_at: float
    message_count: int = 0


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    content: str
    created_at: float


class IdentityStore(Protocol):
    """Users, API keys, chat sessions and messages."""

    async def create_user(self, username: str, password_hash: str | None, role: str) -> User: ...
    async def get_user(self, user_id: str) -> User | None: ...
    async def get_user_by_name(self, username: str) -> User | None: ...
    async def list_users(self) -> list[User]: ...
    async def disable_user(self, user_id: str) -> User | None: ...
    async def set_password_hash(self, user_id: str, password_hash: str) -> None: ...
    async def create_key(
        self,
        user_id: str,
        key_hash: str,
        last4: str,
        scopes: Sequence[str],
        models: Sequence[str] | None,
        expires_at: float | None,
    ) -> ApiKey: ...
    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None: ...
    async def list_keys(self, user_id: str | None = None) -> list[ApiKey]: ...
    async def revoke_key(self, key_id: str) -> bool: ...
    async def create_session(
        self, user_id: str, title: str, model: str, session_id: str | None = None
    ) -> ChatSession: ...
    async def get_session(self, session_id: str, user_id: str) -> ChatSession | None: ...
    async def session_owner(self, session_id: str) -> str | None: ...
    async def list_sessions(self, user_id: str, limit: int, offset: int) -> tuple[list[ChatSession], int]: ...
    async def delete_session(self, session_id: str, user_id: str) -> bool: ...
    async def count_sessions(self) -> tuple[int, dict[str, int]]: ...
    async def add_messages(self, session_id: str, messages: Sequence[tuple[str, str]]) -> None: ...
    async def list_messages(self, session_id: str) -> list[ChatMessage]: ...
    async def close(self) -> None: ...


MIGRATIONS: list[str] = [
    # 1: users, keys, sessions, messages
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY, username TEXT NOT NULL UNIQUE, password_hash TEXT, role TEXT NOT NULL,
        created_at REAL NOT NULL, disabled_at REAL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        key_hash TEXT NOT NULL UNIQUE, last4 TEXT NOT NULL, scopes TEXT NOT NULL, models TEXT,
        created_at REAL NOT NULL, expires_at REAL, revoked_at REAL
    );
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        title TEXT NOT NULL, model TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL
    );
    CREATE INDEX sessions_by_user ON sessions(user_id, updated_at DESC);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        role TEXT NOT NULL, content TEXT NOT NULL, created_at REAL NOT NULL
    );
    CREATE INDEX messages_by_session ON messages(session_id, id);
    """,
]

_USER = "id, username, role, created_at, disabled_at, password_hash"
_KEY = "id, user_id, key_hash, last4, scopes, models, created_at, expires_at, revoked_at"
_SESSION = (
    "s.id, s.user_id, s.title, s.model, s.created_at, s.updated_at, "
    "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id)"
)


def _key(row: tuple) -> ApiKey:  # type: ignore[type-arg]
    models = tuple(json.loads(row[5])) if row[5] is not None else None
    return ApiKey(
        row[0],
        row[1],
        row[2],
        row[3],
        tuple(s for s in row[4].split(",") if s),
        models,
        row[6],
        row[7],
        row[8],
    )


class SQLiteStore:
    """``IdentityStore`` on SQLite in ``data_dir/pocketllm.sqlite3``."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / "pocketllm.sqlite3"
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite-store")
        self._conn: sqlite3.Connection | None = None
        self._executor.submit(self._open).result()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
        self._conn = conn

    @property
    def schema_version(self) -> int:
        """The schema version after migrations."""
        return len(MIGRATIONS)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise RuntimeError("the store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, conn)

    # users
    async def create_user(self, username: str, password_hash: str | None, role: str) -> User:
        """Create a user; ``UserExistsError`` if the name is taken."""
        user = User(uuid.uuid4().hex, username, role, time.time(), None, password_hash)

        def work(conn: sqlite3.Connection) -> User:
            try:
                conn.execute(
                    f"INSERT INTO users ({_USER}) VALUES (?, ?, ?, ?, ?, ?)",
                    (user.id, user.username, user.role, user.created_at, None, password_hash),
                )
            except sqlite3.IntegrityError:
                raise UserExistsError(username) from None
            return user

        return await self._run(work)

    async def get_user(self, user_id: str) -> User | None:
        """A user by id."""
        row = await self._run(
            lambda c: c.execute(
                f"SELECT {_USER} FROM users WHERE id = ?",
                (user_id,),
            ).fetchone()
        )
        return User(*row) if row else None

    async def get_user_by_name(self, username: str) -> User | None:
        """A user by name."""
        row = await self._run(
            lambda c: c.execute(
                f"SELECT {_USER} FROM users WHERE username = ?",
                (username,),
            ).fetchone()
        )
        return User(*row) if row else None

    async def list_users(self) -> list[User]:
        """Every user, oldest first."""
        rows = await self._run(
            lambda c: c.execute(f"SELECT {_USER} FROM users ORDER BY created_at").fetchall()
        )
        return [User(*row) for row in rows]

    async def disable_user(self, user_id: str) -> User | None:
        """Disable a user (idempotent); ``None`` if there is no such user."""
        await self._run(
            lambda c: c.execute(
                "UPDATE users SET disabled_at = COALESCE(disabled_at, ?) WHERE id = ?", (time.time(), user_id)
            )
        )
        return await self.get_user(user_id)

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        """Replace a user's password hash."""
        await self._run(
            lambda c: c.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id))
        )

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
        """Store a new key's digest."""
        key = ApiKey(
            uuid.uuid4().hex,
            user_id,
            key_hash,
            last4,
            tuple(scopes),
            tuple(models) if models is not None else None,
            time.time(),
            expires_at,
            None,
        )
        await self._run(
            lambda c: c.execute(
                f"INSERT INTO api_keys ({_KEY}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.id,
                    user_id,
                    key_hash,
                    last4,
                    ",".join(scopes),
                    json.dumps(list(models)) if models is not None else None,
                    key.created_at,
                    expires_at,
                    None,
                ),
            )
        )
        return key

    async def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The key with this digest (revoked or not)."""
        row = await self._run(
            lambda c: c.execute(
                f"SELECT {_KEY} FROM api_keys WHERE key_hash = ?",
                (key_hash,),
            ).fetchone()
        )
        return _key(row) if row else None

    async def list_keys(self, user_id: str | None = None) -> list[ApiKey]:
        """Keys, oldest first; of one user when ``user_id`` is given."""
        if user_id is None:
            rows = await self._run(
                lambda c: c.execute(f"SELECT {_KEY} FROM api_keys ORDER BY created_at").fetchall()
            )
        else:
            rows = await self._run(
                lambda c: c.execute(
                    f"SELECT {_KEY} FROM api_keys WHERE user_id = ? ORDER BY created_at", (user_id,)
                ).fetchall()
            )
        return [_key(row) for row in rows]

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke a key; ``False`` if there is no such key."""
        cursor = await self._run(
            lambda c: c.execute(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (time.time(), key_id)
            )
        )
        return bool(cursor.rowcount)

    # sessions
    async def create_session(
        self, user_id: str, title: str, model: str, session_id: str | None = None
    ) -> ChatSession:
        """A new, empty session (with a caller-chosen id when given)."""
        now = time.time()
        session = ChatSession(session_id or uuid.uuid4().hex, user_id, title[:200], model, now, now, 0)
        await self._run(
            lambda c: c.execute(
                "INSERT INTO sessions (id, user_id, title, model, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (session.id, user_id, session.title, model, now, now),
            )
        )
        return session

    async def get_session(self, session_id: str, user_id: str) -> ChatSession | None:
        """The session if it exists and is ``user_id``'s (another user's is ``None``, like a missing one)."""
        row = await self._run(
            lambda c: c.execute(
                f"SELECT {_SESSION} FROM sessions s WHERE s.id = ? AND s.user_id = ?",
                (session_id, user_id),
            ).fetchone()
        )
        return ChatSession(*row) if row else None

    async def session_owner(self, session_id: str) -> str | None:
        """Who owns a session id (to refuse reusing another user's id)."""
        row = await self._run(
            lambda c: c.execute("SELECT user_id FROM sessions WHERE id = ?", (session_id,)).fetchone()
        )
        return row[0] if row else None

    async def list_sessions(self, user_id: str, limit: int, offset: int) -> tuple[list[ChatSession], int]:
        """A page of the user's sessions, most recently updated first, and their total."""

        def work(conn: sqlite3.Connection) -> tuple[list[ChatSession], int]:
            rows = conn.execute(
                f"SELECT {_SESSION} FROM sessions s WHERE s.user_id = ? "
                "ORDER BY s.updated_at DESC, s.created_at DESC LIMIT ? OFFSET ?",
                (user_id, limit, offset),
            ).fetchall()
            total = conn.execute("SELECT COUNT(*) FROM sessions WHERE user_id = ?", (user_id,)).fetchone()[0]
            return [ChatSession(*row) for row in rows], int(total)

        return await self._run(work)

    async def delete_session(self, session_id: str, user_id: str) -> bool:
        """Delete the user's session and its messages; ``False`` if it is not theirs or missing."""
        cursor = await self._run(
            lambda c: c.execute("DELETE FROM sessions WHERE id = ? AND user_id = ?", (session_id, user_id))
        )
        return bool(cursor.rowcount)

    async def count_sessions(self) -> tuple[int, dict[str, int]]:
        """Sessions in total and per username."""

        def work(conn: sqlite3.Connection) -> tuple[int, dict[str, int]]:
            rows = conn.execute(
                "SELECT u.username, COUNT(s.id) FROM users u JOIN sessions s ON s.user_id = u.id "
                "GROUP BY u.username"
            ).fetchall()
            per_user = {name: int(count) for name, count in rows}
            return sum(per_user.values()), per_user

        return await self._run(work)

    async def add_messages(self, session_id: str, messages: Sequence[tuple[str, str]]) -> None:
        """Append turns to a session (atomically) and mark it updated."""
        now = time.time()

        def work(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN")
                conn.executemany(
                    "INSERT INTO messages (session_id, role, content, created_at) VALUES (?, ?, ?, ?)",
                    [(session_id, role, content, now) for role, content in messages],
                )
                conn.execute("UPDATE sessions SET updated_at = ? WHERE id = ?", (now, session_id))

        await self._run(work)

    async def list_messages(self, session_id: str) -> list[ChatMessage]:
        """A session's messages in order."""
        rows = await self._run(
            lambda c: c.execute(
                "SELECT role, content, created_at FROM messages WHERE session_id = ? ORDER BY id",
                (session_id,),
            ).fetchall()
        )
        return [ChatMessage(*row) for row in rows]

    async def close(self) -> None:
        """Close the connection and stop the thread; idempotent."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)
