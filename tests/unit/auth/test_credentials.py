"""JWTs at the decoder: our HMAC tokens, the external provider (RS256 PEM, ES256 JWKS), and the attack suite.

Every attack must raise our ``InvalidTokenError`` with a message that does not contain the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from auth.errors import AuthenticationError, InvalidTokenError
from auth.tokens import (
    ExternalProvider,
    TokenSettings,
    decode_external,
    decode_token,
    issue_token,
    unverified_issuer,
)

SECRET = "s" * 64
SETTINGS = TokenSettings(SECRET, issuer="https://gateway.example", audience="pocketllm")
IDP = "https://idp.example"


def _claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for ``SETTINGS``; an override of None removes the claim."""
    now = int(time.time())
    claims = {
        "sub": "user-1",
        "iat": now,
        "exp": now + 600,
        "iss": SETTINGS.issuer,
        "aud": SETTINGS.audience,
        "jti": "j",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _hs256(claims: dict[str, Any], secret: str = SECRET, **kwargs: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", **kwargs)


def _forge_hs256(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 token with any bytes as the key (pyjwt refuses PEM keys as HMAC secrets, attackers don't)."""
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(claims)}"
    signature = base64.urlsafe_b64encode(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())
    return f"{signing_input}.{signature.decode().rstrip('=')}"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _refused(token: str, decode: Any) -> InvalidTokenError:
    with pytest.raises(InvalidTokenError) as caught:
        decode(token)
    message = str(caught.value)
    assert not token or token not in message
    for segment in token.split("."):
        assert len(segment) < 8 or segment not in message
    assert isinstance(caught.value, AuthenticationError)
    return caught.value


def test_issued_tokens_round_trip() -> None:
    token = issue_token("user-1", "alice", "admin", SETTINGS)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = decode_token(token, SETTINGS)
    assert (claims.sub, claims.username, claims.role) == ("user-1", "alice", "admin")
    assert (claims.iss, claims.aud) == ("https://gateway.example", "pocketllm")
    assert claims.exp - claims.iat == SETTINGS.ttl_s and abs(claims.iat - time.time()) < 5
    assert claims.raw["nbf"] == claims.iat and claims.jti and len(claims.jti) == 32
    assert decode_token(issue_token("user-1", "alice", "admin", SETTINGS), SETTINGS).jti != claims.jti


def test_a_token_issued_long_ago_has_expired() -> None:
    token = issue_token("u", "u", "user", SETTINGS, now=time.time() - SETTINGS.ttl_s - 60)
    assert "expired" in str(_refused(token, lambda t: decode_token(t, SETTINGS)))


def test_the_algorithm_list_comes_from_the_settings() -> None:
    hs512 = TokenSettings(SECRET, algorithms=("HS512",))
    token = issue_token("u", "u", "user", hs512)
    assert jwt.get_unverified_header(token)["alg"] == "HS512"
    assert decode_token(token, hs512).sub == "u"
    # a correctly signed HS256 token is still refused: the header does not choose the algorithm
    _refused(_hs256(_claims(iss=hs512.issuer, aud=hs512.audience)), lambda t: decode_token(t, hs512))


def attack_tokens(rsa_key: rsa.RSAPrivateKey) -> dict[str, str]:
    """Tokens an attacker might send to our HS256 decoder."""
    now = int(time.time())
    good = _hs256(_claims())
    header, payload, signature = good.split(".")
    return {
        "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.",
        "alg None": f"{_b64({'alg': 'None', 'typ': 'JWT'})}.{payload}.",
        "alg NONE with the real signature": f"{_b64({'alg': 'NONE', 'typ': 'JWT'})}.{payload}.{signature}",
        "stripped signature": f"{header}.{payload}.",
        "tampered payload": f"{header}.{_b64({**_claims(), 'sub': 'admin-id'})}.{signature}",
        "tampered header": f"{_b64({'alg': 'HS512', 'typ': 'JWT'})}.{payload}.{signature}",
        "wrong secret": _hs256(_claims(), "x" * 64),
        "HS512 not configured": jwt.encode(_claims(), SECRET, algorithm="HS512"),
        "RS256 not configured": jwt.encode(_claims(), rsa_key, algorithm="RS256"),
        "expired beyond leeway": _hs256(_claims(exp=now - SETTINGS.leeway_s - 60)),
        "future nbf": _hs256(_claims(nbf=now + 600)),
        "future iat": _hs256(_claims(iat=now + 600)),
        "wrong aud": _hs256(_claims(aud="someone-else")),
        "aud list": _hs256(_claims(aud=["pocketllm", "other"])),
        "aud with a suffix": _hs256(_claims(aud="pocketllm-evil")),
        "iss with a suffix": _hs256(_claims(iss="https://gateway.example.evil")),
        "iss shortened": _hs256(_claims(iss="https://gateway.exampl")),
        "missing exp": _hs256(_claims(exp=None)),
        "missing iat": _hs256(_claims(iat=None)),
        "missing sub": _hs256(_claims(sub=None)),
        "missing iss": _hs256(_claims(iss=None)),
        "missing aud": _hs256(_claims(aud=None)),
        "sub not a string": _hs256(_claims(sub=12)),
        "exp not a number": _hs256(_claims(exp="tomorrow")),
        "garbage": "not.a.token",
        "two segments": f"{header}.{payload}",
        "empty": "",
        "oversized": _hs256(_claims(pad="p" * 9000)),
    }


ATTACK_NAMES = [
    "alg none",
    "alg None",
    "alg NONE with the real signature",
    "stripped signature",
    "tampered payload",
    "tampered header",
    "wrong secret",
    "HS512 not configured",
    "RS256 not configured",
    "expired beyond leeway",
    "future nbf",
    "future iat",
    "wrong aud",
    "aud list",
    "aud with a suffix",
    "iss with a suffix",
    "iss shortened",
    "missing exp",
    "missing iat",
    "missing sub",
    "missing iss",
    "missing aud",
    "sub not a string",
    "exp not a number",
    "garbage",
    "two segments",
    "empty",
    "oversized",
]


def test_the_attack_list_is_complete(rsa_key: rsa.RSAPrivateKey) -> None:
    assert sorted(attack_tokens(rsa_key)) == sorted(ATTACK_NAMES)


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attack_tokens_are_refused(name: str, rsa_key: rsa.RSAPrivateKey) -> None:
    _refused(attack_tokens(rsa_key)[name], lambda t: decode_token(t, SETTINGS))


def test_small_clock_skew_is_tolerated() -> None:
    now = int(time.time())
    assert decode_token(_hs256(_claims(exp=now - 5)), SETTINGS).sub == "user-1"
    assert decode_token(_hs256(_claims(nbf=now + 5)), SETTINGS).sub == "user-1"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"secret": "short"},
        {"secret": "s" * 31},
        {"secret": "s" * 40, "algorithms": ("HS512",)},
        {"secret": SECRET, "algorithms": ()},
        {"secret": SECRET, "algorithms": ("none",)},
        {"secret": SECRET, "algorithms": ("RS256",)},
        {"secret": SECRET, "issuer": ""},
        {"secret": SECRET, "ttl_s": 0},
        {"secret": SECRET, "leeway_s": 3600},
    ],
)
def test_unsafe_token_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="token"):
        TokenSettings(**kwargs)


