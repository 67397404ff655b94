"""Start-up identity chores: PocketLLM's default development users, and the production secret check."""

from __future__ import annotations

import asyncio

from auth.errors import InsecureConfigurationError
from auth.passwords import ScryptParams, hash_password
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


def check_production_secrets(secret_key: str, jwt_secret: str | None) -> None:
    """Refuse secrets that must not be used in production.

    Args:
        secret_key: the ``SECRET_KEY`` setting.
        jwt_secret: the JWT signing secret; ``secret_key`` signs when None.

    Raises:
        InsecureConfigurationError: when ``secret_key`` is the public default, or the signing secret
            is shorter than 32 bytes. The message names the setting and never contains the secret.
    """
    if secret_key == DEFAULT_SECRET_KEY:
        raise InsecureConfigurationError(
            "SECRET_KEY is the public development default "
            f"({DEFAULT_SECRET_KEY!r}); production needs a secret of its own"
        )
    signing = jwt_secret if jwt_secret is not None else secret_key
    if len(signing.encode("utf-8")) < MIN_JWT_SECRET_BYTES:
        which = "the JWT secret" if jwt_secret is not None else "SECRET_KEY (which signs JWTs)"
        raise InsecureConfigurationError(
            f"{which} is shorter than {MIN_JWT_SECRET_BYTES} bytes; production needs at least "
            f"{MIN_JWT_SECRET_BYTES} random bytes (e.g. `python -c 'import secrets; "
            "print(secrets.token_urlsafe(48))'`)"
        )
