"""The PocketLLM backend's ``/auth`` routes: login, logout, password change and the auth service's state."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from msgspec import Meta, Struct

from auth.authenticate import Authenticator
from auth.principal import Principal
from gateway.security import requires_principal
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


class LogoutRequest(Struct, forbid_unknown_fields=True):
    """``POST /auth/logout`` (the body is optional)."""

    everywhere: bool = False
    """Revoke every token of the user (all devices), not just the one this request carries."""


class PasswordChange(Struct, forbid_unknown_fields=True):
    """``POST /auth/password``."""

    current_password: Annotated[str, Meta(min_length=1, max_length=1024)]
    new_password: Annotated[str, Meta(min_length=8, max_length=1024)]


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
        # wrong credentials: 401 invalid_credentials; throttled: 429 (the error table)
        user, token = await authenticator.login(data.username, data.password, client)
        return LoginResponse(token, "bearer", user.id, user.username, user.role == "admin")

    @post("/logout", status_code=204, summary="Log out", guards=[requires_principal])
    async def logout(
        self,
        principal: NamedDependency[Principal],
        authenticator: NamedDependency[Authenticator],
        data: JSONBody[LogoutRequest | None] = None,
    ) -> None:
        """Revoke the token this request carries (``{"everywhere": true}``: every token of the user); it
        is refused from the next request on, on every replica sharing the store."""
        await authenticator.logout(principal, everywhere=data is not None and data.everywhere)

    @post("/password", status_code=200, summary="Change your password", guards=[requires_principal])
    async def change_password(
        self,
        request: Request[Any, Any, Any],
        principal: NamedDependency[Principal],
        authenticator: NamedDependency[Authenticator],
        data: JSONBody[PasswordChange],
    ) -> LoginResponse:
        """Change the caller's own password (the current one is checked, throttled like a login). Every
        token issued before is refused from now on; the answer carries a fresh one."""
        client = request.client.host if request.client else "unknown"
        # a wrong current password: 401 invalid_credentials; throttled: 429 (the error table)
        user, token = await authenticator.change_password(
            principal, data.current_password, data.new_password, client
        )
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
