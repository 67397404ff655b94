"""The versioned schema of the identity store: one list for every backend.

Migration ``n`` (1-based) is ``MIGRATIONS[n - 1]``. A statement is either one SQL text that every
dialect runs as written, or a ``PerDialect`` with a text for each dialect (only where the dialects
differ). A new migration is appended here once; each backend records the version it reached (SQLite in
``PRAGMA user_version``, PostgreSQL in the ``schema_version`` table).

Timestamps are ``DOUBLE PRECISION`` (unix seconds): SQLite stores them as REAL (8-byte floats) and
PostgreSQL as float8; PostgreSQL's ``REAL`` would be a 4-byte float and lose the seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dialect = Literal["sqlite", "postgresql"]


@dataclass(frozen=True, slots=True)
class PerDialect:
    """One statement written once per dialect."""

    sqlite: str
    postgresql: str


Statement = str | PerDialect

MIGRATIONS: list[tuple[Statement, ...]] = [
    (  # 1: users, keys, sessions, messages
        "CREATE TABLE users (id TEXT PRIMARY KEY, username TEXT NOT NULL UNIQUE, password_hash TEXT, "
        "role TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, disabled_at DOUBLE PRECISION)",
        "CREATE TABLE api_keys (id TEXT PRIMARY KEY, "
        "user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, key_hash TEXT NOT NULL UNIQUE, "
        "last4 TEXT NOT NULL, scopes TEXT NOT NULL, models TEXT, created_at DOUBLE PRECISION NOT NULL, "
        "expires_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION)",
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, "
        "user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, title TEXT NOT NULL, "
        "model TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX sessions_by_user ON sessions(user_id, updated_at DESC)",
        PerDialect(
            sqlite="CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE, role TEXT NOT NULL, "
            "content TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL)",
            postgresql="CREATE TABLE messages (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE, role TEXT NOT NULL, "
            "content TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL)",
        ),
        "CREATE INDEX messages_by_session ON messages(session_id, id)",
    ),
    (  # 2: last login time; keys by owner
        "ALTER TABLE users ADD COLUMN last_login_at DOUBLE PRECISION",
        "CREATE INDEX api_keys_by_user ON api_keys(user_id, created_at)",
    ),
    (  # 3: rate-limit overrides per key / user ("key:<id>", "user:<id>"); NULL keeps the default
        "CREATE TABLE limit_overrides (subject TEXT PRIMARY KEY, rpm INTEGER, tpm INTEGER, "
        "concurrency INTEGER, updated_at DOUBLE PRECISION NOT NULL)",
    ),
    (  # 4: token revocation (logout; a password change or "log out everywhere" bumps token_version), and
        # chat sessions namespaced per user: (user_id, id) is the key, so another user's id is just a new
        # session of this user (the old global key told a client which ids were taken)
        "ALTER TABLE users ADD COLUMN token_version INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE revoked_tokens (jti TEXT PRIMARY KEY, "
        "user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, expires_at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX revoked_tokens_by_expiry ON revoked_tokens(expires_at)",
        "CREATE TABLE chat_sessions (user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, "
        "id TEXT NOT NULL, title TEXT NOT NULL, model TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
        "updated_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (user_id, id))",
        "INSERT INTO chat_sessions (user_id, id, title, model, created_at, updated_at) "
        "SELECT user_id, id, title, model, created_at, updated_at FROM sessions",
        PerDialect(
            sqlite="CREATE TABLE chat_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, "
            "session_id TEXT NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, "
            "created_at DOUBLE PRECISION NOT NULL, FOREIGN KEY (user_id, session_id) "
            "REFERENCES chat_sessions(user_id, id) ON DELETE CASCADE)",
            postgresql="CREATE TABLE chat_messages (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
            "user_id TEXT NOT NULL, session_id TEXT NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, "
            "created_at DOUBLE PRECISION NOT NULL, FOREIGN KEY (user_id, session_id) "
            "REFERENCES chat_sessions(user_id, id) ON DELETE CASCADE)",
        ),
        # in id order, so the new ids keep the order of the turns
        "INSERT INTO chat_messages (user_id, session_id, role, content, created_at) "
        "SELECT s.user_id, m.session_id, m.role, m.content, m.created_at "
        "FROM messages m JOIN sessions s ON s.id = m.session_id ORDER BY m.id",
        "DROP TABLE messages",
        "DROP TABLE sessions",
        "CREATE INDEX chat_sessions_by_user ON chat_sessions(user_id, updated_at DESC)",
        "CREATE INDEX chat_messages_by_session ON chat_messages(user_id, session_id, id)",
    ),
    (  # 5: stored responses of the Responses API (/v1/responses), per user; ``previous_id`` chains the
        # turns of a conversation; ``input`` (this turn's input items) and ``body`` (the response object)
        # are JSON text the gateway owns
        "CREATE TABLE responses (user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE, "
        "id TEXT NOT NULL, previous_id TEXT, model TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
        "input TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (user_id, id))",
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)
"""The version a fully migrated database is at."""


def statements(dialect: Dialect, since: int = 0) -> list[str]:
    """The SQL that brings a database from version ``since`` to ``SCHEMA_VERSION``.

    Args:
        dialect: the backend's dialect.
        since: the version the database is at.

    Returns:
        The statements in order (empty when there is nothing to do).

    Raises:
        RuntimeError: the database is newer than this program.
    """
    if since > SCHEMA_VERSION:
        raise RuntimeError(
            f"the identity database is at schema version {since}, newer than this program "
            f"knows ({SCHEMA_VERSION}); upgrade PocketLLM Gateway"
        )
    return [
        getattr(statement, dialect) if isinstance(statement, PerDialect) else statement
        for migration in MIGRATIONS[since:]
        for statement in migration
    ]
