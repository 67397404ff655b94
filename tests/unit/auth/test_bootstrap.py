"""Default development users, the production secret check, and the names the gateway still imports."""

from __future__ import annotations

import secrets

import pytest

from auth.bootstrap import (
    DEFAULT_SECRET_KEY,
    accounts_with_default_passwords,
    check_production_secrets,
    check_secrets,
    ensure_default_users,
    estimated_bits,
    refuse_default_passwords,
    weak_secret_reason,
)
from auth.errors import InsecureConfigurationError
from auth.passwords import hash_password, verify_password
from auth.store import IdentityStore
from tests.unit.auth.conftest import FAST

pytestmark = pytest.mark.anyio


async def test_default_users_are_created_once(store: IdentityStore) -> None:
    created = await ensure_default_users(store, FAST)
    assert [(u.username, u.role) for u in created] == [("user1", "user"), ("admin", "admin")]
    user1 = await store.get_user_by_name("user1")
    admin = await store.get_user_by_name("admin")
    assert user1 is not None and user1.password_hash is not None
    assert admin is not None and admin.password_hash is not None
    assert verify_password("password123", user1.password_hash)
    assert verify_password("admin123", admin.password_hash)
    assert "password123" not in user1.password_hash and user1.password_hash.startswith("scrypt$n=1024,")
    assert await ensure_default_users(store, FAST) == []
    again = await store.get_user_by_name("user1")
    assert again is not None and again.password_hash == user1.password_hash  # not reset


async def test_only_missing_default_users_are_created(store: IdentityStore) -> None:
    existing = await store.create_user("admin", "custom-hash", "admin")
    created = await ensure_default_users(store, FAST)
    assert [u.username for u in created] == ["user1"]
    assert await store.get_user_by_name("admin") == existing


def test_production_refuses_the_default_secret_key() -> None:
    assert DEFAULT_SECRET_KEY == "change-me-in-production"
    with pytest.raises(InsecureConfigurationError, match="SECRET_KEY is the public development default"):
        check_production_secrets(DEFAULT_SECRET_KEY, "j" * 64)


def test_production_refuses_a_short_jwt_secret() -> None:
    with pytest.raises(InsecureConfigurationError, match="JWT secret is shorter than 32 bytes") as caught:
        check_production_secrets("k" * 40, "short-jwt-secret")
    assert "short-jwt-secret" not in str(caught.value)
    with pytest.raises(InsecureConfigurationError, match=r"SECRET_KEY \(which signs JWTs\)") as caught:
        check_production_secrets("my-own-short-key", None)
    assert "my-own-short-key" not in str(caught.value)
    with pytest.raises(InsecureConfigurationError):
        check_production_secrets("k" * 40, "")
    with pytest.raises(InsecureConfigurationError):
        check_production_secrets("k" * 40, "é" * 15)  # 30 bytes, 15 characters


def test_production_accepts_real_secrets() -> None:
    check_production_secrets(secrets.token_urlsafe(48), None)
    check_production_secrets("short-but-unused", secrets.token_urlsafe(32))
    check_production_secrets(secrets.token_hex(16), None)  # 32 hex characters: 128 random bits
    check_production_secrets("k" * 8, "my-secret-" + secrets.token_urlsafe(32))  # known words do not count
    assert issubclass(InsecureConfigurationError, ValueError)


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        ("a" * 32, "repetition"),  # the secret that forged an accepted token in the attack
        (DEFAULT_SECRET_KEY * 2, "published default"),  # the default doubled: 46 bytes
        ("Change-Me-In-Production" * 3, "published default"),
        ("secret" * 6, "published default"),
        ("abcd" * 8, "repetition"),
        ("0123456789abcdef" * 2, "repetition"),
        ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab", "variety"),
        ("abababababababababababababababbb", "variety"),
    ],
)
def test_guessable_secrets_are_refused_whatever_their_length(secret: str, reason: str) -> None:
    assert reason in (weak_secret_reason(secret) or "")
    with pytest.raises(InsecureConfigurationError) as caught:
        check_production_secrets("k" * 8, secret)
    assert secret not in str(caught.value)
    with pytest.raises(InsecureConfigurationError):
        check_secrets(secret, None, production=False)  # a set SECRET_KEY is held to the rule in development


def test_development_refuses_a_short_secret_and_keeps_the_unset_default() -> None:
    check_secrets(DEFAULT_SECRET_KEY, None, production=False)  # unset: the random per-data-dir secret
    for weak in ("secret", "s3cret", "x" * 31):
        with pytest.raises(InsecureConfigurationError, match="shorter than 32 bytes"):
            check_secrets(weak, None, production=False)


def test_the_entropy_estimate() -> None:
    assert estimated_bits("") == 0 and estimated_bits("a" * 100) == 0
    assert estimated_bits("ab" * 16) == pytest.approx(32)
    assert estimated_bits(secrets.token_urlsafe(48)) > 300


async def test_accounts_with_default_passwords(store: IdentityStore) -> None:
    await ensure_default_users(store, FAST)
    assert await accounts_with_default_passwords(store) == ["user1", "admin"]
    with pytest.raises(InsecureConfigurationError, match="user1, admin"):
        await refuse_default_passwords(store)
    admin = await store.get_user_by_name("admin")
    user1 = await store.get_user_by_name("user1")
    assert admin is not None and user1 is not None
    await store.set_password_hash(admin.id, hash_password("a-new-admin-password", FAST))
    await store.disable_user(user1.id)
    assert await accounts_with_default_passwords(store) == []
    await refuse_default_passwords(store)
