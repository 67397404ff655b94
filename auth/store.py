"""The identity and chat-session store: records and the interface every backend implements.

Conventions every backend keeps (the contract suite in ``tests/unit/auth/test_store_contract.py``
checks them):

- Ids are uuid4 hex strings (32 lowercase hex characters) made by the store; a chat session may
  instead take an id chosen by the caller (the ``X-Session-Id`` header). Session ids are per user: two
  users may each have a session ``s1``, and neither can tell that the other's exists.
- Timestamps are unix seconds as floats.
- Another user's session is indistinguishable from a missing one (``None`` / ``False``).
- Listing keys never returns a key's hash; only ``get_key_by_hash`` returns it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from auth.errors import LastAdminError, SessionExistsError, SessionNotFoundError, UserExistsError
from auth.limits import UNLIMITED, CredentialLimits, LimitOverride
from auth.principal import Role

if TYPE_CHECKING:
    from auth.sqlite_store import SQLiteStore

__all__ = [
    "UNLIMITED",
    "ApiKey",
    "ChatMessage",
    "ChatSession",
    "CredentialLimits",
    "IdentityStore",
    "KeyAndOwner",
    "LastAdminError",
    "LimitOverride",
    "SQLiteStore",
    "SessionExistsError",
    "SessionNotFoundError",
    "StoredApiKey",
    "StoredResponse",
    "TokenOwner",
    "User",
    "UserExistsError",
]


@dataclass(frozen=True, slots=True)
class User:
    """A user account (its ``repr`` leaves the password hash out)."""

    id: str
    username: str
    role: Role
    created_at: float
    disabled_at: float | None
    password_hash: str | None = field(repr=False)
    """None for users who cannot log in with a password (created from an external identity provider)."""
    last_login_at: float | None = None
    token_version: int = 0
    """Our tokens carry the version they were issued at; bumping it (a password change, "log out
    everywhere") refuses every older token."""

    @property
    def disabled(self) -> bool:
        """Whether the account is disabled."""
        return self.disabled_at is not None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as listed: never the key, never its hash; the last four characters for display."""

    id: str
    user_id: str
    last4: str
    scopes: tuple[str, ...]
    models: tuple[str, ...] | None
    """The allowed models, or None for any."""
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    @property
    def revoked(self) -> bool:
        """Whether the key has been revoked."""
        return self.revoked_at is not None

    def expired(self, now: float) -> bool:
        """Whether the key has expired at ``now`` (unix seconds)."""
        return self.expires_at is not None and self.expires_at <= now


@dataclass(frozen=True, slots=True)
class StoredApiKey(ApiKey):
    """A key found by its digest, with the digest (for a constant-time re-check)."""

    key_hash: str = field(default="", repr=False)


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


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """One stored response of the Responses API: the input items of its turn and the response object,
    both as JSON text (the gateway's wire format; the store does not look inside)."""

    id: str
    user_id: str
    previous_id: str | None
    """The response this one continued (``previous_response_id``), or None for a conversation's first."""
    model: str
    created_at: float
    input: str
    body: str


@dataclass(frozen=True, slots=True)
class KeyAndOwner:
    """An API key found by its digest, its owner, and their limit overrides: one round trip."""

    key: StoredApiKey
    owner: User
    limits: CredentialLimits
    """The overrides of ``key:<key.id>`` and ``user:<owner.id>``."""


@dataclass(frozen=True, slots=True)
class TokenOwner:
    """The user one of our tokens names, whether that token was revoked, and the user's limit override:
    one round trip."""

    user: User
    token_revoked: bool
    """Whether the token's ``jti`` is among the revoked ones (False when the token has no ``jti``)."""
    limits: CredentialLimits
    """The override of ``user:<user.id>`` (``key`` is None)."""


@runtime_checkable
class IdentityStore(Protocol):
    """Users, API keys, chat sessions and messages."""

    @property
    def dialect(self) -> str:
        """Which backend: ``sqlite`` or ``postgresql``."""
        ...

    async def create_user(self, username: str, password_hash: str | None, role: Role) -> User:
        """Create a user; raises ``UserExistsError`` when the name is taken."""
        ...

    async def get_user(self, user_id: str) -> User | None:
        """A user by id."""
        ...

    async def get_user_by_name(self, username: str) -> User | None:
        """A user by exact (case-sensitive) name."""
        ...

    async def list_users(self) -> list[User]:
        """Every user, oldest first."""
        ...

    async def disable_user(self, user_id: str) -> User | None:
        """Disable a user (idempotent: the first time stays); None when there is no such user.

        Raises:
            LastAdminError: the user is the last enabled admin (nothing changed).
        """
        ...

    async def enable_user(self, user_id: str) -> User | None:
        """Enable a disabled user (idempotent); None when there is no such user."""
        ...

    async def set_password_hash(self, user_id: str, password_hash: str) -> None:
        """Replace a user's password hash (a rehash: the user's tokens stay valid)."""
        ...

    async def change_password(self, user_id: str, password_hash: str) -> int:
        """Replace a user's password hash and bump their token version (every older token is refused);
        returns the new version."""
        ...

    async def revoke_all_tokens(self, user_id: str) -> int:
        """Bump a user's token version (every token issued so far is refused); returns the new version."""
        ...

    async def revoke_token(self, jti: str, user_id: str, expires_at: float) -> None:
        """Refuse one token (by its ``jti``) until it expires anyway (the record is dropped after)."""
        ...

    async def token_revoked(self, jti: str) -> bool:
        """Whether a token id has been revoked."""
        ...

    async def get_token_owner(self, user_id: str, jti: str | None) -> TokenOwner | None:
        """The user a token names, whether the token ``jti`` was revoked, and the user's limit override,
        in one round trip (the hot path of JWT authentication); None when there is no such user."""
        ...

    async def touch_user(self, user_id: str, at: float | None = None) -> None:
        """Record a successful login at ``at`` (now when None)."""
        ...

    async def create_key(
        self,
        user_id: str,
        key_hash: str,
        last4: str,
        scopes: Sequence[str],
        models: Sequence[str] | None,
        expires_at: float | None,
    ) -> ApiKey:
        """Store a new key's digest for its owner."""
        ...

    async def get_key_by_hash(self, key_hash: str) -> StoredApiKey | None:
        """The key with this digest, revoked or not."""
        ...

    async def get_key_and_owner(self, key_hash: str) -> KeyAndOwner | None:
        """The key with this digest, its owner and the limit overrides of both, in one round trip (the hot
        path of API-key authentication: admission then needs no store round trip of its own)."""
        ...

    async def list_keys(self, user_id: str | None = None) -> list[ApiKey]:
        """Keys oldest first, of one user when ``user_id`` is given."""
        ...

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke a key (idempotent); False when there is no such key."""
        ...

    async def get_limit_overrides(self, subjects: Sequence[str]) -> dict[str, LimitOverride]:
        """The stored overrides of these subjects (``"key:<id>"``, ``"user:<id>"``); absent ones are left
        out."""
        ...

    async def set_limit_override(self, subject: str, override: LimitOverride) -> None:
        """Store a subject's override; an ``empty`` one deletes it (back to the defaults)."""
        ...

    async def create_session(
        self, user_id: str, title: str, model: str, session_id: str | None = None
    ) -> ChatSession:
        """A new empty session; ``SessionExistsError`` when this user has a session of that id."""
        ...

    async def get_session(self, session_id: str, user_id: str) -> ChatSession | None:
        """The session when it exists and is ``user_id``'s."""
        ...

    async def list_sessions(self, user_id: str, limit: int, offset: int) -> tuple[list[ChatSession], int]:
        """A page of the user's sessions, most recently updated first, and how many they have."""
        ...

    async def delete_session(self, session_id: str, user_id: str) -> bool:
        """Delete the user's session and its messages; False when missing or another user's."""
        ...

    async def count_sessions(self) -> tuple[int, dict[str, int]]:
        """Sessions in total and per username (users without sessions are left out)."""
        ...

    async def add_messages(self, user_id: str, session_id: str, messages: Sequence[tuple[str, str]]) -> None:
        """Append ``(role, content)`` turns to the user's session atomically; ``SessionNotFoundError`` when
        the user has no such session."""
        ...

    async def list_messages(self, user_id: str, session_id: str) -> list[ChatMessage]:
        """The messages of the user's session in the order they were added (empty when there is none)."""
        ...

    async def save_response(self, response: StoredResponse) -> None:
        """Store a response for its user (``response.user_id``); ids are unique per user."""
        ...

    async def get_response(self, response_id: str, user_id: str) -> StoredResponse | None:
        """The response when it exists and is ``user_id``'s."""
        ...

    async def response_chain(self, response_id: str, user_id: str) -> list[StoredResponse]:
        """The user's response and those it continued (``previous_id`` links), oldest first; empty when
        there is no such response of this user. A deleted response ends the chain there."""
        ...

    async def delete_response(self, response_id: str, user_id: str) -> bool:
        """Delete the user's response; False when missing or another user's."""
        ...

    def on_identity_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every change made through this store object that can refuse or admit
        a credential or change what it may do (a key revoked, a user disabled or enabled, a limit override
        set), so that caches of lookups in this process drop them at once. A backend that can reach the
        other replicas (PostgreSQL) reports their changes too; changes made elsewhere on SQLite (the CLI)
        are not reported."""
        ...

    async def open(self) -> None:
        """Connect and migrate now (idempotent); a backend that opened in its constructor does nothing.

        Raises:
            StoreUnavailableError: the backend cannot be reached.
        """
        ...

    async def close(self) -> None:
        """Release the backend; idempotent."""
        ...


def __getattr__(name: str) -> Any:
    # The gateway imports ``SQLiteStore`` from here; it lives in ``auth.sqlite_store`` (lazy, no cycle).
    if name == "SQLiteStore":
        from auth.sqlite_store import SQLiteStore  # noqa: PLC0415

        return SQLiteStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
