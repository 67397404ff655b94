"""Admin routes for users, API keys and sessions (admin role or an admin-scoped key)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from msgspec import Meta, Struct

from auth.authenticate import Authenticator
from auth.keys import display_key
from auth.store import ApiKey, IdentityStore, User, UserExistsError
from gateway.errors import InvalidRequestError, NotFoundError
from gateway.security import requires_admin


class NewUser(Struct, forbid_unknown_fields=True):
    """``POST /admin/users``."""

    username: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")]
    password: Annotated[str, Meta(min_length=8, max_length=1024)]
    role: Literal["user", "admin"] = "user"


class NewKey(Struct, forbid_unknown_fields=True):
    """``POST /admin/keys``."""

    username: Annotated[str, Meta(min_length=1, max_length=64)]
    scopes: list[Literal["inference", "admin"]] | None = None
    expires_at: float | None = None
    models: list[Annotated[str, Meta(min_length=1, max_length=256)]] | None = None


def user_dict(user: User) -> dict[str, Any]:
    """A user as the admin routes show it (never the password hash)."""
    return {
        "id": user.id,
        "username": user.username,
        "role": user.role,
        "created_at": user.created_at,
        "disabled_at": user.disabled_at,
    }


def key_dict(key: ApiKey, username: str | None = None) -> dict[str, Any]:
    """A key as listed: prefix and last four characters only."""
    return {
        "id": key.id,
        "user_id": key.user_id,
        "username": username,
        "key_prefix": display_key(key.last4),
        "scopes": list(key.scopes),
        "models": list(key.models) if key.models is not None else None,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
    }


class AdminIdentityController(Controller):
    """``/admin/users``, ``/admin/keys``, ``/admin/sessions/count``."""

    path = "/admin"
    tags = ["Admin"]
    guards = [requires_admin]

    @post("/users", status_code=201, summary="Create a user")
    async def create_user(
        self, authenticator: NamedDependency[Authenticator], data: JSONBody[NewUser]
    ) -> dict[str, Any]:
        """A new user with a scrypt-hashed password."""
        try:
            user = await authenticator.create_user(data.username, data.password, data.role)
        except UserExistsError:
            raise InvalidRequestError(
                f"the user {data.username!r} exists already", param="username", code="user_exists"
            ) from None
        return user_dict(user)

    @get("/users", summary="List users")
    async def list_users(self, identity_store: NamedDependency[IdentityStore]) -> dict[str, Any]:
        """Every user."""
        return {"users": [user_dict(u) for u in await identity_store.list_users()]}

    @post("/users/{user_id:str}/disable", status_code=200, summary="Disable a user")
    async def disable_user(
        self, identity_store: NamedDependency[IdentityStore], user_id: FromPath[str]
    ) -> dict[str, Any]:
        """Disable a user: their keys and tokens stop working at once. The last enabled admin cannot be
        disabled (409 ``last_admin``): nobody could enable anyone again."""
        user = await identity_store.disable_user(user_id)
        if user is None:
            raise NotFoundError("no such user", param="user_id", code="user_not_found")
        return user_dict(user)

    @post("/users/{user_id:str}/enable", status_code=200, summary="Enable a user")
    async def enable_user(
        self, identity_store: NamedDependency[IdentityStore], user_id: FromPath[str]
    ) -> dict[str, Any]:
        """Enable a disabled user: their keys and tokens (those not revoked otherwise) work again."""
        user = await identity_store.enable_user(user_id)
        if user is None:
            raise NotFoundError("no such user", param="user_id", code="user_not_found")
        return user_dict(user)

    @post("/keys", status_code=201, summary="Create an API key")
    async def create_key(
        self, authenticator: NamedDependency[Authenticator], data: JSONBody[NewKey]
    ) -> dict[str, Any]:
        """A new key; the full ``sk-pl-...`` value is in this response only."""
        user = await authenticator.store.get_user_by_name(data.username)
        if user is None:
            raise NotFoundError("no such user", param="username", code="user_not_found")
        try:
            issued = await authenticator.create_key(
                user,
                frozenset(data.scopes) if data.scopes is not None else None,
                data.models,
                data.expires_at,
            )
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="scopes") from None
        return {**key_dict(issued.record, user.username), "key": issued.key}

    @get("/keys", summary="List API keys")
    async def list_keys(self, identity_store: NamedDependency[IdentityStore]) -> dict[str, Any]:
        """Every key, shown by prefix and last four characters."""
        names = {u.id: u.username for u in await identity_store.list_users()}
        return {"keys": [key_dict(k, names.get(k.user_id)) for k in await identity_store.list_keys()]}

    @delete("/keys/{key_id:str}", status_code=204, summary="Revoke an API key")
    async def revoke_key(self, identity_store: NamedDependency[IdentityStore], key_id: FromPath[str]) -> None:
        """Revoke a key: its next request is refused."""
        if not await identity_store.revoke_key(key_id):
            raise NotFoundError("no such key", param="key_id", code="key_not_found")

    @get("/sessions/count", summary="Count chat sessions")
    async def count_sessions(self, identity_store: NamedDependency[IdentityStore]) -> dict[str, Any]:
        """Sessions in total and per user."""
        total, per_user = await identity_store.count_sessions()
        return {"total": total, "per_user": per_user}
