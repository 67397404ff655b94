"""API keys: ``sk-pl-`` + 256 random bits; only a SHA-256 digest and the last four characters are kept."""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "sk-pl-"


def generate_api_key() -> tuple[str, str, str]:
    """A new key: ``(full key, sha256 hex digest, last 4 characters)``; show the full key once."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_api_key(key), key[-4:]


def hash_api_key(key: str) -> str:
    """The digest under which a key is stored and looked up."""
    return hashlib.sha256(key.encode()).hexdigest()


def same_digest(a: str, b: str) -> bool:
    """Constant-time comparison of two digests."""
    return hmac.compare_digest(a.encode(), b.encode())


def looks_like_api_key(credential: str) -> bool:
    """Whether a bearer credential is one of our API keys (anything else is tried as a JWT)."""
    return credential.startswith(KEY_PREFIX)


def display_key(last4: str) -> str:
    """How a stored key is shown: prefix and last four characters only."""
    return f"{KEY_PREFIX}...{last4}"
