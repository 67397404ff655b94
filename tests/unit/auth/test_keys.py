"""API keys: format, entropy, what is stored, constant-time comparison, display form."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from auth.keys import (
    KEY_PREFIX,
    constant_time_equals,
    display_key,
    generate_api_key,
    hash_api_key,
    is_well_formed_api_key,
    looks_like_api_key,
)


def test_key_format_and_entropy() -> None:
    key, _, _ = generate_api_key()
    assert KEY_PREFIX == "sk-pl-" and key.startswith("sk-pl-")
    body = key.removeprefix(KEY_PREFIX)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", body)
    raw = base64.urlsafe_b64decode(body + "=")
    assert len(raw) * 8 >= 128 and len(raw) == 32
    assert is_well_formed_api_key(key) and looks_like_api_key(key)


def test_keys_do_not_repeat() -> None:
    generated = {generate_api_key()[0] for _ in range(2000)}
    assert len(generated) == 2000
    # every byte value shows up across the random parts: the bits are not stuck
    seen: set[int] = set()
    for key in list(generated)[:200]:
        seen.update(base64.urlsafe_b64decode(key.removeprefix(KEY_PREFIX) + "="))
    assert len(seen) > 250


def test_only_a_digest_and_the_last_four_characters_are_for_storage() -> None:
    key, digest, last4 = generate_api_key()
    assert digest == hashlib.sha256(key.encode()).hexdigest() == hash_api_key(key)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert key not in digest and key.removeprefix(KEY_PREFIX) not in digest
    assert last4 == key[-4:] and len(last4) == 4
    assert hash_api_key(key + "x") != digest


def test_display_form() -> None:
    key, _, last4 = generate_api_key()
    shown = display_key(last4)
    assert shown == f"sk-pl-...{key[-4:]}"
    assert key.removeprefix(KEY_PREFIX)[:-4] not in shown


@pytest.mark.parametrize(
    "candidate",
    [
        "sk-pl-",
        "sk-pl-short",
        "sk-pl-" + "A" * 42,
        "sk-pl-" + "A" * 44,
        "sk-pl-" + "A" * 42 + "=",
        "sk-pl-" + "A" * 43 + "\n",
        "sk-xx-" + "A" * 43,
        "SK-PL-" + "A" * 43,
    ],
)
def test_malformed_keys_are_recognised(candidate: str) -> None:
    assert not is_well_formed_api_key(candidate)


def test_constant_time_comparison(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert constant_time_equals("a" * 64, "a" * 64)
    assert not constant_time_equals("a" * 64, "a" * 63 + "b")
    assert not constant_time_equals("a" * 64, "a" * 63)
    assert not constant_time_equals("é", "e")
    assert len(calls) == 4
