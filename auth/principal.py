"""Who is calling: the authenticated user, through which key, with what rights."""

from __future__ import annotations

from dataclasses import dataclass

SCOPE_INFERENCE = "inference"
SCOPE_ADMIN = "admin"
ALL_SCOPES = frozenset({SCOPE_INFERENCE, SCOPE_ADMIN})


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request."""

    user_id: str
    username: str
    role: str
    scopes: frozenset[str]
    key_id: str | None = None
    allowed_models: frozenset[str] | None = None

    @property
    def is_admin(self) -> bool:
        """Admin by role or by an admin-scoped key."""
        return self.role == "admin" or SCOPE_ADMIN in self.scopes

    def has_scope(self, scope: str) -> bool:
        """Whether the credential grants ``scope``."""
        return scope in self.scopes

    def can_use_model(self, model_id: str) -> bool:
        """Whether the key's model list (if any) allows ``model_id``."""
        return self.allowed_models is None or model_id in self.allowed_models
