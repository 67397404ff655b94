"""``IdentityStore`` in SQL, shared by the SQLite and PostgreSQL backends.

Every query is written here once, with ``?`` placeholders; a backend supplies four primitives (fetch
one row, fetch all rows, execute one statement, a guarded write in one transaction) and translates the
placeholders and its driver's errors. A unique-constraint refusal becomes ``DuplicateRowError``; a
backend that cannot be reached raises ``StoreUnavailableError``.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from auth.errors import LastAdminError, SessionExistsError, SessionNotFoundError, UserExistsError
from auth.limits import CredentialLimits, LimitOverride
from auth.migrations import SCHEMA_VERSION, Dialect
from auth.principal import Role, as_role
from auth.store import (
    ApiKey,
    ChatMessage,
    ChatSession,
    KeyAndOwner,
    StoredApiKey,
    StoredResponse,
    TokenOwner,
    User,
)

Row = Sequence[Any]

TITLE_MAX = 200

_USER_COLUMNS = "id, username, role, created_at, disabled_at, password_hash, last_login_at, token_version"
_KEY_COLUMNS = "id, user_id, last4, scopes, models, created_at, expires_at, revoked_at, key_hash"
_SELECT_USER = f"SELECT {_USER_COLUMNS} FROM users"
_SELECT_KEY = f"SELECT {_KEY_COLUMNS} FROM api_keys"
_OWNER_COLUMNS = (
    "u.id, u.username, u.role, u.created_at, u.disabled_at, u.password_hash, u.last_login_at, u.token_version"
)
_USER_LIMITS = "LEFT JOIN limit_overrides uo ON uo.subject = 'user:' || u.id"
# The hot path of API-key authentication: the key, its owner and both their limit overrides (a request
# then needs no other round trip to authenticate and be admitted). ``limit_overrides.subject`` is its
# primary key, so each join is one index probe; a subject's row is absent when no override is stored.
_SELECT_KEY_AND_OWNER = (
    "SELECT k.id, k.user_id, k.last4, k.scopes, k.models, k.created_at, k.expires_at, k.revoked_at, "
    f"k.key_hash, {_OWNER_COLUMNS}, "
    "ko.subject, ko.rpm, ko.tpm, ko.concurrency, uo.subject, uo.rpm, uo.tpm, uo.concurrency "
    "FROM api_keys k JOIN users u ON u.id = k.user_id "
    "LEFT JOIN limit_overrides ko ON ko.subject = 'key:' || k.id "
    f"{_USER_LIMITS} WHERE k.key_hash = ?"
)
# The hot path of JWT authentication: the user, whether the token was revoked, the user's override.
_SELECT_TOKEN_OWNER = (
    f"SELECT {_OWNER_COLUMNS}, "
    "EXISTS (SELECT 1 FROM revoked_tokens r WHERE r.jti = ?), "
    "uo.subject, uo.rpm, uo.tpm, uo.concurrency "
    f"FROM users u {_USER_LIMITS} WHERE u.id = ?"
)
_SELECT_SESSION = (
    "SELECT s.id, s.user_id, s.title, s.model, s.created_at, s.updated_at, "
    "(SELECT COUNT(*) FROM chat_messages m WHERE m.user_id = s.user_id AND m.session_id = s.id) "
    "FROM chat_sessions s"
)

_RESPONSE_COLUMNS = "id, user_id, previous_id, model, created_at, input, body"
RESPONSE_CHAIN_MAX = 1000
"""Links followed back from a response (a guard: ids are made by the gateway, so chains have no cycles)."""


class DuplicateRowError(Exception):
    """A unique constraint refused a row (raised by a backend's primitives, handled here)."""


def _user(row: Row) -> User:
    return User(row[0], row[1], as_role(row[2]), row[3], row[4], row[5], row[6], int(row[7]))


def _key(row: Row) -> StoredApiKey:
    scopes = tuple(s for s in row[3].split(",") if s)
    models = tuple(json.loads(row[4])) if row[4] is not None else None
    return StoredApiKey(row[0], row[1], row[2], scopes, models, row[5], row[6], row[7], row[8])


def _override(row: Row) -> LimitOverride | None:
    """``subject, rpm, tpm, concurrency`` of a LEFT JOINed ``limit_overrides`` row (None when absent)."""
    return LimitOverride(row[1], row[2], row[3]) if row[0] is not None else None


def _public(key: StoredApiKey) -> ApiKey:
    return ApiKey(
        key.id, key.user_id, key.last4, key.scopes, key.models, key.created_at, key.expires_at, key.revoked_at
    )


class SqlStore(ABC):
    """The queries of ``IdentityStore``; subclasses connect them to a database.

    Ids are uuid4 hex strings; timestamps are unix float seconds.
    """

    dialect: ClassVar[Dialect]
    insertion_order: ClassVar[str]
    """The column that breaks ties of equal timestamps in listings (SQLite: ``rowid``, else the id)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        """Set the clock.

        Args:
            clock: the source of timestamps (unix seconds).
        """
        self._clock = clock
        self._change_listeners: list[Callable[[], None]] = []

    def on_identity_change(self, callback: Callable[[], None]) -> None:
        """See ``IdentityStore.on_identity_change``."""
        self._change_listeners.append(callback)

    def _identity_changed(self) -> None:
        for callback in self._change_listeners:
            callback()

    async def _announce_identity_change(self) -> None:
        """Tell this process's listeners (a backend that can reach other replicas tells them too)."""
        self._identity_changed()

    @property
    def schema_version(self) -> int:
        """The schema version after migrations."""
        return SCHEMA_VERSION

    @abstractmethod
    async def _fetch_one(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        """The first row of a query, or None."""

    @abstractmethod
    async def _fetch_all(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """Every row of a query."""

    @abstractmethod
    async def _execute(self, sql: str, args: Sequence[Any]) -> int:
        """Run one statement in its own transaction; the number of rows it changed."""

    @abstractmethod
    async def _execute_if_changed(
        self, guard: str, guard_args: Sequence[Any], then: str, then_rows: Sequence[Sequence[Any]]
    ) -> bool:
        """In one transaction: run ``guard``; when it changed a row, run ``then`` once per row of
        ``then_rows`` and commit (True); otherwise roll back (False)."""

    @abstractmethod
    async def close(self) -> None:
        """Release the backend; idempotent."""

    # users
    async def create_user(self, username: str, password_hash: str | None, role: Role) -> User:
        """See ``IdentityStore.create_user``."""
        user = User(uuid.uuid4().hex, username, as_role(role), self._clock(), None, password_hash)
        try:
            await self._execute(
                "INSERT INTO users (id, username, role, created_at, password_hash) VALUES (?, ?, ?, ?, ?)",
                (user.id, user.username, user.role, user.created_at, password_hash),
            )
        except DuplicateRowError:
            raise UserExistsError(f"the user {username!r} exists already") from None
        return user

    async def get_user(self, user_id: str) -> User | None:
        """See ``IdentityStore.get_user``."""
        row = await self._fetch_one(_SELECT_USER + " WHERE id = ?", (user_id,))
        return _user(row) if row else None

    async def get_user_by_name(self, username: str) -> User | None:
        """See ``IdentityStore.get_user_by_name``."""
        row = await self._fetch_one(_SELECT_USER + " WHERE username = ?", (username,))
        return _user(row) if row else None

    async def list_users(self) -> list[User]:
        """See ``IdentityStore.list_users``."""
        rows = await self._fetch_all(f"{_SELECT_USER} ORDER BY created_at, {self.insertion_order}")
        return [_user(row) for row in rows]

    async def disable_user(self, user_id: str) -> User | None:
        """See ``IdentityStore.disable_user``."""
        # one statement: the last enabled admin is kept whatever runs at the same time in this database
        sql = (
            "UPDATE users SET disabled_at = COALESCE(disabled_at, ?) WHERE id = ? AND NOT ("
            "role = 'admin' AND disabled_at IS NULL AND "
            "(SELECT COUNT(*) FROM users a WHERE a.role = 'admin' AND a.disabled_at IS NULL) <= 1)"
        )
        changed = await self._execute(sql, (self._clock(), user_id))
        await self._announce_identity_change()
        user = await self.get_user(user_id)
        if not changed and user is not None and user.role == "admin" and not user.disabled:
            raise LastAdminError("this is the last enabled admin; make or enable another admin first")
        return user

    async def enable_user(self, user_id: str) -> User | None:
        """See ``IdentityStore.enable_user``."""
        await self._execute("UPDATE users SET disabled_at = NULL WHERE id = ?", (user_id,))
        await self._announce_identity_change()
        return await self.get_user(user_id)

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        """See ``IdentityStore.set_password_hash``."""
        await self._execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id))

    async def change_password(self, user_id: str, password_hash: str) -> int:
        """See ``IdentityStore.change_password``."""
        sql = "UPDATE users SET password_hash = ?, token_version = token_version + 1 WHERE id = ?"
        await self._execute(sql, (password_hash, user_id))
        return await self._token_version(user_id)

    async def revoke_all_tokens(self, user_id: str) -> int:
        """See ``IdentityStore.revoke_all_tokens``."""
        await self._execute("UPDATE users SET token_version = token_version + 1 WHERE id = ?", (user_id,))
        return await self._token_version(user_id)

    async def _token_version(self, user_id: str) -> int:
        row = await self._fetch_one("SELECT token_version FROM users WHERE id = ?", (user_id,))
        return int(row[0]) if row else 0

    async def revoke_token(self, jti: str, user_id: str, expires_at: float) -> None:
        """See ``IdentityStore.revoke_token``."""
        await self._execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (self._clock(),))
        await self._execute(
            "INSERT INTO revoked_tokens (jti, user_id, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT(jti) DO NOTHING",
            (jti, user_id, float(expires_at)),
        )

    async def token_revoked(self, jti: str) -> bool:
        """See ``IdentityStore.token_revoked``."""
        return await self._fetch_one("SELECT 1 FROM revoked_tokens WHERE jti = ?", (jti,)) is not None

    async def get_token_owner(self, user_id: str, jti: str | None) -> TokenOwner | None:
        """See ``IdentityStore.get_token_owner``."""
        row = await self._fetch_one(_SELECT_TOKEN_OWNER, (jti, user_id))  # jti NULL matches no row
        if row is None:
            return None
        return TokenOwner(_user(row[:8]), bool(row[8]), CredentialLimits(user=_override(row[9:13])))

    async def touch_user(self, user_id: str, at: float | None = None) -> None:
        """See ``IdentityStore.touch_user``."""
        when = self._clock() if at is None else float(at)
        await self._execute("UPDATE users SET last_login_at = ? WHERE id = ?", (when, user_id))

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
            float(expires_at) if expires_at is not None else None,
            None,
            key_hash,
        )
        await self._execute(
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
                key.expires_at,
            ),
        )
        return _public(key)

    async def get_key_by_hash(self, key_hash: str) -> StoredApiKey | None:
        """See ``IdentityStore.get_key_by_hash``."""
        row = await self._fetch_one(_SELECT_KEY + " WHERE key_hash = ?", (key_hash,))
        return _key(row) if row else None

    async def get_key_and_owner(self, key_hash: str) -> KeyAndOwner | None:
        """See ``IdentityStore.get_key_and_owner``."""
        row = await self._fetch_one(_SELECT_KEY_AND_OWNER, (key_hash,))
        if row is None:
            return None
        limits = CredentialLimits(key=_override(row[17:21]), user=_override(row[21:25]))
        return KeyAndOwner(_key(row[:9]), _user(row[9:17]), limits)

    async def list_keys(self, user_id: str | None = None) -> list[ApiKey]:
        """See ``IdentityStore.list_keys``."""
        order = f" ORDER BY created_at, {self.insertion_order}"
        if user_id is None:
            rows = await self._fetch_all(_SELECT_KEY + order)
        else:
            rows = await self._fetch_all(_SELECT_KEY + " WHERE user_id = ?" + order, (user_id,))
        return [_public(_key(row)) for row in rows]

    async def revoke_key(self, key_id: str) -> bool:
        """See ``IdentityStore.revoke_key``."""
        sql = "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?"
        revoked = await self._execute(sql, (self._clock(), key_id)) > 0
        await self._announce_identity_change()
        return revoked

    # rate-limit overrides
    async def get_limit_overrides(self, subjects: Sequence[str]) -> dict[str, LimitOverride]:
        """See ``IdentityStore.get_limit_overrides``."""
        wanted = list(dict.fromkeys(subjects))
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        sql = f"SELECT subject, rpm, tpm, concurrency FROM limit_overrides WHERE subject IN ({marks})"
        rows = await self._fetch_all(sql, wanted)
        return {row[0]: LimitOverride(row[1], row[2], row[3]) for row in rows}

    async def set_limit_override(self, subject: str, override: LimitOverride) -> None:
        """See ``IdentityStore.set_limit_override``."""
        if override.empty:
            await self._execute("DELETE FROM limit_overrides WHERE subject = ?", (subject,))
        else:
            await self._execute(
                "INSERT INTO limit_overrides (subject, rpm, tpm, concurrency, updated_at) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(subject) DO UPDATE SET rpm = excluded.rpm, tpm = excluded.tpm, "
                "concurrency = excluded.concurrency, updated_at = excluded.updated_at",
                (subject, override.rpm, override.tpm, override.concurrency, self._clock()),
            )
        # key lookups carry their limits: the caches holding them drop them (here and on other replicas)
        await self._announce_identity_change()

    # sessions
    async def create_session(
        self, user_id: str, title: str, model: str, session_id: str | None = None
    ) -> ChatSession:
        """See ``IdentityStore.create_session``."""
        now = self._clock()
        session = ChatSession(session_id or uuid.uuid4().hex, user_id, title[:TITLE_MAX], model, now, now, 0)
        try:
            await self._execute(
                "INSERT INTO chat_sessions (id, user_id, title, model, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (session.id, user_id, session.title, model, now, now),
            )
        except DuplicateRowError:
            raise SessionExistsError("a chat session with this id exists already") from None
        return session

    async def get_session(self, session_id: str, user_id: str) -> ChatSession | None:
        """See ``IdentityStore.get_session``."""
        row = await self._fetch_one(
            _SELECT_SESSION + " WHERE s.id = ? AND s.user_id = ?", (session_id, user_id)
        )
        return ChatSession(*row) if row else None

    async def list_sessions(self, user_id: str, limit: int, offset: int) -> tuple[list[ChatSession], int]:
        """See ``IdentityStore.list_sessions``."""
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        rows = await self._fetch_all(
            f"{_SELECT_SESSION} WHERE s.user_id = ? ORDER BY s.updated_at DESC, s.created_at DESC, "
            f"s.{self.insertion_order} DESC LIMIT ? OFFSET ?",
            (user_id, limit, offset),
        )
        total = await self._fetch_one("SELECT COUNT(*) FROM chat_sessions WHERE user_id = ?", (user_id,))
        return [ChatSession(*row) for row in rows], int(total[0]) if total else 0

    async def delete_session(self, session_id: str, user_id: str) -> bool:
        """See ``IdentityStore.delete_session``."""
        sql = "DELETE FROM chat_sessions WHERE id = ? AND user_id = ?"
        return await self._execute(sql, (session_id, user_id)) > 0

    async def count_sessions(self) -> tuple[int, dict[str, int]]:
        """See ``IdentityStore.count_sessions``."""
        rows = await self._fetch_all(
            "SELECT u.username, COUNT(s.id) FROM users u JOIN chat_sessions s ON s.user_id = u.id "
            "GROUP BY u.username ORDER BY u.username"
        )
        per_user = {str(name): int(count) for name, count in rows}
        return sum(per_user.values()), per_user

    async def add_messages(self, user_id: str, session_id: str, messages: Sequence[tuple[str, str]]) -> None:
        """See ``IdentityStore.add_messages``."""
        now = self._clock()
        if not await self._execute_if_changed(
            "UPDATE chat_sessions SET updated_at = ? WHERE user_id = ? AND id = ?",
            (now, user_id, session_id),
            "INSERT INTO chat_messages (user_id, session_id, role, content, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [(user_id, session_id, role, content, now) for role, content in messages],
        ):
            raise SessionNotFoundError("no such chat session")

    async def list_messages(self, user_id: str, session_id: str) -> list[ChatMessage]:
        """See ``IdentityStore.list_messages``."""
        sql = (
            "SELECT role, content, created_at FROM chat_messages WHERE user_id = ? AND session_id = ? "
            "ORDER BY id"
        )
        return [ChatMessage(*row) for row in await self._fetch_all(sql, (user_id, session_id))]

    # stored responses (Responses API)
    async def save_response(self, response: StoredResponse) -> None:
        """See ``IdentityStore.save_response``."""
        await self._execute(
            f"INSERT INTO responses ({_RESPONSE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                response.id,
                response.user_id,
                response.previous_id,
                response.model,
                response.created_at,
                response.input,
                response.body,
            ),
        )

    async def get_response(self, response_id: str, user_id: str) -> StoredResponse | None:
        """See ``IdentityStore.get_response``."""
        row = await self._fetch_one(
            f"SELECT {_RESPONSE_COLUMNS} FROM responses WHERE id = ? AND user_id = ?", (response_id, user_id)
        )
        return StoredResponse(*row) if row else None

    async def response_chain(self, response_id: str, user_id: str) -> list[StoredResponse]:
        """See ``IdentityStore.response_chain``."""
        columns = ", ".join(f"r.{name}" for name in _RESPONSE_COLUMNS.split(", "))
        rows = await self._fetch_all(
            f"WITH RECURSIVE chain ({_RESPONSE_COLUMNS}, depth) AS ("
            f"SELECT {_RESPONSE_COLUMNS}, 0 FROM responses WHERE id = ? AND user_id = ? "
            f"UNION ALL SELECT {columns}, c.depth + 1 FROM responses r "
            "JOIN chain c ON r.id = c.previous_id AND r.user_id = c.user_id WHERE c.depth < ?) "
            f"SELECT {_RESPONSE_COLUMNS} FROM chain ORDER BY depth DESC",
            (response_id, user_id, RESPONSE_CHAIN_MAX),
        )
        return [StoredResponse(*row) for row in rows]

    async def delete_response(self, response_id: str, user_id: str) -> bool:
        """See ``IdentityStore.delete_response``."""
        sql = "DELETE FROM responses WHERE id = ? AND user_id = ?"
        return await self._execute(sql, (response_id, user_id)) > 0
