"""The PocketLLM backend's ``/auth`` routes: login and the auth service's state."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from msgspec import Meta, Struct

from auth.authenticate import Authenticator
from auth.errors import AuthenticationError
from gateway.errors import UnauthenticatedError
from gateway.settings import Settings


class LoginRequest(Struct, forbid_unknown_fields=True):
    """``POST /auth/login``."""

    username: Annotated[str, Meta(min_length=1, max_length=128)]
    password: Annotated[str, Meta(min_length=1, max_length=1024)]


class LoginResponse(Struct):
    """PocketLLM's login answer."""

    access_token: str
    token_type: str
    user_id: str
    username: str
    is_admin: bool


class AuthController(Controller):
    """``/auth``."""

    path = "/auth"
    tags = ["PocketLLM"]

    @post("/login", status_code=200, summary="Log in")
    async def login(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[LoginRequest],
        authenticator: NamedDependency[Authenticator],
    ) -> LoginResponse:
        """Exchange a username and password for a bearer token (throttled after repeated failures)."""
        client = request.client.host if request.client else "unknown"
        try:
            user, token = await authenticator.login(data.username, data.password, client)
        except AuthenticationError as exc:  # a throttled login is a 429 (the error table)
            raise UnauthenticatedError(str(exc), code="invalid_credentials") from None
        return LoginResponse(token, "bearer", user.id, user.username, user.role == "admin")

    @get("/test", summary="Auth service state")
    async def test(
        self, settings: NamedDependency[Settings], authenticator: NamedDependency[Authenticator]
    ) -> dict[str, Any]:
        """Whether the auth service works, and how it is configured (no secrets)."""
        users = await authenticator.store.list_users()
        return {
            "status": "ok",
            "environment": settings.env,
            "store": authenticator.store.dialect,
            "users": len(users),
            "token_algorithms": list(authenticator.tokens.algorithms),
            "issuer": authenticator.tokens.issuer,
            "audience": authenticator.tokens.audience,
            "external_identity_provider": authenticator.external is not None,
            "password_hash": f"scrypt n={authenticator.passwords.n} r={authenticator.passwords.r} "
            f"p={authenticator.passwords.p}",
        }
