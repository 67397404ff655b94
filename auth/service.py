"""Authentication: credentials to principals, logins to tokens, and the default users."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from auth.keys import generate_api_key, hash_api_key, looks_like_api_key, same_digest
from auth.passwords import ScryptParams, dummy_verify, hash_password, needs_rehash, verify_password
from auth.principal import ALL_SCOPES, SCOPE_ADMIN, SCOPE_INFERENCE, Principal
from auth.store import ApiKey, IdentityStore, User
from auth.throttle import LoginThrottle
from auth.tokens import (
    ExternalProvider,
    InvalidTokenError,
    TokenConfig,
    decode_external,
    decode_token,
    is_external,
    issue_token,
)

logger = logging.getLogger("pocketllm.auth")

DEFAULT_USERS = (("user1", "password123", "user"), ("admin", "admin123", "admin"))


class AuthenticationFailedError(Exception):
    """Missing, invalid, expired or revoked credentials (the message is safe to show)."""


class LoginThrottledError(Exception):
    """Too many failed logins; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed logins")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new API key: the stored record and the full key, shown this once."""

    record: ApiKey
    key: str


class Authenticator:
    """Turns ``Authorization``/``x-api-key`` credentials into principals; logs users in."""

    def __init__(
        self,
        store: IdentityStore,
        tokens: TokenConfig,
        passwords: ScryptParams,
        external: ExternalProvider | None = None,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.passwords = passwords
        self.external = external
        self.throttle = throttle or LoginThrottle()

    async def authenticate(self, authorization: str | None, api_key: str | None) -> Principal:
        """The principal behind the request's credentials."""
        credential = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                credential = value.strip()
        credential = credential or (api_key.strip() if api_key else None)
        if not credential:
            raise AuthenticationFailedError(
                "missing credentials: send `Authorization: Bearer <key or token>`"
            )
        if looks_like_api_key(credential):
            return await self._from_key(credential)
        return await self._from_token(credential)

    async def _from_key(self, key: str) -> Principal:
        digest = hash_api_key(key)
        record = await self.store.get_key_by_hash(digest)
        if record is None or not same_digest(record.key_hash, digest):
            raise AuthenticationFailedError("invalid API key")
        if record.revoked_at is not None:
            raise AuthenticationFailedError("this API key has been revoked")
        if record.expires_at is not None and record.expires_at <= time.time():
            raise AuthenticationFailedError("this API key has expired")
        user = await self._active_user(record.user_id)
        return Principal(
            user.id,
            user.username,
            user.role,
            frozenset(record.scopes),
            record.id,
            frozenset(record.models) if record.models is not None else None,
        )

    async def _from_token(self, token: str) -> Principal:
        try:
            if is_external(token, self.external):
                assert self.external is not None
                claims = decode_external(self.external, token)
                user = await self._external_user(str(claims.get(self.external.username_claim, "")))
            else:
                claims = decode_token(self.tokens, token)
                user = await self._active_user(str(claims["sub"]))
        except InvalidTokenError as exc:
            raise AuthenticationFailedError(str(exc)) from None
        scopes = {SCOPE_INFERENCE} | ({SCOPE_ADMIN} if user.role == "admin" else set())
        return Principal(user.id, user.username, user.role, frozenset(scopes))

    async def _active_user(self, user_id: str) -> User:
        user = await self.store.get_user(user_id)
        if user is None or user.disabled:
            raise AuthenticationFailedError("the account does not exist or is disabled")
        return user

    async def _external_user(self, username: str) -> User:
        assert self.external is not None
        if not username:
            raise AuthenticationFailedError("the token names no user")
        user = await self.store.get_user_by_name(username)
        if user is None and self.external.create_users:
            user = await self.store.create_user(username, None, "user")
            logger.info("created user %s on first sight from the identity provider", username)
        if user is None or user.disabled:
            raise AuthenticationFailedError("the account does not exist or is disabled")
        return user

    async def login(self, username: str, password: str, client: str) -> tuple[User, str]:
        """Check a password (throttled, same answer for unknown user and wrong password); issue a token."""
        wait = self.throttle.retry_after(username, client)
        if wait:
            raise LoginThrottledError(wait)
        user = await self.store.get_user_by_name(username)
        if user is None or user.password_hash is None or user.disabled:
            await asyncio.to_thread(dummy_verify, self.passwords)
            self.throttle.failed(username, client)
            raise AuthenticationFailedError("invalid username or password")
        if not await asyncio.to_thread(verify_password, password, user.password_hash):
            self.throttle.failed(username, client)
            raise AuthenticationFailedError("invalid username or password")
        self.throttle.succeeded(username)
        if needs_rehash(user.password_hash, self.passwords):
            await self.store.set_password_hash(
                user.id, await asyncio.to_thread(hash_password, password, self.passwords)
            )
        return user, issue_token(self.tokens, user_id=user.id, username=user.username, role=user.role)

    async def create_user(self, username: str, password: str, role: str) -> User:
        """A new user with a hashed password."""
        digest = await asyncio.to_thread(hash_password, password, self.passwords)
        return await self.store.create_user(username, digest, role)

    async def create_key(
        self, user: User, scopes: frozenset[str] | None, models: list[str] | None, expires_at: float | None
    ) -> IssuedKey:
        """A new API key for ``user`` (admin scope only for admins)."""
        granted = scopes if scopes is not None else frozenset({SCOPE_INFERENCE})
        if not granted <= ALL_SCOPES:
            raise ValueError(f"unknown scopes: {', '.join(sorted(granted - ALL_SCOPES))}")
        if SCOPE_ADMIN in granted and user.role != "admin":
            raise ValueError("only admin users can hold admin-scoped keys")
        key, digest, last4 = generate_api_key()
        record = await self.store.create_key(user.id, digest, last4, sorted(granted), models, expires_at)
        return IssuedKey(record, key)


async def ensure_default_users(auth: Authenticator) -> list[str]:
    """Development mode: create PocketLLM's default users if absent; returns the names created."""
    created = []
    for username, password, role in DEFAULT_USERS:
        if await auth.store.get_user_by_name(username) is None:
            await auth.create_user(username, password, role)
            created.append(username)
    return created
