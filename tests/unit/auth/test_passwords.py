"""scrypt password hashes: OWASP parameters, self-describing strings, re-hash detection, hostile input."""

from __future__ import annotations

import base64
import hmac
import re
import time

import pytest

from auth.passwords import ScryptParams, hash_password, needs_rehash, parse_hash, verify_password
from tests.unit.auth.conftest import FAST

ENCODED = re.compile(r"^scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$")


def test_default_hash_names_scrypt_at_owasp_parameters_and_verifies() -> None:
    password = "correct horse battery staple"
    encoded = hash_password(password, ScryptParams())  # the only default-cost hashes in the suite
    match = ENCODED.match(encoded)
    assert match, encoded
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    assert n >= 2**17 and r == 8 and p == 1
    salt = base64.b64decode(match.group(4) + "==")
    key = base64.b64decode(match.group(5) + "==")
    assert len(salt) == 16 and len(key) == 32
    assert password not in encoded and password.encode().hex() not in encoded
    assert base64.b64encode(password.encode()).decode().rstrip("=") not in encoded
    assert verify_password(password, encoded)
    assert not verify_password(password + " ", encoded)


def test_salts_are_random() -> None:
    first, second = hash_password("same", FAST), hash_password("same", FAST)
    assert first != second
    assert parse_hash(first)[1] != parse_hash(second)[1]
    assert verify_password("same", first) and verify_password("same", second)


def test_verification_uses_the_parameters_in_the_hash() -> None:
    encoded = hash_password("pw", ScryptParams(n=2**11, r=4, p=2, salt_bytes=24, key_bytes=48))
    assert encoded.startswith("scrypt$n=2048,r=4,p=2$")
    params, salt, key = parse_hash(encoded)
    assert (params.n, params.r, params.p, len(salt), len(key)) == (2048, 4, 2, 24, 48)
    assert verify_password("pw", encoded)
    assert not verify_password("PW", encoded)


def test_unicode_passwords() -> None:
    encoded = hash_password("pässwörd-🔑", FAST)
    assert verify_password("pässwörd-🔑", encoded)
    assert not verify_password("passwerd-🔑", encoded)


def test_rehash_when_the_configured_parameters_rise() -> None:
    weak = hash_password("pw", FAST)
    assert not needs_rehash(weak, FAST)
    assert needs_rehash(weak, ScryptParams())  # N 2^10 < 2^17
    assert needs_rehash(weak, ScryptParams(n=FAST.n, r=16))
    assert needs_rehash(weak, ScryptParams(n=FAST.n, p=2))
    assert needs_rehash(weak, ScryptParams(n=FAST.n, key_bytes=64))
    assert needs_rehash(weak, ScryptParams(n=FAST.n, salt_bytes=32))
    stronger = hash_password("pw", ScryptParams(n=2**11))
    assert not needs_rehash(stronger, FAST)  # lowering the setting never weakens stored hashes
    assert needs_rehash("not-a-hash", FAST)
    assert needs_rehash("bcrypt$whatever", FAST)


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "garbage",
        "scrypt$n=1024,r=8,p=1$c2FsdA",
        "argon2$n=1024,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=1000,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # n not 2^k
        "scrypt$n=1073741824,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # 2^30
        "scrypt$n=1024,r=999,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=1024,r=8,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # 3-byte salt
        "scrypt$n=1024,r=8,p=1$!!!!AAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=1024,r=8,p=1,x=2$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=1024,r=8$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$n=x,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_malformed_or_hostile_hashes_never_match(encoded: str) -> None:
    started = time.monotonic()
    assert not verify_password("", encoded)
    assert time.monotonic() - started < 1.0  # refused before any expensive work
    with pytest.raises(ValueError, match=r"scrypt"):
        parse_hash(encoded)


def test_a_wellformed_hash_of_another_password_does_not_match() -> None:
    encoded = hash_password("one", FAST)
    scheme, cost, salt, _ = encoded.split("$")
    other_key = hash_password("two", FAST).split("$")[3]
    assert not verify_password("one", f"{scheme}${cost}${salt}${other_key}")


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 1000}, {"n": 1}, {"n": 2**23}, {"r": 0}, {"p": 0}, {"salt_bytes": 8}, {"key_bytes": 8}],
)
def test_unusable_parameters_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="scrypt"):
        ScryptParams(**kwargs)


def test_defaults_are_owasp_and_memory_bound_fits() -> None:
    params = ScryptParams()
    assert (params.n, params.r, params.p, params.salt_bytes, params.key_bytes) == (2**17, 8, 1, 16, 32)
    assert 128 * 8 * 2**17 < params.maxmem < 2**31


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = hash_password("pw", FAST)
    calls: list[int] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(len(a))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert verify_password("pw", encoded) and not verify_password("px", encoded)
    assert calls == [32, 32]
