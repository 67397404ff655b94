"""JWTs with pyjwt: our own HMAC tokens, and RS256/ES256 tokens of an optional external identity provider.

Decoding takes the algorithm list from configuration, never from the token's header; it requires
sub, iat, exp, iss and aud, matches iss and aud exactly, and allows a small leeway for clock skew.
Every failure is one ``InvalidTokenError`` whose message never contains the token.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from auth.errors import InvalidTokenError

REQUIRED_CLAIMS = ("sub", "iat", "exp", "iss", "aud")
MAX_TOKEN_LENGTH = 8192
HMAC_ALGORITHMS = {"HS256": 32, "HS384": 48, "HS512": 64}
"""Our own tokens' algorithms and the minimum secret length (bytes) each needs (RFC 7518 3.2)."""
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
MIN_RSA_BITS = 2048
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | frozenset(EC_ALGORITHMS.values())


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """Our own tokens (HMAC-signed).

    Attributes:
        secret: the HMAC key; at least 32 bytes (48 for HS384, 64 for HS512).
        issuer: the ``iss`` we write and require.
        audience: the ``aud`` we write and require.
        algorithms: accepted algorithms; the first one signs.
        ttl_s: token lifetime in seconds.
        leeway_s: clock-skew allowance in seconds (0..300).
    """

    secret: str = field(repr=False)
    issuer: str = "pocketllm"
    audience: str = "pocketllm"
    algorithms: tuple[str, ...] = ("HS256",)
    ttl_s: int = 3600
    leeway_s: int = 30

    def __post_init__(self) -> None:
        if not self.algorithms or not set(self.algorithms) <= set(HMAC_ALGORITHMS):
            raise ValueError(f"token algorithms must be among {', '.join(HMAC_ALGORITHMS)}")
        needed = max(HMAC_ALGORITHMS[a] for a in self.algorithms)
        if len(self.secret.encode("utf-8")) < needed:
            raise ValueError(f"the token secret must be at least {needed} bytes")
        if not self.issuer or not self.audience:
            raise ValueError("the token issuer and audience must not be empty")
        if self.ttl_s <= 0 or not 0 <= self.leeway_s <= 300:
            raise ValueError("token ttl_s must be positive and leeway_s 0..300")