def test_the_secret_stays_out_of_repr() -> None:
    assert SECRET not in repr(SETTINGS)


# The external identity provider


def _idp_claims(**overrides: Any) -> dict[str, Any]:
    return _claims(**{"iss": IDP, "aud": "pocketllm", "sub": "alice", **overrides})


def test_external_rs256_with_a_pem_key_and_the_key_confusion_attack(rsa_key: rsa.RSAPrivateKey) -> None:
    provider = ExternalProvider(IDP, "pocketllm", public_key=_pem(rsa_key), algorithms=("RS256",))
    claims = decode_external(jwt.encode(_idp_claims(), rsa_key, algorithm="RS256"), provider)
    assert (claims.sub, claims.username, claims.iss) == ("alice", "alice", IDP)
    decode = lambda t: decode_external(t, provider)  # noqa: E731
    # HS256 "signed" with the provider's public key bytes: the classic algorithm-confusion attack
    _refused(_forge_hs256(_idp_claims(), _pem(rsa_key).encode()), decode)
    _refused(_forge_hs256(_idp_claims(), _pem(rsa_key).strip().encode()), decode)
    _refused(f"{_b64({'alg': 'none'})}.{_b64(_idp_claims())}.", decode)
    now = int(time.time())
    for bad in (
        _idp_claims(iss="https://idp.example.evil"),
        _idp_claims(aud="other"),
        _idp_claims(exp=now - 600),
        _idp_claims(nbf=now + 600),
        _idp_claims(exp=None),
    ):
        _refused(jwt.encode(bad, rsa_key, algorithm="RS256"), decode)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _refused(jwt.encode(_idp_claims(), other, algorithm="RS256"), decode)


