"""Who is calling: the authenticated user, through which credential, with what rights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from auth.limits import CredentialLimits, LimitOverride

Role = Literal["user", "admin"]
ROLES: frozenset[str] = frozenset({"user", "admin"})


def as_role(value: str) -> Role:
    """Check a role name.

    Args:
        value: ``user`` or ``admin``.

    Returns:
        The same value, typed as a ``Role``.

    Raises:
        ValueError: for any other value.
    """
    if value == "user":
        return "user"
    if value == "admin":
        return "admin"
    raise ValueError(f"unknown role {value!r}: use 'user' or 'admin'")


SCOPE_INFERENCE = "inference"
SCOPE_ADMIN = "admin"
ALL_SCOPES = frozenset({SCOPE_INFERENCE, SCOPE_ADMIN})


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request.

    Attributes:
        user_id: the user's id.
        username: the user's name.
        role: ``user`` or ``admin`` (from the store, not from the credential).
        scopes: what the credential grants (``inference``, ``admin``).
        key_id: the API key used, or None for a JWT.
        allowed_models: the key's model allow-list, or None for any model.
        token_id: the ``jti`` of our own JWT (what logout revokes), else None.
        expires_at: when that token expires (unix seconds), else None.
        limits: the stored limit overrides of the key and the user, read in the same store round trip
            as the credential (as fresh as that lookup); None when they were not read with it (admission
            then reads them itself).
    """

    user_id: str
    username: str
    role: Role
    scopes: frozenset[str]
    key_id: str | None = None
    allowed_models: frozenset[str] | None = None
    token_id: str | None = None
    expires_at: float | None = None
    limits: CredentialLimits | None = None

    def known_overrides(self) -> dict[str, LimitOverride] | None:
        """The stored overrides of ``"key:<key_id>"`` and ``"user:<user_id>"`` that ``limits`` holds (a
        subject without one is left out); None when the limits were not read with the credential."""
        if self.limits is None:
            return None
        found = {f"user:{self.user_id}": self.limits.user}
        if self.key_id is not None:
            found[f"key:{self.key_id}"] = self.limits.key
        return {subject: override for subject, override in found.items() if override is not None}

    @property
    def is_admin(self) -> bool:
        """Whether admin routes are open to this caller: an admin user whose credential grants the admin
        scope (an admin's JWT does; an admin's key only when it was made with the ``admin`` scope). A key's
        scopes bound it whatever its owner's role, and the role bounds the scopes (a user who lost the
        admin role loses the powers of their admin-scoped keys)."""
        return self.role == "admin" and SCOPE_ADMIN in self.scopes

    def has_scope(self, scope: str) -> bool:
        """Whether the credential grants a scope.

        Args:
            scope: ``inference`` or ``admin``.

        Returns:
            True when granted.
        """
        return scope in self.scopes

    def can_use_model(self, model_id: str) -> bool:
        """Whether the credential's model allow-list (if any) admits a model.

        Args:
            model_id: the model's id or alias as requested.

        Returns:
            True when there is no list or the model is on it.
        """
        return self.allowed_models is None or model_id in self.allowed_models
