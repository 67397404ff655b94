"""Password hashing with scrypt (memory-hard) at OWASP's parameters, from the standard library."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

SCHEME = "scrypt"


@dataclass(frozen=True, slots=True)
class ScryptParams:
    """scrypt cost; the defaults are OWASP's minimum (N=2^17, r=8, p=1)."""

    n: int = 2**17
    r: int = 8
    p: int = 1
    salt_bytes: int = 16
    key_bytes: int = 32

    @property
    def maxmem(self) -> int:
        """Memory scrypt needs (128 * r * N * p bytes), with headroom."""
        return 128 * self.r * self.n * self.p + 16 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, params: ScryptParams) -> str:
    """``scrypt$n=...,r=...,p=...$<salt>$<key>`` for ``password``."""
    salt = secrets.token_bytes(params.salt_bytes)
    key = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=params.maxmem,
        dklen=params.key_bytes,
    )
    return f"{SCHEME}$n={params.n},r={params.r},p={params.p}${_b64(salt)}${_b64(key)}"


def _parse(encoded: str) -> tuple[ScryptParams, bytes, bytes]:
    scheme, cost, salt, key = encoded.split("$")
    if scheme != SCHEME:
        raise ValueError("not a scrypt hash")
    values = dict(item.split("=") for item in cost.split(","))
    raw_salt, raw_key = _unb64(salt), _unb64(key)
    params = ScryptParams(int(values["n"]), int(values["r"]), int(values["p"]), len(raw_salt), len(raw_key))
    return params, raw_salt, raw_key


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time comparison; malformed hashes never match)."""
    try:
        params, salt, expected = _parse(encoded)
    except (ValueError, KeyError):
        return False
    actual = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=params.maxmem,
        dklen=params.key_bytes,
    )
    return hmac.compare_digest(actual, expected)


def needs_rehash(encoded: str, params: ScryptParams) -> bool:
    """Whether ``encoded`` was made with weaker parameters than ``params`` (re-hash on the next login)."""
    try:
        current, _, _ = _parse(encoded)
    except (ValueError, KeyError):
        return True
    return (current.n, current.r, current.p, current.key_bytes) < (
        params.n,
        params.r,
        params.p,
        params.key_bytes,
    )


def dummy_verify(params: ScryptParams) -> None:
    """Spend the time of one verification, so an unknown user costs what a wrong password costs."""
    hashlib.scrypt(
        b"x",
        salt=b"\0" * params.salt_bytes,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=params.maxmem,
        dklen=params.key_bytes,
    )
