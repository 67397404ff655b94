"""Credentials to principals, and passwords to tokens; free of any web framework.

The HTTP layer hands over header strings (``Authorization``, ``x-api-key``) and maps
``AuthenticationError`` to 401, ``LoginThrottledError`` to 429, ``LoginBusyError`` and
``StoreUnavailableError`` to 503.

API-key authentication costs at most one round trip to the store (the key, its owner and the limit
overrides of both in one query), and none while the lookup is in the in-memory cache; the principal
carries the overrides, so admitting the request costs no round trip either. A key revoked, a user
disabled, or a limit override changed is seen:

- at once when the change is made in this process (the store reports it: ``on_identity_change``);
- at once on the other replicas of a PostgreSQL store (NOTIFY/LISTEN; milliseconds);
- within ``key_cache_ttl_s`` otherwise (2 s by default): SQLite changed by another process (the CLI),
  or PostgreSQL while a replica's notification connection is down. 0 turns the cache off: every change
  is seen at once, at one round trip per request.

One of our JWTs costs one round trip per request, never cached (the user, whether the token was revoked,
and the user's override in one query), so a logout or a disabled user is seen at once. A token of an
external identity provider costs the user lookup by name; its limit overrides are read by admission
(through its own short cache).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from auth.errors import (
    AuthenticationError,
    InvalidCredentialsError,
    InvalidTokenError,
    KeyPolicyError,
    LoginThrottledError,
)
from auth.keys import (
    constant_time_equals,
    generate_api_key,
    hash_api_key,
    is_well_formed_api_key,
    looks_like_api_key,
)
from auth.passwords import ScryptParams, dummy_verify, hash_password, needs_rehash, verify_password
from auth.principal import ALL_SCOPES, SCOPE_ADMIN, SCOPE_INFERENCE, Principal, as_role
from auth.store import ApiKey, IdentityStore, KeyAndOwner, User
from auth.throttle import LoginThrottle, PasswordHashGate, Throttle
from auth.tokens import (
    ExternalProvider,
    TokenSettings,
    decode_external,
    decode_token,
    issue_token,
    unverified_issuer,
)

logger = logging.getLogger("pocketllm.auth")

MAX_CREDENTIAL_LENGTH = 8192
_BAD_LOGIN = "invalid username or password"
_NO_ACCOUNT = "the account does not exist or is disabled"
_REVOKED_TOKEN = "this token has been revoked (logged out, or the password changed)"  # noqa: S105


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new API key: the stored record, and the full key (to show this once)."""

    record: ApiKey
    key: str


def credential_from_headers(authorization: str | None, api_key: str | None) -> str | None:
    """The credential a request carries.

    Args:
        authorization: the ``Authorization`` header (``Bearer <credential>``, scheme case-insensitive).
        api_key: the ``x-api-key`` header, used when there is no bearer credential.

    Returns:
        The credential, or None when neither header carries one.
    """
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if api_key and api_key.strip():
        return api_key.strip()
    return None


KeyLookup = KeyAndOwner