def test_external_audience_lists_must_contain_ours_exactly(rsa_key: rsa.RSAPrivateKey) -> None:
    provider = ExternalProvider(IDP, "pocketllm", public_key=_pem(rsa_key), username_claim="email")
    token = jwt.encode(_idp_claims(aud=["pocketllm", "x"], email="a@x.org"), rsa_key, algorithm="RS256")
    claims = decode_external(token, provider)
    assert claims.aud == ("pocketllm", "x") and claims.username == "a@x.org"
    refused = jwt.encode(_idp_claims(aud=["pocketllm-x", "x"]), rsa_key, algorithm="RS256")
    _refused(refused, lambda t: decode_external(t, provider))
    no_email = decode_external(jwt.encode(_idp_claims(), rsa_key, algorithm="RS256"), provider)
    assert no_email.username is None


def test_external_es256_from_a_jwks_file(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "jwks.json"
    secret_jwk = {
        "kty": "oct",
        "kid": "shared",
        "k": base64.urlsafe_b64encode(b"k" * 32).decode().rstrip("="),
    }
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256", "use": "sig"}, secret_jwk]}))
    provider = ExternalProvider(IDP, "pocketllm", jwks_file=str(jwks))
    token = jwt.encode(_idp_claims(sub="carol"), key, algorithm="ES256", headers={"kid": "k1"})
    assert decode_external(token, provider).sub == "carol"
    assert (
        decode_external(jwt.encode(_idp_claims(), key, algorithm="ES256"), provider).sub == "alice"
    )  # no kid
    decode = lambda t: decode_external(t, provider)  # noqa: E731
    other = ec.generate_private_key(ec.SECP256R1())
    _refused(jwt.encode(_idp_claims(), other, algorithm="ES256", headers={"kid": "k1"}), decode)
    _refused(jwt.encode(_idp_claims(), key, algorithm="ES256", headers={"kid": "unknown"}), decode)
    # the symmetric key in the file is never used: a token signed with it is refused
    _refused(jwt.encode(_idp_claims(), b"k" * 32, algorithm="HS256", headers={"kid": "shared"}), decode)
    _refused(_forge_hs256(_idp_claims(), b"k" * 32), decode)


def test_jwks_keys_outside_the_configured_algorithms_are_ignored(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(
        json.dumps({"keys": [{**ec_jwk, "kid": "ec"}, {**rsa_jwk, "kid": "rsa", "alg": "RS256"}]})
    )
    provider = ExternalProvider(IDP, "pocketllm", jwks_file=str(jwks), algorithms=("ES256",))
    token = jwt.encode(_idp_claims(), ec_key, algorithm="ES256", headers={"kid": "ec"})
    assert decode_external(token, provider).sub == "alice"
    rs256 = jwt.encode(_idp_claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa"})
    _refused(rs256, lambda t: decode_external(t, provider))


@pytest.mark.parametrize(
    "problem",
    [
        "hs256 allowed",
        "no key",
        "two keys",
        "rsa-1024",
        "curve mismatch",
        "only a symmetric jwk",
        "empty issuer",
    ],
)
def test_unsafe_external_providers_are_refused(
    problem: str, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    pem = _pem(rsa_key)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "oct", "k": "a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5a2V5"}]}))
    small = _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    configs: dict[str, dict[str, Any]] = {
        "hs256 allowed": {"public_key": pem, "algorithms": ("RS256", "HS256")},
        "no key": {},
        "two keys": {"public_key": pem, "jwks_file": str(jwks)},
        "rsa-1024": {"public_key": small},
        "curve mismatch": {"public_key": pem, "algorithms": ("ES256",)},
        "only a symmetric jwk": {"jwks_file": str(jwks)},
        "empty issuer": {"public_key": pem, "issuer": ""},
    }
    kwargs = {"issuer": IDP, "audience": "pocketllm", **configs[problem]}
    with pytest.raises(ValueError, match=r"identity provider|JWKS|RSA key"):
        ExternalProvider(**kwargs)


def test_unverified_issuer_only_reads() -> None:
    assert unverified_issuer(_hs256(_claims(iss=IDP), "x" * 64)) == IDP
    assert unverified_issuer(_hs256(_claims(iss=None))) is None
    assert unverified_issuer(_forge_hs256(_claims(iss=5), b"k" * 32)) is None
    assert unverified_issuer("garbage") is None
    assert unverified_issuer("a" * 10_000) is None
