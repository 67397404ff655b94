"""Passwords, API keys, JWT decoding (with the attack suite) and the login throttle."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from auth.keys import KEY_PREFIX, generate_api_key, hash_api_key
from auth.passwords import ScryptParams, hash_password, needs_rehash, verify_password
from auth.throttle import LoginThrottle
from auth.tokens import (
    ExternalProvider,
    InvalidTokenError,
    TokenConfig,
    decode_external,
    decode_token,
    issue_token,
)

FAST = ScryptParams(n=2**14)
SECRET = "s" * 64
CONFIG = TokenConfig(SECRET, issuer="https://idp.example", audience="pocketllm")


def test_password_hash_names_its_parameters_and_verifies() -> None:
    encoded = hash_password("correct horse", ScryptParams())
    assert encoded.startswith("scrypt$n=131072,r=8,p=1$")
    assert "correct horse" not in encoded
    assert verify_password("correct horse", encoded)
    assert not verify_password("wrong", encoded)
    assert not verify_password("x", "garbage")


def test_rehash_when_parameters_rise() -> None:
    weak = hash_password("pw", FAST)
    assert needs_rehash(weak, ScryptParams())
    assert not needs_rehash(weak, FAST)


def test_api_keys() -> None:
    key, digest, last4 = generate_api_key()
    assert key.startswith(KEY_PREFIX)
    assert len(base64.urlsafe_b64decode(key[len(KEY_PREFIX) :] + "==")) >= 16  # >= 128 bits
    assert digest == hash_api_key(key) and len(digest) == 64 and key not in digest
    assert last4 == key[-4:]
    assert generate_api_key()[0] != key


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "sub": "user-1",
        "iat": now,
        "exp": now + 600,
        "iss": CONFIG.issuer,
        "aud": CONFIG.audience,
        "jti": "j",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def test_valid_token_round_trips() -> None:
    token = issue_token(CONFIG, user_id="user-1", username="u", role="user")
    assert decode_token(CONFIG, token)["sub"] == "user-1"


def attack_tokens() -> dict[str, str]:
    """Tokens an attacker might send, each of which must be refused."""
    good = jwt.encode(_claims(), SECRET, algorithm="HS256")
    header, payload, signature = good.split(".")
    tampered = _b64({**_claims(), "sub": "admin"})
    return {
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "alg None": f"{_b64({'alg': 'None', 'typ': 'JWT'})}.{payload}.",
        "stripped signature": f"{header}.{payload}.",
        "tampered payload": f"{header}.{tampered}.{signature}",
        "wrong secret": jwt.encode(_claims(), "x" * 64, algorithm="HS256"),
        "expired beyond leeway": jwt.encode(_claims(exp=int(time.time()) - 120), SECRET, algorithm="HS256"),
        "future nbf": jwt.encode(_claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256"),
        "wrong aud": jwt.encode(_claims(aud="someone-else"), SECRET, algorithm="HS256"),
        "iss with a suffix": jwt.encode(_claims(iss="https://idp.example.evil"), SECRET, algorithm="HS256"),
        "missing exp": jwt.encode(_claims(exp=None), SECRET, algorithm="HS256"),
        "missing sub": jwt.encode(_claims(sub=None), SECRET, algorithm="HS256"),
        "HS512 (not allowed)": jwt.encode(_claims(), SECRET, algorithm="HS512"),
        "garbage": "not.a.token",
    }


@pytest.mark.parametrize("name", sorted(attack_tokens()))
def test_attack_tokens_are_refused(name: str) -> None:
    with pytest.raises(InvalidTokenError) as err:
        decode_token(CONFIG, attack_tokens()[name])
    assert attack_tokens()[name] not in str(err.value)


def test_expiry_within_leeway_is_accepted() -> None:
    token = jwt.encode(_claims(exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    assert decode_token(CONFIG, token)["sub"] == "user-1"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_external_provider_rs256_and_key_confusion(rsa_key: rsa.RSAPrivateKey) -> None:
    provider = ExternalProvider("https://idp.example", "pocketllm", public_key=_pem(rsa_key))
    good = jwt.encode(_claims(sub="alice"), rsa_key, algorithm="RS256")
    assert decode_external(provider, good)["sub"] == "alice"
    # HS256 signed with the RS public key (the classic algorithm-confusion attack)
    header = _b64({"alg": "HS256", "typ": "JWT"})
    payload = _b64(_claims(sub="alice"))
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    signature = (
        base64.urlsafe_b64encode(
            hmac.new(_pem(rsa_key).encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
        )
        .decode()
        .rstrip("=")
    )
    with pytest.raises(InvalidTokenError):
        decode_external(provider, f"{header}.{payload}.{signature}")
    with pytest.raises(InvalidTokenError):
        decode_external(provider, jwt.encode(_claims(sub="alice", aud="other"), rsa_key, algorithm="RS256"))


def test_external_provider_es256_from_a_jwks_file(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256", "use": "sig"}]}))
    provider = ExternalProvider("https://idp.example", "pocketllm", jwks_file=str(jwks))
    token = jwt.encode(_claims(sub="carol"), key, algorithm="ES256", headers={"kid": "k1"})
    assert decode_external(provider, token)["sub"] == "carol"
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidTokenError):
        decode_external(
            provider, jwt.encode(_claims(sub="carol"), other, algorithm="ES256", headers={"kid": "k1"})
        )


def test_login_throttle_per_user_and_per_client() -> None:
    now = [1000.0]
    throttle = LoginThrottle(max_failures=3, window_s=60, clock=lambda: now[0], client_factor=2)
    for _ in range(3):
        assert throttle.retry_after("bob", "10.0.0.1") == 0
        throttle.failed("bob", "10.0.0.1")
    assert throttle.retry_after("bob", "10.0.0.2") > 0  # by username
    assert throttle.retry_after("eve", "10.0.0.1") == 0  # the address has room for 6
    for name in ("eve", "mallory", "trent"):
        throttle.failed(name, "10.0.0.1")
    assert throttle.retry_after("oscar", "10.0.0.1") > 0  # by client
    assert throttle.retry_after("oscar", "10.0.0.3") == 0
    now[0] += 61
    assert throttle.retry_after("bob", "10.0.0.1") == 0
    throttle.failed("bob", "10.0.0.9")
    throttle.succeeded("bob")
    assert throttle.retry_after("bob", "10.0.0.8") == 0
