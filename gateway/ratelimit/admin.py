"""Admin routes for the rate-limit overrides of keys and users."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, get, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from msgspec import Meta, Struct

from auth.store import IdentityStore, LimitOverride
from gateway.errors import NotFoundError
from gateway.openai.pipeline import Pipeline
from gateway.ratelimit.admission import LimitOverrides, effective_limits
from gateway.security import requires_admin
from gateway.settings import Settings

OverrideValue = Annotated[int, Meta(ge=-1)] | None
"""``null`` keeps the default, ``-1`` lifts the limit, ``n >= 0`` is the limit."""


class LimitsUpdate(Struct, forbid_unknown_fields=True):
    """``PUT /admin/keys/{id}/limits`` and ``PUT /admin/users/{id}/limits``: replaces the override."""

    rpm: OverrideValue = None
    tpm: OverrideValue = None
    concurrency: OverrideValue = None


async def _limits(
    identity_store: IdentityStore,
    settings: Settings,
    subject: str,
    update: LimitsUpdate | None,
    overrides: LimitOverrides | None = None,
) -> dict[str, Any]:
    if update is not None:
        await identity_store.set_limit_override(
            subject, LimitOverride(update.rpm, update.tpm, update.concurrency)
        )
    if overrides is not None:
        overrides.forget(subject)  # this process applies the new limits at once
    override = (await identity_store.get_limit_overrides([subject])).get(subject, LimitOverride())
    spec = effective_limits(subject, override, settings.ratelimit)
    return {
        "subject": subject,
        "override": {"rpm": override.rpm, "tpm": override.tpm, "concurrency": override.concurrency},
        "effective": {"rpm": spec.rpm, "tpm": spec.tpm, "concurrency": spec.concurrency},
    }


async def _key_subject(identity_store: IdentityStore, key_id: str) -> str:
    if not any(key.id == key_id for key in await identity_store.list_keys()):
        raise NotFoundError("no such key", param="key_id", code="key_not_found")
    return f"key:{key_id}"


async def _user_subject(identity_store: IdentityStore, user_id: str) -> str:
    if await identity_store.get_user(user_id) is None:
        raise NotFoundError("no such user", param="user_id", code="user_not_found")
    return f"user:{user_id}"


class AdminLimitsController(Controller):
    """``/admin/keys/{id}/limits``, ``/admin/users/{id}/limits``."""

    path = "/admin"
    tags = ["Admin"]
    guards = [requires_admin]

    @get("/keys/{key_id:str}/limits", summary="An API key's rate limits")
    async def key_limits(
        self,
        identity_store: NamedDependency[IdentityStore],
        settings: NamedDependency[Settings],
        key_id: FromPath[str],
    ) -> dict[str, Any]:
        """The key's override and the limits in effect (``null``: unlimited)."""
        return await _limits(identity_store, settings, await _key_subject(identity_store, key_id), None)

    @put("/keys/{key_id:str}/limits", summary="Set an API key's rate limits")
    async def set_key_limits(
        self,
        identity_store: NamedDependency[IdentityStore],
        settings: NamedDependency[Settings],
        pipeline: NamedDependency[Pipeline],
        key_id: FromPath[str],
        data: JSONBody[LimitsUpdate],
    ) -> dict[str, Any]:
        """Replace the key's override (``null`` fields follow the defaults, ``-1`` is unlimited)."""
        subject = await _key_subject(identity_store, key_id)
        return await _limits(identity_store, settings, subject, data, pipeline.overrides)

    @get("/users/{user_id:str}/limits", summary="A user's rate limits")
    async def user_limits(
        self,
        identity_store: NamedDependency[IdentityStore],
        settings: NamedDependency[Settings],
        user_id: FromPath[str],
    ) -> dict[str, Any]:
        """The user's override and the limits in effect (``null``: unlimited)."""
        return await _limits(identity_store, settings, await _user_subject(identity_store, user_id), None)

    @put("/users/{user_id:str}/limits", summary="Set a user's rate limits")
    async def set_user_limits(
        self,
        identity_store: NamedDependency[IdentityStore],
        settings: NamedDependency[Settings],
        pipeline: NamedDependency[Pipeline],
        user_id: FromPath[str],
        data: JSONBody[LimitsUpdate],
    ) -> dict[str, Any]:
        """Replace the user's override (``null`` fields follow the defaults, ``-1`` is unlimited)."""
        subject = await _user_subject(identity_store, user_id)
        return await _limits(identity_store, settings, subject, data, pipeline.overrides)
