"""Stored rate-limit overrides: what an admin set for one API key or one user, and those a credential's
lookup brings along (the key's and its owner's, read in the same query as the credential)."""

from __future__ import annotations

from dataclasses import dataclass

UNLIMITED = -1
"""A ``LimitOverride`` field with this value lifts the limit altogether."""


@dataclass(frozen=True, slots=True)
class LimitOverride:
    """Rate limits of one API key or user that replace the configured defaults.

    Each field: ``None`` keeps the default, ``UNLIMITED`` (-1) lifts the limit, ``n >= 0`` is the limit.
    """

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None

    @property
    def empty(self) -> bool:
        """Whether every field keeps its default (such an override is not stored)."""
        return self.rpm is None and self.tpm is None and self.concurrency is None


@dataclass(frozen=True, slots=True)
class CredentialLimits:
    """The stored overrides of a credential's subjects (``"key:<id>"`` and ``"user:<id>"``), read in the
    same round trip as the credential itself.

    Attributes:
        key: the override of the API key, None when none is stored (or the credential is not a key).
        user: the override of the key's owner or the token's user, None when none is stored.
    """

    key: LimitOverride | None = None
    user: LimitOverride | None = None
