"""Former home of the authenticator, kept so that existing imports keep working.

New code imports from ``auth.authenticate``, ``auth.bootstrap`` and ``auth.errors``; this module goes
once the gateway does.
"""

from __future__ import annotations

from auth import bootstrap
from auth.authenticate import Authenticator, IssuedKey
from auth.bootstrap import DEFAULT_USERS
from auth.errors import AuthenticationFailedError, LoginThrottledError

__all__ = [
    "DEFAULT_USERS",
    "AuthenticationFailedError",
    "Authenticator",
    "IssuedKey",
    "LoginThrottledError",
    "ensure_default_users",
]


async def ensure_default_users(auth: Authenticator) -> list[str]:
    """Development mode: create PocketLLM's default users when absent.

    Args:
        auth: the authenticator (its store and password parameters are used).

    Returns:
        The names of the users created.
    """
    created = await bootstrap.ensure_default_users(auth.store, auth.passwords)
    return [user.username for user in created]
