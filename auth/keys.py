"""API keys: ``sk-pl-`` + 256 random bits in base64url.

Only the SHA-256 hex digest and the last four characters are ever stored; the full key is shown once,
at creation. SHA-256 (not a slow KDF) is right here: the key has 256 bits of entropy, so there is
nothing to brute-force, and every request can look its key up by digest.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "sk-pl-"
KEY_RANDOM_BYTES = 32
"""Randomness per key (256 bits; the issue asks for at least 128)."""

_KEY_PATTERN = re.compile(rf"^{re.escape(KEY_PREFIX)}[A-Za-z0-9_-]{{43}}$")


def generate_api_key() -> tuple[str, str, str]:
    """Make a new API key.

    Returns:
        ``(full_key, key_hash, last4)``: the key to show once, its SHA-256 hex digest to store, and its
        last four characters to store for display.
    """
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
    return key, hash_api_key(key), key[-4:]


def hash_api_key(key: str) -> str:
    """The digest under which a key is stored and looked up.

    Args:
        key: the full key as presented.

    Returns:
        64 lowercase hex characters.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def constant_time_equals(a: str, b: str) -> bool:
    """Compare two secrets or digests in time independent of where they differ.

    Args:
        a: one value.
        b: the other value.

    Returns:
        Whether they are equal.
    """
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def looks_like_api_key(credential: str) -> bool:
    """Whether a bearer credential is meant as one of our API keys (anything else is tried as a JWT).

    Args:
        credential: the value after ``Bearer`` or of ``x-api-key``.

    Returns:
        True when it starts with ``sk-pl-``.
    """
    return credential.startswith(KEY_PREFIX)


def is_well_formed_api_key(credential: str) -> bool:
    """Whether a credential has exactly the shape ``generate_api_key`` produces.

    Args:
        credential: the presented value.

    Returns:
        True for ``sk-pl-`` followed by 43 base64url characters.
    """
    return _KEY_PATTERN.fullmatch(credential) is not None


def display_key(last4: str) -> str:
    """How a stored key is shown in lists: the prefix and the last four characters.

    Args:
        last4: the stored last four characters.

    Returns:
        For example ``sk-pl-...abcd``.
    """
    return f"{KEY_PREFIX}...{last4}"
