"""Start-up identity chores: PocketLLM's default development users, the signing-secret rule, and the
production refusal of accounts that keep a development default password."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

from auth.errors import InsecureConfigurationError
from auth.passwords import ScryptParams, hash_password, verify_password
from auth.principal import Role
from auth.store import IdentityStore, User

DEFAULT_SECRET_KEY = "change-me-in-production"  # noqa: S105 - the public development default, refused in production
MIN_JWT_SECRET_BYTES = 32

DEFAULT_USERS: tuple[tuple[str, str, Role], ...] = (
    ("user1", "password123", "user"),
    ("admin", "admin123", "admin"),
)
"""PocketLLM's documented development accounts: (username, password, role)."""


async def ensure_default_users(store: IdentityStore, params: ScryptParams) -> list[User]:
    """Create PocketLLM's default users when absent. Call it in development mode only.

    Existing users of those names are left as they are (their passwords are not reset).

    Args:
        store: the identity store.
        params: the password-hashing parameters (hashing runs off the event loop).

    Returns:
        The users created (empty when all existed), so the caller can log their names.
    """
    created: list[User] = []
    for username, password, role in DEFAULT_USERS:
        if await store.get_user_by_name(username) is not None:
            continue
        digest = await asyncio.to_thread(hash_password, password, params)
        created.append(await store.create_user(username, digest, role))
    return created


KNOWN_SECRETS: tuple[str, ...] = (
    DEFAULT_SECRET_KEY,
    "changeme",
    "change-me",
    "secret",
    "password",
    "jwt-secret",
    "your-secret-key",
    "pocketllm",
)
"""Published or guessable words: they add nothing to a secret (the rule strips them before measuring)."""

MIN_SECRET_BITS = 96


def estimated_bits(text: str) -> float:
    """A secret's entropy estimated from its own characters: length x the empirical Shannon entropy of
    their distribution (a string of one repeated character has 0 bits; 64 url-safe random characters
    have about 350).

    Args:
        text: the secret.

    Returns:
        The estimate in bits.
    """
    if not text:
        return 0.0
    counts = Counter(text)
    per_char = -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())
    return per_char * len(text)


def _period(text: str) -> int:
    """The length of the shortest unit whose repetition makes ``text`` (its own length when none)."""
    for size in range(1, len(text) // 2 + 1):
        if text[size:] == text[:-size]:
            return size
    return len(text)


def weak_secret_reason(secret: str) -> str | None:
    """Why a signing secret is guessable, or None when it passes the rule.

    The rule (the same in production and for a development ``SECRET_KEY`` that is set):

    1. at least 32 bytes (UTF-8);
    2. once every known word (``KNOWN_SECRETS``: the public development default, ``secret``,
       ``changeme``...; case-insensitive) is taken out, what remains is still at least 32 bytes (the
       default doubled, or ``secret`` six times, is refused);
    3. no repetition of a unit at most half its length (``'a' * 32``, ``'abcd' * 8``);
    4. at least 96 bits by ``estimated_bits`` (``secrets.token_hex(16)``, 32 hex characters, has ~115;
       ``secrets.token_urlsafe(48)`` ~350).

    Args:
        secret: the candidate secret.

    Returns:
        A reason that never contains the secret, or None.
    """
    if len(secret.encode("utf-8")) < MIN_JWT_SECRET_BYTES:
        return f"is shorter than {MIN_JWT_SECRET_BYTES} bytes"
    remaining = secret.lower()
    for word in KNOWN_SECRETS:
        remaining = remaining.replace(word, "")
    if len(remaining.encode("utf-8")) < MIN_JWT_SECRET_BYTES:
        return "is made of a published default or common words"
    if _period(secret) <= len(secret) // 2:
        return "is a repetition of a shorter string"
    if estimated_bits(secret) < MIN_SECRET_BITS:
        return f"has too little variety (under {MIN_SECRET_BITS} bits estimated)"
    return None


def check_secrets(secret_key: str, jwt_secret: str | None, *, production: bool) -> None:
    """Refuse guessable signing secrets (the rule of ``weak_secret_reason``).

    Production needs a secret of its own. In development an unset ``SECRET_KEY`` (the public default)
    is allowed: the gateway then signs with a random secret kept in the data directory; a secret that is
    set must pass the same rule as in production.

    Args:
        secret_key: the ``SECRET_KEY`` setting.
        jwt_secret: the JWT signing secret; ``secret_key`` signs when None.
        production: whether the gateway runs in production.

    Raises:
        InsecureConfigurationError: naming the setting, never containing the secret.
    """
    if production and secret_key == DEFAULT_SECRET_KEY:
        raise InsecureConfigurationError(
            "SECRET_KEY is the public development default "
            f"({DEFAULT_SECRET_KEY!r}); production needs a secret of its own"
        )
    if jwt_secret is None and secret_key == DEFAULT_SECRET_KEY:
        return
    signing = jwt_secret if jwt_secret is not None else secret_key
    reason = weak_secret_reason(signing)
    if reason is not None:
        which = "the JWT secret" if jwt_secret is not None else "SECRET_KEY (which signs JWTs)"
        raise InsecureConfigurationError(
            f"{which} {reason}; it must be at least {MIN_JWT_SECRET_BYTES} random bytes "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
        )


def check_production_secrets(secret_key: str, jwt_secret: str | None) -> None:
    """``check_secrets`` for production."""
    check_secrets(secret_key, jwt_secret, production=True)


async def accounts_with_default_passwords(store: IdentityStore) -> list[str]:
    """The enabled accounts that still have their development default password (``DEFAULT_USERS``).

    Production refuses to start while this is not empty: a data directory made in development keeps
    ``admin`` / ``admin123`` otherwise. Each check is one password verification, off the event loop.

    Args:
        store: the identity store.

    Returns:
        The usernames, in ``DEFAULT_USERS`` order.
    """
    found: list[str] = []
    for username, password, _ in DEFAULT_USERS:
        user = await store.get_user_by_name(username)
        if user is None or user.disabled or user.password_hash is None:
            continue
        if await asyncio.to_thread(verify_password, password, user.password_hash):
            found.append(username)
    return found


async def refuse_default_passwords(store: IdentityStore) -> None:
    """Raise when an enabled account still has its development default password.

    Raises:
        InsecureConfigurationError: naming the accounts and how to fix them.
    """
    found = await accounts_with_default_passwords(store)
    if found:
        raise InsecureConfigurationError(
            f"the account(s) {', '.join(found)} still have their development default password; change it "
            "(`pocketllm users password NAME`, or POST /auth/password) or disable the account before "
            "starting in production"
        )