TokenConfig = TokenSettings
"""Former name of ``TokenSettings`` (the gateway still constructs it under this name)."""


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified claims of a token.

    Attributes:
        sub: the subject (our tokens: the user id; external: the provider's subject).
        iss: the issuer.
        aud: the audience (a tuple when the token lists several).
        iat: issued-at, unix seconds.
        exp: expiry, unix seconds.
        jti: the token id, if any.
        username: our tokens: the ``name`` claim; external: the configured username claim.
        role: the ``role`` claim of our tokens (informational: the store's role is what counts).
        version: the ``ver`` claim of our tokens: the user's token version at issue (0 when absent).
        raw: every claim, read-only.
    """

    sub: str
    iss: str
    aud: str | tuple[str, ...]
    iat: int
    exp: int
    jti: str | None
    username: str | None
    role: str | None
    raw: Mapping[str, Any] = field(repr=False)
    version: int = 0


def issue_token(
    user_id: str,
    username: str,
    role: str,
    settings: TokenSettings,
    *,
    now: float | None = None,
    version: int = 0,
) -> str:
    """Sign a token for a user.

    Args:
        user_id: becomes ``sub``.
        username: becomes ``name``.
        role: becomes ``role``.
        settings: secret, algorithm (the first listed), issuer, audience, lifetime.
        now: the issue time (unix seconds); the current time when None.
        version: the user's token version (``ver``); a token of an older version is refused.

    Returns:
        The compact JWT with sub, name, role, iat, nbf, exp, iss, aud, ver and a random jti.
    """
    issued = int(time.time() if now is None else now)
    claims = {
        "sub": user_id,
        "name": username,
        "role": role,
        "iat": issued,
        "nbf": issued,
        "exp": issued + settings.ttl_s,
        "iss": settings.issuer,
        "aud": settings.audience,
        "jti": uuid.uuid4().hex,
        "ver": version,
    }
    return jwt.encode(claims, settings.secret, algorithm=settings.algorithms[0])


def decode_token(token: str, settings: TokenSettings) -> Claims:
    """Verify one of our tokens.

    Args:
        token: the compact JWT.
        settings: the secret, accepted algorithms, issuer, audience and leeway.

    Returns:
        The verified claims.

    Raises:
        InvalidTokenError: for any token that must not be accepted.
    """
    payload = _decode(
        token,
        settings.secret,
        settings.algorithms,
        settings.issuer,
        settings.audience,
        settings.leeway_s,
        True,
    )
    return _claims(payload, "name")


@dataclass(frozen=True, slots=True)
class ExternalProvider:
    """An external identity provider whose tokens are verified with a PEM public key or a JWKS file.

    The key material is read once, at construction (a bad file fails at start-up, not per request;
    rotating keys needs a restart). Only RSA and EC keys are used, so a symmetric algorithm can never
    be verified with public key bytes as its secret.

    Attributes:
        issuer: the exact ``iss`` required.
        audience: the ``aud`` required (a list ``aud`` must contain it exactly).
        public_key: PEM text of the provider's public key (this or ``jwks_file``).
        jwks_file: path of a JWKS JSON file (this or ``public_key``).
        algorithms: accepted algorithms, a subset of the RS*/PS*/ES* family.
        username_claim: the claim naming the local user.
        create_users: create a local user on first sight of an unknown name.
        leeway_s: clock-skew allowance in seconds.
    """

    issuer: str
    audience: str
    public_key: str | None = field(default=None, repr=False)
    jwks_file: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    username_claim: str = "sub"
    create_users: bool = False
    leeway_s: int = 30
    _pem: tuple[Any, tuple[str, ...]] | None = field(init=False, repr=False, compare=False)
    _jwks: dict[str | None, jwt.PyJWK] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("the identity provider needs an issuer and an audience")
        if (self.public_key is None) == (self.jwks_file is None):
            raise ValueError("the identity provider needs exactly one of public_key and jwks_file")
        if not self.algorithms or not set(self.algorithms) <= ASYMMETRIC_ALGORITHMS:
            raise ValueError("identity provider algorithms must be RS*, PS* or ES*")
        pem = _load_pem(self.public_key, self.algorithms) if self.public_key is not None else None
        jwks = _load_jwks(Path(self.jwks_file), self.algorithms) if self.jwks_file is not None else {}
        object.__setattr__(self, "_pem", pem)
        object.__setattr__(self, "_jwks", jwks)

    def key_for(self, token: str) -> tuple[Any, tuple[str, ...]]:
        """The verification key for a token and the algorithms it may verify.

        Args:
            token: the compact JWT (only its header is read here).

        Returns:
            ``(key, algorithms)``.

        Raises:
            InvalidTokenError: when no configured key fits the token.
        """
        if self._pem is not None:
            return self._pem
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidTokenError("the token is malformed") from None
        kid = header.get("kid")
        if kid is None and len(self._jwks) == 1:
            key = next(iter(self._jwks.values()))
        elif isinstance(kid, str) and kid in self._jwks:
            key = self._jwks[kid]
        else:
            raise InvalidTokenError("no key of the identity provider matches the token")
        return key, (key.algorithm_name,)


def _load_pem(pem: str, algorithms: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
    key = load_pem_public_key(pem.encode("utf-8"))
    if isinstance(key, rsa.RSAPublicKey):
        _check_rsa_size(key)
        usable = tuple(a for a in algorithms if a in RSA_ALGORITHMS)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        usable = tuple(a for a in algorithms if a == EC_ALGORITHMS.get(key.curve.name))
    else:
        raise ValueError("the identity provider's public key must be RSA or EC")
    if not usable:
        raise ValueError("no configured algorithm fits the identity provider's public key")
    return key, usable


def _check_rsa_size(key: rsa.RSAPublicKey) -> None:
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"the identity provider's RSA key has {key.key_size} bits; at least {MIN_RSA_BITS}")


def _load_jwks(path: Path, algorithms: tuple[str, ...]) -> dict[str | None, jwt.PyJWK]:
    document = json.loads(path.read_text(encoding="utf-8"))
    keys: dict[str | None, jwt.PyJWK] = {}
    for entry in document.get("keys", []):
        if entry.get("kty") not in {"RSA", "EC"} or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue
        if key.algorithm_name in algorithms:
            if isinstance(key.key, rsa.RSAPublicKey):
                _check_rsa_size(key.key)
            if key.key_id in keys:
                raise ValueError(f"the JWKS file {path} has two signing keys with the kid {key.key_id!r}")
            keys[key.key_id] = key
    if not keys:
        raise ValueError(f"the JWKS file {path} has no RSA/EC signing key for {', '.join(algorithms)}")
    return keys


def decode_external(token: str, provider: ExternalProvider) -> Claims:
    """Verify an external provider's token against its key, issuer and audience.

    Args:
        token: the compact JWT.
        provider: the provider's configuration and keys.

    Returns:
        The verified claims; ``username`` is the configured claim (None when absent or not a string).

    Raises:
        InvalidTokenError: for any token that must not be accepted.
    """
    _check_size(token)
    key, algorithms = provider.key_for(token)
    payload = _decode(token, key, algorithms, provider.issuer, provider.audience, provider.leeway_s, False)
    return _claims(payload, provider.username_claim)


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` a token claims, unverified: only to choose which verifier to apply.

    Args:
        token: the compact JWT.

    Returns:
        The claimed issuer, or None when the token is unreadable or names none.
    """
    if len(token) > MAX_TOKEN_LENGTH:
        return None
    try:
        iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError:
        return None
    return iss if isinstance(iss, str) else None


def _check_size(token: str) -> None:
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidTokenError("the token is too long")


def _decode(
    token: str, key: Any, algorithms: tuple[str, ...], issuer: str, audience: str, leeway: int, strict: bool
) -> dict[str, Any]:
    _check_size(token)
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=list(algorithms),
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={
                "require": list(REQUIRED_CLAIMS),
                "verify_signature": True,
                "strict_aud": strict,
                "enforce_minimum_key_length": True,
            },
        )
    except jwt.ExpiredSignatureError:
        raise InvalidTokenError("the token has expired") from None
    except jwt.ImmatureSignatureError:
        raise InvalidTokenError("the token is not valid yet") from None
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidTokenError(f"the token lacks the {exc.claim!r} claim") from None
    except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
        raise InvalidTokenError("the token was issued for someone else") from None
    except jwt.InvalidAlgorithmError:
        raise InvalidTokenError("the token's algorithm is not accepted") from None
    except (jwt.PyJWTError, ValueError, TypeError):
        # TypeError/ValueError: a key of the wrong type for the header's algorithm, odd claim types
        raise InvalidTokenError("the token is invalid") from None
    return payload


def _claims(payload: dict[str, Any], username_claim: str) -> Claims:
    aud = payload["aud"]
    username = payload.get(username_claim)
    role = payload.get("role")
    jti = payload.get("jti")
    version = payload.get("ver", 0)
    return Claims(
        sub=payload["sub"],
        iss=payload["iss"],
        aud=aud if isinstance(aud, str) else tuple(str(a) for a in aud),
        iat=int(payload["iat"]),
        exp=int(payload["exp"]),
        jti=jti if isinstance(jti, str) else None,
        username=username if isinstance(username, str) and username else None,
        role=role if isinstance(role, str) else None,
        raw=MappingProxyType(payload),
        version=version if isinstance(version, int) and not isinstance(version, bool) else -1,
    )
