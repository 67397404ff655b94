"""JWTs (pyjwt): our own HS256 tokens, and tokens of an external identity provider (RS256/ES256)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

REQUIRED_CLAIMS = ("sub", "iat", "exp", "iss", "aud")


class InvalidTokenError(Exception):
    """The token is not acceptable; the message is safe to show (it never contains the token)."""


@dataclass(frozen=True, slots=True)
class TokenConfig:
    """Our own tokens."""

    secret: str
    issuer: str = "pocketllm"
    audience: str = "pocketllm"
    algorithms: tuple[str, ...] = ("HS256",)
    ttl_s: int = 3600
    leeway_s: int = 30


@dataclass(frozen=True, slots=True)
class ExternalProvider:
    """An external identity provider whose tokens are verified with a public key or a JWKS file."""

    issuer: str
    audience: str
    public_key: str | None = None
    """PEM text of the provider's public key."""
    jwks_file: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    username_claim: str = "sub"
    create_users: bool = False
    leeway_s: int = 30

    def key_for(self, token: str) -> Any:
        """The verification key for ``token`` (by ``kid`` from the JWKS file, or the configured PEM)."""
        if self.public_key:
            return self.public_key
        if not self.jwks_file:
            raise InvalidTokenError("the identity provider has no key configured")
        keys = jwt.PyJWKSet.from_dict(json.loads(Path(self.jwks_file).read_text(encoding="utf-8")))
        kid = jwt.get_unverified_header(token).get("kid")
        for key in keys.keys:
            if kid is None or key.key_id == kid:
                return key.key
        raise InvalidTokenError("no key of the identity provider matches the token")


def issue_token(config: TokenConfig, *, user_id: str, username: str, role: str) -> str:
    """A signed token for a user."""
    now = int(time.time())
    claims = {
        "sub": user_id,
        "name": username,
        "role": role,
        "iat": now,
        "nbf": now,
        "exp": now + config.ttl_s,
        "iss": config.issuer,
        "aud": config.audience,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, config.secret, algorithm=config.algorithms[0])


def decode_token(config: TokenConfig, token: str) -> dict[str, Any]:
    """Verify one of our tokens: the algorithm list comes from the configuration, never the header."""
    return _decode(token, config.secret, config.algorithms, config.issuer, config.audience, config.leeway_s)


def decode_external(provider: ExternalProvider, token: str) -> dict[str, Any]:
    """Verify an external provider's token against its key, issuer and audience."""
    try:
        key = provider.key_for(token)
    except (jwt.PyJWTError, ValueError, OSError) as exc:
        raise InvalidTokenError("the token's key could not be resolved") from exc
    return _decode(token, key, provider.algorithms, provider.issuer, provider.audience, provider.leeway_s)


def _decode(
    token: str, key: Any, algorithms: tuple[str, ...], issuer: str, audience: str, leeway: int
) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=list(algorithms),
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": list(REQUIRED_CLAIMS), "verify_signature": True, "strict_aud": True},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidTokenError("the token has expired") from None
    except jwt.ImmatureSignatureError:
        raise InvalidTokenError("the token is not valid yet") from None
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidTokenError(f"the token lacks the {exc.claim!r} claim") from None
    except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
        raise InvalidTokenError("the token was issued for someone else") from None
    except jwt.PyJWTError:
        raise InvalidTokenError("the token is invalid") from None
    return claims


def is_external(token: str, provider: ExternalProvider | None) -> bool:
    """Whether an (unverified) token claims to come from the external provider."""
    if provider is None:
        return False
    try:
        return jwt.decode(token, options={"verify_signature": False}).get("iss") == provider.issuer
    except jwt.PyJWTError:
        return False
