"""Default development users, the production secret check, and the names the gateway still imports."""

from __future__ import annotations

import pytest

from auth.bootstrap import DEFAULT_SECRET_KEY, check_production_secrets, ensure_default_users
from auth.errors import InsecureConfigurationError
from auth.passwords import verify_password
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
    check_production_secrets("k" * 40, None)
    check_production_secrets("short-but-unused", "j" * 32)
    check_production_secrets("k" * 8, "é" * 16)  # 32 bytes
    assert issubclass(InsecureConfigurationError, ValueError)
