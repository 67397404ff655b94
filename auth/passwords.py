"""Password hashing with scrypt (memory-hard, standard library) at OWASP's parameters.

A hash is a self-describing string, ``scrypt$n=131072,r=8,p=1$<salt>$<key>`` (salt and key in
unpadded standard base64), so that parameters can rise later: ``needs_rehash`` tells login to store
a new hash made with the configured parameters once the password is known to be right.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

SCHEME = "scrypt"

# Bounds for parameters read back from a stored hash: a corrupted or planted row must not make one
# verification allocate gigabytes or spin for minutes.
_MAX_LOG2_N = 22
_MAX_R = 32
_MAX_P = 16
_MAX_MEM = 2**31 - 1  # hashlib.scrypt's own ceiling


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt cost parameters; the defaults are OWASP's recommendation (N=2^17, r=8, p=1).

    Attributes:
        n: CPU/memory cost, a power of two greater than 1.
        r: block size.
        p: parallelism.
        salt_bytes: length of the random salt.
        key_bytes: length of the derived key.
    """

    n: int = 2**17
    r: int = 8
    p: int = 1
    salt_bytes: int = 16
    key_bytes: int = 32

    def __post_init__(self) -> None:
        if self.n < 2 or self.n & (self.n - 1) or self.n > 2**_MAX_LOG2_N:
            raise ValueError(f"scrypt n must be a power of two between 2 and 2**{_MAX_LOG2_N}")
        if not (1 <= self.r <= _MAX_R and 1 <= self.p <= _MAX_P):
            raise ValueError(f"scrypt r must be 1..{_MAX_R} and p 1..{_MAX_P}")
        if self.salt_bytes < 16 or self.key_bytes < 16:
            raise ValueError("scrypt needs a salt and a key of at least 16 bytes")
        if self.maxmem > _MAX_MEM:
            raise ValueError("these scrypt parameters need more than 2 GiB")

    @property
    def maxmem(self) -> int:
        """The memory bound passed to ``hashlib.scrypt``: what OpenSSL needs, plus 1 MiB."""
        return 128 * self.r * (self.n + self.p + 2) + 2**20


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _derive(password: str, salt: bytes, params: ScryptParams) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=params.maxmem,
        dklen=params.key_bytes,
    )


def hash_password(password: str, params: ScryptParams) -> str:
    """Hash a password with a fresh random salt.

    Takes about 0.3 s and 128 MiB at the default parameters: call it off the event loop.

    Args:
        password: the plaintext password.
        params: the scrypt cost to use.

    Returns:
        ``scrypt$n=<n>,r=<r>,p=<p>$<b64 salt>$<b64 key>``.
    """
    salt = secrets.token_bytes(params.salt_bytes)
    key = _derive(password, salt, params)
    return f"{SCHEME}$n={params.n},r={params.r},p={params.p}${_b64(salt)}${_b64(key)}"


def parse_hash(encoded: str) -> tuple[ScryptParams, bytes, bytes]:
    """Split a stored hash into its parameters, salt and key.

    Args:
        encoded: a string made by ``hash_password``.

    Returns:
        ``(params, salt, key)``.

    Raises:
        ValueError: when the string is not a well-formed scrypt hash within sane bounds.
    """
    parts = encoded.split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        raise ValueError("not a scrypt hash")
    try:
        cost = dict(item.split("=", 1) for item in parts[1].split(","))
        n, r, p = int(cost["n"]), int(cost["r"]), int(cost["p"])
        salt, key = _unb64(parts[2]), _unb64(parts[3])
    except (KeyError, ValueError, binascii.Error):
        raise ValueError("malformed scrypt hash") from None
    if set(cost) != {"n", "r", "p"}:
        raise ValueError("malformed scrypt hash")
    return ScryptParams(n, r, p, len(salt), len(key)), salt, key


def verify_password(password: str, encoded: str) -> bool:
    """Check a password against a stored hash, with the hash's own parameters.

    Args:
        password: the plaintext password offered.
        encoded: the stored hash.

    Returns:
        Whether they match (constant-time comparison). A malformed hash never matches.
    """
    try:
        params, salt, expected = parse_hash(encoded)
    except ValueError:
        return False
    return hmac.compare_digest(_derive(password, salt, params), expected)


def needs_rehash(encoded: str, params: ScryptParams) -> bool:
    """Whether a stored hash is weaker than the configured parameters.

    Args:
        encoded: the stored hash.
        params: the parameters now configured.

    Returns:
        True when the hash is malformed or any of n, r, p, salt or key length is below ``params``
        (parameters above the configured ones are kept: lowering the setting never weakens hashes).
    """
    try:
        current, _, _ = parse_hash(encoded)
    except ValueError:
        return True
    return (
        current.n < params.n
        or current.r < params.r
        or current.p < params.p
        or current.salt_bytes < params.salt_bytes
        or current.key_bytes < params.key_bytes
    )


def dummy_verify(params: ScryptParams) -> None:
    """Spend the time of one verification (for unknown users, so they cost what a wrong password costs).

    Args:
        params: the configured parameters.
    """
    _derive("", b"\0" * params.salt_bytes, params)
