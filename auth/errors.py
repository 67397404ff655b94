"""The exceptions of the identity layer.

Every message is safe to show a caller: none contains a token, a key, a password or a hash. The HTTP
layer maps them to responses (``AuthenticationError`` -> 401, ``LoginThrottledError`` -> 429,
``StoreUnavailableError`` -> 503, ...).
"""

from __future__ import annotations


class AuthError(Exception):
    """Base class of the identity layer's errors."""


class AuthenticationError(AuthError):
    """Missing, malformed, invalid, expired or revoked credentials, or a disabled account."""


class InvalidCredentialsError(AuthenticationError):
    """A password check failed: a login, or the current password of a password change (401
    ``invalid_credentials``, where a refused key or token is ``invalid_api_key``)."""


class InvalidTokenError(AuthenticationError):
    """A JWT that must not be accepted (bad signature, algorithm, claims or timing)."""


class LoginThrottledError(AuthError):
    """Too many failed logins for the (address, username) pair or the client address.

    Attributes:
        retry_after: whole seconds until a login may be tried again (at least 1).
    """

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed logins")
        self.retry_after = retry_after


class LoginBusyError(AuthError):
    """Every password-hash slot of this process is taken: the login is refused at once (503).

    Attributes:
        retry_after: whole seconds after which to try again.
    """

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many logins at once; try again shortly")
        self.retry_after = retry_after


class UserExistsError(AuthError):
    """A user with this name exists already."""


class LastAdminError(AuthError):
    """The change would leave no enabled admin (nobody could enable anyone again)."""


class SessionExistsError(AuthError):
    """A chat session with this id exists already (possibly another user's)."""


class SessionNotFoundError(AuthError, LookupError):
    """The chat session does not exist."""


class KeyPolicyError(AuthError, ValueError):
    """An API key request the policy refuses (unknown scope, admin scope for a non-admin)."""


class InsecureConfigurationError(AuthError, ValueError):
    """Production settings that must not be used (the public default secret, a short JWT secret)."""


class StoreClosedError(AuthError, RuntimeError):
    """The identity store has been closed."""


class StoreUnavailableError(AuthError, ConnectionError):
    """The identity store cannot be reached now (a server down, no free connection in time).

    A transient condition: the HTTP layer answers 503 (with ``Retry-After``), never 500; the store
    reconnects by itself when the server is back.
    """
