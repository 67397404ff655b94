"""Authentication and authorization at the HTTP edge: guards, the principal dependency, identity wiring."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, cast

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from auth.authenticate import Authenticator
from auth.bootstrap import DEFAULT_SECRET_KEY, check_secrets
from auth.passwords import ScryptParams
from auth.principal import SCOPE_INFERENCE, Principal
from auth.redis_throttle import RedisLoginThrottle
from auth.stores import open_store
from auth.throttle import FallbackLoginThrottle, LoginThrottle, Throttle, ThrottlePolicy
from auth.tokens import ExternalProvider, TokenConfig
from gateway.errors import PermissionDeniedError
from gateway.redis_client import RedisClient
from gateway.settings import Settings
from telemetry.requests import SPAN_AUTH, current_request

PRINCIPAL = "pocketllm.principal"


def build_authenticator(settings: Settings, redis: RedisClient | None = None) -> Authenticator:
    """The store and authenticator for ``settings``; the login throttle is shared through ``redis`` when
    given (each process falls back to its own while Redis fails)."""
    auth = settings.auth
    external = None
    if auth.external is not None:
        ext = auth.external
        public_key = Path(ext.public_key_file).read_text(encoding="utf-8") if ext.public_key_file else None
        external = ExternalProvider(
            ext.issuer,
            ext.audience,
            public_key,
            ext.jwks_file,
            tuple(ext.algorithms),
            ext.username_claim,
            ext.create_users,
            auth.leeway_s,
        )
    policy = ThrottlePolicy(
        free_failures=auth.login_max_failures,
        window_s=auth.login_window_s,
        base_delay_s=auth.login_base_delay_s,
        max_delay_s=auth.login_max_delay_s,
        max_client_failures=auth.login_max_client_failures,
    )
    throttle: Throttle = LoginThrottle(policy=policy)
    if redis is not None:
        shared = RedisLoginThrottle(redis, policy, prefix=f"{settings.redis.key_prefix}login:")
        throttle = FallbackLoginThrottle(shared, throttle, retry_after_s=settings.redis.retry_after_s)
    return Authenticator(
        open_store(settings.store.url or settings.data_dir),
        TokenConfig(
            _signing_secret(settings), auth.issuer, auth.audience, ("HS256",), auth.token_ttl_s, auth.leeway_s
        ),
        ScryptParams(n=auth.scrypt_n),
        external,
        throttle,
        key_cache_ttl_s=auth.key_cache_ttl_s,
        max_concurrent_hashes=auth.max_concurrent_hashes,
    )


def _signing_secret(settings: Settings) -> str:
    """The HS256 key. A secret that is set must pass ``auth.bootstrap.weak_secret_reason`` (production and
    development alike; the settings check refuses it first). In development the public default SECRET_KEY
    is replaced by a random secret kept in the data directory, so that development tokens cannot be forged
    from the documented default."""
    auth = settings.auth
    check_secrets(auth.secret_key, auth.jwt_secret, production=settings.env == "production")
    if auth.jwt_secret is None and auth.secret_key == DEFAULT_SECRET_KEY:
        path = Path(settings.data_dir) / "jwt-secret"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48))
        return path.read_text(encoding="utf-8").strip()
    return auth.signing_secret


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The caller's principal (cached on the connection); 401 in OpenAI's envelope otherwise."""
    # Cached on the ASGI scope itself, which is this request's alone. (``scope["state"]`` is not: the
    # server hands every request a copy of one shared state, so nothing per-request may live there.)
    scope = cast("dict[str, Any]", connection.scope)
    known = scope.get(PRINCIPAL)
    if isinstance(known, Principal):
        return known
    authenticator: Authenticator = connection.app.state.authenticator
    record = current_request()
    with record.stage(SPAN_AUTH):  # an AuthenticationError is a 401 (the error table)
        principal = await authenticator.authenticate(
            connection.headers.get("authorization"), connection.headers.get("x-api-key")
        )
    scope[PRINCIPAL] = principal
    record.authenticated(principal.user_id, principal.username)
    return principal


async def requires_principal(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: any valid credential."""
    await authenticate(connection)


def check_inference(principal: Principal) -> None:
    """403 unless the credential grants the ``inference`` scope: the rule of every inference route, the
    ``requires_inference`` guard's and ``/chat/ws``'s (which cannot use a guard: it checks again before
    every turn)."""
    if not principal.has_scope(SCOPE_INFERENCE):
        raise PermissionDeniedError("this credential lacks the `inference` scope")


async def requires_inference(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: a valid principal with the ``inference`` scope."""
    check_inference(await authenticate(connection))


async def requires_admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: an admin's credential that grants the admin scope (an admin's JWT or admin-scoped key)."""
    principal = await authenticate(connection)
    if not principal.is_admin:
        raise PermissionDeniedError("this route needs an admin's token or an admin-scoped key of an admin")


async def provide_principal(request: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """Dependency: the principal a guard authenticated."""
    return await authenticate(request)


def check_model_access(principal: Principal, *names: str) -> None:
    """403 when the credential's model list excludes every name the model goes by."""
    if not any(principal.can_use_model(name) for name in names):
        raise PermissionDeniedError(f"this credential may not use the model `{names[0]}`", param="model")
