"""What a principal may do."""

from __future__ import annotations

import dataclasses

import pytest

from auth.principal import ALL_SCOPES, Principal, as_role


def test_admin_needs_the_role_and_the_scope() -> None:
    assert Principal("1", "root", "admin", frozenset({"inference", "admin"})).is_admin
    assert not Principal("1", "root", "admin", frozenset({"inference"})).is_admin  # an admin's inference key
    assert not Principal("2", "bot", "user", frozenset({"admin"})).is_admin
    assert not Principal("3", "u", "user", frozenset({"inference"})).is_admin
    assert sorted(ALL_SCOPES) == ["admin", "inference"]


def test_scopes() -> None:
    principal = Principal("1", "u", "user", frozenset({"inference"}))
    assert principal.has_scope("inference")
    assert not principal.has_scope("admin")
    assert not Principal("1", "u", "user", frozenset()).has_scope("inference")


def test_model_allow_list() -> None:
    anything = Principal("1", "u", "user", frozenset({"inference"}))
    assert anything.can_use_model("any-model")
    listed = dataclasses.replace(anything, key_id="k", allowed_models=frozenset({"smol", "gemma"}))
    assert listed.can_use_model("smol") and not listed.can_use_model("other")
    assert not listed.can_use_model("SMOL")  # exact ids only
    nothing = dataclasses.replace(anything, allowed_models=frozenset())
    assert not nothing.can_use_model("smol")


def test_principals_are_immutable() -> None:
    principal = Principal("1", "u", "user", frozenset({"inference"}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        principal.role = "admin"  # type: ignore[misc]


def test_roles() -> None:
    assert as_role("user") == "user" and as_role("admin") == "admin"
    for bad in ("Admin", "root", ""):
        with pytest.raises(ValueError, match="role"):
            as_role(bad)