class KeyCache:
    """Recent API-key lookups (key record, owner and their limit overrides by the key's digest), each
    kept ``ttl_s`` seconds.

    Only keys that exist are kept (a key just created on another replica works at once); at most
    ``max_entries``, the least recently used dropped first.
    """

    def __init__(
        self, ttl_s: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Configure the cache (``ttl_s`` 0 keeps nothing)."""
        if ttl_s < 0 or max_entries < 1:
            raise ValueError("the key cache needs ttl_s >= 0 and max_entries >= 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, KeyLookup]] = OrderedDict()

    def get(self, digest: str) -> KeyLookup | None:
        """The lookup while it is fresh."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if self._clock() >= entry[0]:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return entry[1]

    def put(self, digest: str, lookup: KeyLookup) -> None:
        """Keep a lookup for ``ttl_s``."""
        if self.ttl_s <= 0:
            return
        self._entries[digest] = (self._clock() + self.ttl_s, lookup)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every lookup (after a revocation, a change of a user or of a limit override)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Authenticator:
    """Turns request credentials into principals; logs users in; creates users and keys."""

    def __init__(
        self,
        store: IdentityStore,
        tokens: TokenSettings,
        passwords: ScryptParams | None = None,
        external: ExternalProvider | None = None,
        throttle: Throttle | None = None,
        clock: Callable[[], float] = time.time,
        *,
        key_cache_ttl_s: float = 2.0,
        max_concurrent_hashes: int = 2,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """Wire the authenticator.

        Args:
            store: the identity store.
            tokens: our own JWT settings.
            passwords: password-hashing parameters (OWASP's scrypt when None).
            external: an external identity provider whose tokens are accepted too.
            throttle: the login throttle (in process, ``ThrottlePolicy``'s defaults when None).
            clock: unix seconds, for key expiry and last-login times (tokens always use wall time).
            key_cache_ttl_s: how long an API-key lookup is reused: the bound on how late a change made
                elsewhere is seen (0: no cache).
            max_concurrent_hashes: password hashes at once; a login beyond them gets ``LoginBusyError``.
            monotonic: monotonic seconds, for the key cache (injectable for tests).
        """
        if external is not None and external.issuer == tokens.issuer:
            raise ValueError("the external identity provider's issuer must differ from our own")
        self.store = store
        self.tokens = tokens
        self.passwords = passwords or ScryptParams()
        self.external = external
        self.throttle: Throttle = throttle or LoginThrottle()
        self.key_cache = KeyCache(key_cache_ttl_s, clock=monotonic)
        store.on_identity_change(self.key_cache.clear)
        self.hash_gate = PasswordHashGate(max_concurrent_hashes)
        self._clock = clock

    async def authenticate(self, authorization: str | None, api_key: str | None = None) -> Principal:
        """The principal behind a request's credentials.

        Args:
            authorization: the ``Authorization`` header value, if any.
            api_key: the ``x-api-key`` header value, if any.

        Returns:
            The principal. A key's scopes and model list come from the key; a JWT grants
            ``inference``, plus ``admin`` for admins.

        Raises:
            AuthenticationError: missing, malformed, invalid, revoked or expired credentials, or a
                missing or disabled account.
        """
        credential = credential_from_headers(authorization, api_key)
        if credential is None:
            raise AuthenticationError("missing credentials: send `Authorization: Bearer <key or token>`")
        if len(credential) > MAX_CREDENTIAL_LENGTH:
            raise AuthenticationError("the credential is too long")
        if looks_like_api_key(credential):
            return await self._from_key(credential)
        return await self._from_token(credential)

    async def _from_key(self, key: str) -> Principal:
        if not is_well_formed_api_key(key):
            raise AuthenticationError("invalid API key")
        digest = hash_api_key(key)
        found = self.key_cache.get(digest)
        if found is None:
            found = await self.store.get_key_and_owner(digest)
            if found is None or not constant_time_equals(found.key.key_hash, digest):
                raise AuthenticationError("invalid API key")
            self.key_cache.put(digest, found)
        record, user = found.key, found.owner
        if record.revoked:
            raise AuthenticationError("this API key has been revoked")
        if record.expired(self._clock()):
            raise AuthenticationError("this API key has expired")
        if user.disabled:
            raise AuthenticationError(_NO_ACCOUNT)
        scopes = frozenset(record.scopes)
        if user.role != "admin":
            scopes -= {SCOPE_ADMIN}  # the owner may have lost the role since the key was made
        models = frozenset(record.models) if record.models is not None else None
        return Principal(user.id, user.username, user.role, scopes, record.id, models, limits=found.limits)

    async def _from_token(self, token: str) -> Principal:
        try:
            limits = None
            if self.external is not None and unverified_issuer(token) == self.external.issuer:
                claims = decode_external(token, self.external)
                user = await self._external_user(claims.username)
                token_id = None  # the provider's tokens are revoked at the provider
            else:
                claims = decode_token(token, self.tokens)
                token_id = claims.jti
                owner = await self.store.get_token_owner(claims.sub, token_id)  # the one round trip
                if owner is None or owner.user.disabled:
                    raise AuthenticationError(_NO_ACCOUNT)
                user, limits = owner.user, owner.limits
                if claims.version != user.token_version or owner.token_revoked:
                    raise AuthenticationError(_REVOKED_TOKEN)
        except InvalidTokenError as exc:
            raise AuthenticationError(str(exc)) from None
        scopes = {SCOPE_INFERENCE} | ({SCOPE_ADMIN} if user.role == "admin" else set())
        return Principal(
            user.id,
            user.username,
            user.role,
            frozenset(scopes),
            token_id=token_id,
            expires_at=claims.exp,
            limits=limits,
        )

    async def _active_user(
        self, user_id: str, refused: type[AuthenticationError] = AuthenticationError
    ) -> User:
        user = await self.store.get_user(user_id)
        if user is None or user.disabled:
            raise refused(_NO_ACCOUNT)
        return user

    async def _external_user(self, username: str | None) -> User:
        assert self.external is not None
        if not username or len(username) > 256:
            raise AuthenticationError("the token names no user")
        user = await self.store.get_user_by_name(username)
        if user is None and self.external.create_users:
            user = await self.store.create_user(username, None, "user")
            logger.info("created the user %r on first sight from the identity provider", username)
        if user is None or user.disabled:
            raise AuthenticationError(_NO_ACCOUNT)
        return user

    async def login(self, username: str, password: str, client: str) -> tuple[User, str]:
        """Check a password and issue a token.

        Unknown users, users without a password and disabled users cost one hash and get the same
        answer as a wrong password. A hash made with weaker parameters than configured is replaced.

        Args:
            username: the name sent.
            password: the password sent.
            client: the client address (for throttling).

        Returns:
            ``(user, token)``.

        Raises:
            LoginBusyError: every password-hash slot is taken (nothing was counted).
            LoginThrottledError: the (address, username) pair must wait, or the address has failed too
                often.
            InvalidCredentialsError: wrong credentials (one message for every reason).
        """
        with self.hash_gate.slot():
            decision = await self.throttle.attempt(username, client)
            if decision.blocked:
                raise LoginThrottledError(decision.retry_after)
            user = await self.store.get_user_by_name(username)
            if user is None or user.password_hash is None or user.disabled:
                await asyncio.to_thread(dummy_verify, self.passwords)
                raise InvalidCredentialsError(_BAD_LOGIN)
            if not await asyncio.to_thread(verify_password, password, user.password_hash):
                raise InvalidCredentialsError(_BAD_LOGIN)
            await self.throttle.succeeded(username, client, decision)
            if needs_rehash(user.password_hash, self.passwords):
                digest = await asyncio.to_thread(hash_password, password, self.passwords)
                await self.store.set_password_hash(user.id, digest)
        await self.store.touch_user(user.id, self._clock())
        # wall time, not ``clock``: pyjwt checks exp/nbf/iat against wall time
        return user, issue_token(user.id, user.username, user.role, self.tokens, version=user.token_version)

    async def logout(self, principal: Principal, *, everywhere: bool = False) -> None:
        """Revoke the token a request came with, or every token of its user.

        Args:
            principal: the caller, authenticated by one of our tokens.
            everywhere: revoke every token the user holds (bumps their token version), not just this one.

        Raises:
            KeyPolicyError: the caller used an API key (keys are revoked through ``DELETE /admin/keys``)
                or another provider's token (revoked at that provider).
        """
        if everywhere and principal.key_id is None:
            await self.store.revoke_all_tokens(principal.user_id)
            return
        if principal.token_id is None or principal.expires_at is None:
            raise KeyPolicyError("only a token from /auth/login can log out; an API key is revoked instead")
        await self.store.revoke_token(principal.token_id, principal.user_id, principal.expires_at)

    async def change_password(
        self, principal: Principal, current: str, new: str, client: str
    ) -> tuple[User, str]:
        """Change the caller's own password; every older token of theirs is refused from now on.

        The current password is checked like a login (throttled, one hash slot).

        Args:
            principal: the caller.
            current: their current password.
            new: the new password.
            client: the client address (for throttling).

        Returns:
            ``(user, token)``: a fresh token, the only one of the user's tokens that still works.

        Raises:
            LoginBusyError: every password-hash slot is taken.
            LoginThrottledError: too many wrong passwords.
            InvalidCredentialsError: the current password is wrong (or the account cannot use passwords, or
                it has been disabled or deleted meanwhile).
        """
        with self.hash_gate.slot():
            decision = await self.throttle.attempt(principal.username, client)
            if decision.blocked:
                raise LoginThrottledError(decision.retry_after)
            user = await self._active_user(principal.user_id, InvalidCredentialsError)
            if user.password_hash is None or not await asyncio.to_thread(
                verify_password, current, user.password_hash
            ):
                raise InvalidCredentialsError("the current password is wrong")
            await self.throttle.succeeded(principal.username, client, decision)
            digest = await asyncio.to_thread(hash_password, new, self.passwords)
        version = await self.store.change_password(user.id, digest)
        return user, issue_token(user.id, user.username, user.role, self.tokens, version=version)

    async def create_user(self, username: str, password: str, role: str = "user") -> User:
        """A new user with a hashed password.

        Args:
            username: the new name.
            password: the plaintext password (hashed off the event loop).
            role: ``user`` or ``admin``.

        Returns:
            The stored user.

        Raises:
            ValueError: for an unknown role.
            UserExistsError: when the name is taken.
        """
        checked = as_role(role)
        digest = await asyncio.to_thread(hash_password, password, self.passwords)
        return await self.store.create_user(username, digest, checked)

    async def create_key(
        self,
        user: User,
        scopes: frozenset[str] | None = None,
        models: list[str] | None = None,
        expires_at: float | None = None,
    ) -> IssuedKey:
        """A new API key for a user.

        Args:
            user: the owner.
            scopes: granted scopes (``inference`` when None); ``admin`` only for admins.
            models: the allowed models (any when None).
            expires_at: unix seconds after which the key is refused (never when None).

        Returns:
            The stored record and the full key (to show once).

        Raises:
            KeyPolicyError: an unknown scope, no scope, or ``admin`` for a non-admin (a ValueError).
        """
        granted = scopes if scopes is not None else frozenset({SCOPE_INFERENCE})
        if not granted:
            raise KeyPolicyError("a key needs at least one scope")
        if not granted <= ALL_SCOPES:
            raise KeyPolicyError(f"unknown scopes: {', '.join(sorted(granted - ALL_SCOPES))}")
        if SCOPE_ADMIN in granted and user.role != "admin":
            raise KeyPolicyError("only admin users can hold admin-scoped keys")
        key, digest, last4 = generate_api_key()
        record = await self.store.create_key(user.id, digest, last4, sorted(granted), models, expires_at)
        return IssuedKey(record, key)
