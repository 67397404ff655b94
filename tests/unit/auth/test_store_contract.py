"""One contract for every identity-store backend (a backend joins by an entry in ``conftest.BACKENDS``)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from auth.errors import (
    LastAdminError,
    SessionExistsError,
    SessionNotFoundError,
    StoreClosedError,
    UserExistsError,
)
from auth.store import (
    UNLIMITED,
    ApiKey,
    CredentialLimits,
    IdentityStore,
    LimitOverride,
    StoredApiKey,
    StoredResponse,
)
from tests.unit.auth.conftest import StoreOpener

pytestmark = pytest.mark.anyio

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


async def test_users_are_created_and_found(store: IdentityStore) -> None:
    before = time.time()
    alice = await store.create_user("alice", "hash-a", "user")
    root = await store.create_user("root", None, "admin")
    assert HEX_ID.match(alice.id) and HEX_ID.match(root.id) and alice.id != root.id
    assert (alice.username, alice.role, alice.password_hash) == ("alice", "user", "hash-a")
    assert root.role == "admin" and root.password_hash is None
    assert before - 1 <= alice.created_at <= time.time() + 1
    assert alice.disabled_at is None and not alice.disabled and alice.last_login_at is None
    assert await store.get_user(alice.id) == alice
    assert await store.get_user_by_name("alice") == alice
    assert await store.get_user_by_name("ALICE") is None  # names are exact
    assert await store.get_user("0" * 32) is None
    assert await store.get_user_by_name("nobody") is None
    assert [u.username for u in await store.list_users()] == ["alice", "root"]
    assert "hash-a" not in repr(alice)


async def test_a_taken_username_and_an_unknown_role_are_refused(store: IdentityStore) -> None:
    await store.create_user("alice", "h", "user")
    with pytest.raises(UserExistsError):
        await store.create_user("alice", "other", "admin")
    with pytest.raises(ValueError, match="role"):
        await store.create_user("bob", "h", "superuser")  # type: ignore[arg-type]
    assert [u.username for u in await store.list_users()] == ["alice"]


async def test_disable_is_idempotent(store: IdentityStore) -> None:
    alice = await store.create_user("alice", "h", "user")
    disabled = await store.disable_user(alice.id)
    assert disabled is not None and disabled.disabled and disabled.disabled_at is not None
    again = await store.disable_user(alice.id)
    assert again is not None and again.disabled_at == disabled.disabled_at
    assert await store.disable_user("0" * 32) is None
    fetched = await store.get_user_by_name("alice")
    assert fetched is not None and fetched.disabled


async def test_enable_and_the_last_enabled_admin(store: IdentityStore) -> None:
    root = await store.create_user("root", None, "admin")
    alice = await store.create_user("alice", None, "user")
    with pytest.raises(LastAdminError):
        await store.disable_user(root.id)
    still = await store.get_user(root.id)
    assert still is not None and not still.disabled
    second = await store.create_user("second", None, "admin")
    disabled = await store.disable_user(root.id)  # another admin is enabled: allowed
    assert disabled is not None and disabled.disabled
    with pytest.raises(LastAdminError):
        await store.disable_user(second.id)
    assert (await store.disable_user(root.id)) == disabled  # already disabled: idempotent, no error
    enabled = await store.enable_user(root.id)
    assert enabled is not None and not enabled.disabled and enabled.disabled_at is None
    assert await store.disable_user(alice.id) is not None
    assert await store.enable_user("0" * 32) is None


async def test_token_versions_and_revoked_token_ids(store: IdentityStore) -> None:
    alice = await store.create_user("alice", "old", "user")
    assert alice.token_version == 0
    assert await store.change_password(alice.id, "new") == 1
    changed = await store.get_user(alice.id)
    assert changed is not None and changed.password_hash == "new" and changed.token_version == 1
    assert await store.revoke_all_tokens(alice.id) == 2
    await store.set_password_hash(alice.id, "rehash")  # a rehash keeps the tokens
    rehashed = await store.get_user(alice.id)
    assert rehashed is not None and rehashed.token_version == 2
    assert not await store.token_revoked("jti-1")
    await store.revoke_token("jti-1", alice.id, time.time() + 60)
    await store.revoke_token("jti-1", alice.id, time.time() + 60)  # idempotent
    await store.revoke_token("jti-old", alice.id, time.time() - 1)  # already expired: pruned later
    assert await store.token_revoked("jti-1")
    await store.revoke_token("jti-2", alice.id, time.time() + 60)
    assert not await store.token_revoked("jti-old") and await store.token_revoked("jti-2")


async def test_password_hash_and_last_login_are_updated(store: IdentityStore) -> None:
    alice = await store.create_user("alice", "old", "user")
    bob = await store.create_user("bob", "bobs", "user")
    await store.set_password_hash(alice.id, "new")
    await store.touch_user(alice.id, 1234.5)
    fetched = await store.get_user(alice.id)
    assert fetched is not None and fetched.password_hash == "new" and fetched.last_login_at == 1234.5
    untouched = await store.get_user(bob.id)
    assert untouched is not None and untouched.password_hash == "bobs" and untouched.last_login_at is None
    await store.touch_user(bob.id)
    touched = await store.get_user(bob.id)
    assert touched is not None and touched.last_login_at is not None
    assert abs(touched.last_login_at - time.time()) < 60


async def test_keys_are_stored_by_digest(store: IdentityStore) -> None:
    bob = await store.create_user("bob", None, "user")
    key = await store.create_key(bob.id, "d1" * 32, "abcd", ["inference"], ["m1", "m2"], 123.0)
    assert HEX_ID.match(key.id) and key.user_id == bob.id and key.last4 == "abcd"
    assert key.scopes == ("inference",) and key.models == ("m1", "m2") and key.expires_at == 123.0
    assert key.revoked_at is None and not key.revoked
    found = await store.get_key_by_hash("d1" * 32)
    assert isinstance(found, StoredApiKey) and found.key_hash == "d1" * 32
    assert (found.id, found.scopes, found.models, found.expires_at) == (key.id, key.scopes, key.models, 123.0)
    assert found.expired(123.0) and not found.expired(122.9)
    assert await store.get_key_by_hash("d2" * 32) is None


async def test_a_key_and_its_owner_come_in_one_lookup(store: IdentityStore) -> None:
    bob = await store.create_user("bob", "bobs-hash", "user")
    key = await store.create_key(bob.id, "d1" * 32, "abcd", ["inference"], None, None)
    found = await store.get_key_and_owner("d1" * 32)
    assert found is not None
    assert found.key == await store.get_key_by_hash("d1" * 32) and found.key.id == key.id
    assert found.owner == bob
    assert found.limits == CredentialLimits()  # no override stored for either
    await store.disable_user(bob.id)
    await store.revoke_key(key.id)
    again = await store.get_key_and_owner("d1" * 32)
    assert again is not None and again.key.revoked and again.owner.disabled
    assert await store.get_key_and_owner("d2" * 32) is None


async def test_the_key_lookup_brings_the_key_and_owner_limit_overrides(store: IdentityStore) -> None:
    bob = await store.create_user("bob", None, "user")
    eve = await store.create_user("eve", None, "user")
    bobs = await store.create_key(bob.id, "b1" * 32, "bbbb", ["inference"], None, None)
    eves = await store.create_key(eve.id, "e1" * 32, "eeee", ["inference"], None, None)
    await store.set_limit_override(f"key:{bobs.id}", LimitOverride(rpm=7, concurrency=UNLIMITED))
    await store.set_limit_override(f"user:{bob.id}", LimitOverride(tpm=900))
    await store.set_limit_override(f"key:{eves.id}", LimitOverride(tpm=5))  # eve's key only
    await store.set_limit_override(f"user:{bobs.id}", LimitOverride(rpm=1))  # a subject named by a key id
    await store.set_limit_override(f"key:{bob.id}", LimitOverride(rpm=2))  # ... and by a user id: not his
    found = await store.get_key_and_owner("b1" * 32)
    assert found is not None and found.key.id == bobs.id and found.owner.id == bob.id
    assert found.limits == CredentialLimits(
        LimitOverride(rpm=7, concurrency=UNLIMITED), LimitOverride(tpm=900)
    )
    other = await store.get_key_and_owner("e1" * 32)
    assert other is not None and other.limits == CredentialLimits(key=LimitOverride(tpm=5), user=None)
    await store.set_limit_override(f"key:{bobs.id}", LimitOverride(rpm=0))  # replaced whole
    await store.set_limit_override(f"user:{bob.id}", LimitOverride())  # cleared
    again = await store.get_key_and_owner("b1" * 32)
    assert again is not None and again.limits == CredentialLimits(key=LimitOverride(rpm=0), user=None)


async def test_a_token_owner_comes_with_the_revocation_and_limits_in_one_lookup(
    store: IdentityStore,
) -> None:
    alice = await store.create_user("alice", "h", "user")
    bob = await store.create_user("bob", "h", "user")
    owner = await store.get_token_owner(alice.id, "jti-1")
    assert owner is not None and owner.user == alice
    assert not owner.token_revoked and owner.limits == CredentialLimits()
    await store.revoke_token("jti-1", alice.id, time.time() + 60)
    await store.set_limit_override(f"user:{alice.id}", LimitOverride(rpm=3, tpm=UNLIMITED))
    await store.set_limit_override(f"key:{alice.id}", LimitOverride(rpm=4))  # not a user's subject
    revoked = await store.get_token_owner(alice.id, "jti-1")
    assert revoked is not None and revoked.token_revoked
    assert revoked.limits == CredentialLimits(user=LimitOverride(rpm=3, tpm=UNLIMITED))
    kept = await store.get_token_owner(alice.id, "jti-2")
    assert kept is not None and not kept.token_revoked and kept.limits == revoked.limits
    no_jti = await store.get_token_owner(alice.id, None)
    assert no_jti is not None and not no_jti.token_revoked
    # a revoked id of another user's token is still a revoked id (ids are unique), the user is bob
    bobs = await store.get_token_owner(bob.id, "jti-1")
    assert bobs is not None and bobs.user == bob and bobs.token_revoked and bobs.limits == CredentialLimits()
    await store.disable_user(alice.id)
    disabled = await store.get_token_owner(alice.id, "jti-2")
    assert disabled is not None and disabled.user.disabled
    assert await store.get_token_owner("0" * 32, "jti-1") is None


async def test_listing_keys_never_shows_a_digest(store: IdentityStore) -> None:
    bob = await store.create_user("bob", None, "user")
    eve = await store.create_user("eve", None, "admin")
    first = await store.create_key(bob.id, "a" * 64, "aaaa", ["inference"], None, None)
    second = await store.create_key(eve.id, "b" * 64, "bbbb", ["inference", "admin"], None, None)
    third = await store.create_key(bob.id, "c" * 64, "cccc", ["inference"], [], None)
    listed = await store.list_keys()
    assert [k.id for k in listed] == [first.id, second.id, third.id]
    for key in listed:
        assert type(key) is ApiKey and not hasattr(key, "key_hash")
        assert "a" * 64 not in repr(key) and "b" * 64 not in repr(key)
    assert [k.id for k in await store.list_keys(bob.id)] == [first.id, third.id]
    assert listed[1].scopes == ("inference", "admin") and listed[1].models is None
    assert listed[2].models == ()  # an empty allow-list is not "any model"
    assert await store.list_keys("0" * 32) == []


async def test_revoking_a_key(store: IdentityStore) -> None:
    bob = await store.create_user("bob", None, "user")
    key = await store.create_key(bob.id, "d" * 64, "abcd", ["inference"], None, None)
    other = await store.create_key(bob.id, "e" * 64, "efgh", ["inference"], None, None)
    assert await store.revoke_key(key.id)
    revoked = await store.get_key_by_hash("d" * 64)
    assert revoked is not None and revoked.revoked and revoked.revoked_at is not None
    assert await store.revoke_key(key.id)  # idempotent, and the first time stays
    again = await store.get_key_by_hash("d" * 64)
    assert again is not None and again.revoked_at == revoked.revoked_at
    untouched = await store.get_key_by_hash("e" * 64)
    assert untouched is not None and not untouched.revoked and untouched.id == other.id
    assert not await store.revoke_key("0" * 32)


async def test_sessions_are_owner_scoped(store: IdentityStore) -> None:
    a = await store.create_user("a", None, "user")
    b = await store.create_user("b", None, "user")
    session = await store.create_session(a.id, "first chat", "m")
    assert HEX_ID.match(session.id) and session.user_id == a.id and session.message_count == 0
    assert (session.title, session.model) == ("first chat", "m")
    assert await store.get_session(session.id, a.id) == session
    assert await store.get_session(session.id, b.id) is None  # another user's: like a missing one
    assert await store.get_session("0" * 32, a.id) is None
    chosen = await store.create_session(b.id, "t", "m", session_id="client-chosen.id:1")
    assert chosen.id == "client-chosen.id:1" and chosen.user_id == b.id
    with pytest.raises(SessionExistsError):
        await store.create_session(b.id, "again", "m", session_id="client-chosen.id:1")


async def test_session_ids_are_per_user(store: IdentityStore) -> None:
    """Another user's id is just a new session of this user: nothing tells that the id is taken."""
    a = await store.create_user("a", None, "user")
    b = await store.create_user("b", None, "user")
    mine = await store.create_session(b.id, "b's", "m", session_id="shared-name")
    theirs = await store.create_session(a.id, "a's", "m", session_id="shared-name")
    assert (theirs.id, theirs.user_id) == ("shared-name", a.id)
    await store.add_messages(b.id, "shared-name", [("user", "b's secret")])
    await store.add_messages(a.id, "shared-name", [("user", "a's words")])
    assert [m.content for m in await store.list_messages(a.id, "shared-name")] == ["a's words"]
    assert [m.content for m in await store.list_messages(b.id, "shared-name")] == ["b's secret"]
    assert await store.delete_session("shared-name", a.id)
    kept = await store.get_session("shared-name", b.id)
    assert kept is not None and kept.title == mine.title and kept.message_count == 1
    with pytest.raises(SessionNotFoundError):
        await store.add_messages(a.id, "shared-name", [("user", "gone")])


async def test_sessions_are_listed_newest_first_in_pages(store: IdentityStore) -> None:
    a = await store.create_user("a", None, "user")
    b = await store.create_user("b", None, "user")
    s1 = await store.create_session(a.id, "one", "m")
    s2 = await store.create_session(a.id, "two", "m")
    s3 = await store.create_session(a.id, "three", "m")
    await store.create_session(b.id, "b's", "m")
    page, total = await store.list_sessions(a.id, limit=10, offset=0)
    assert total == 3 and [s.id for s in page] == [s3.id, s2.id, s1.id]
    await store.add_messages(a.id, s1.id, [("user", "hi")])  # activity makes it the newest
    page, total = await store.list_sessions(a.id, limit=2, offset=0)
    assert total == 3 and [s.id for s in page] == [s1.id, s3.id]
    assert page[0].message_count == 1 and page[0].updated_at >= page[0].created_at
    page, total = await store.list_sessions(a.id, limit=2, offset=2)
    assert total == 3 and [s.id for s in page] == [s2.id]
    page, total = await store.list_sessions(a.id, limit=2, offset=5)
    assert (page, total) == ([], 3)
    with pytest.raises(ValueError, match="negative"):
        await store.list_sessions(a.id, limit=-1, offset=0)


async def test_deleting_a_session_is_owner_only_and_takes_its_messages(store: IdentityStore) -> None:
    a = await store.create_user("a", None, "user")
    b = await store.create_user("b", None, "user")
    session = await store.create_session(a.id, "t", "m")
    await store.add_messages(a.id, session.id, [("user", "q"), ("assistant", "r")])
    assert not await store.delete_session(session.id, b.id)
    assert len(await store.list_messages(a.id, session.id)) == 2
    assert await store.list_messages(b.id, session.id) == []
    assert await store.delete_session(session.id, a.id)
    assert await store.get_session(session.id, a.id) is None
    assert await store.list_messages(a.id, session.id) == []
    assert not await store.delete_session(session.id, a.id)


async def test_sessions_are_counted_in_total_and_per_user(store: IdentityStore) -> None:
    assert await store.count_sessions() == (0, {})
    a = await store.create_user("a", None, "user")
    b = await store.create_user("b", None, "user")
    await store.create_user("idle", None, "user")
    for _ in range(2):
        await store.create_session(a.id, "t", "m")
    await store.create_session(b.id, "t", "m")
    assert await store.count_sessions() == (3, {"a": 2, "b": 1})


async def test_messages_keep_their_order(store: IdentityStore) -> None:
    a = await store.create_user("a", None, "user")
    session = await store.create_session(a.id, "t", "m")
    other = await store.create_session(a.id, "t", "m")
    await store.add_messages(a.id, session.id, [("user", "1"), ("assistant", "2")])
    await store.add_messages(a.id, other.id, [("user", "elsewhere")])
    await store.add_messages(a.id, session.id, [("user", "3"), ("assistant", "4 ünïcødé \u2028 ok")])
    messages = await store.list_messages(a.id, session.id)
    assert [(m.role, m.content) for m in messages] == [
        ("user", "1"),
        ("assistant", "2"),
        ("user", "3"),
        ("assistant", "4 ünïcødé \u2028 ok"),
    ]
    assert all(isinstance(m.created_at, float) for m in messages)
    fetched = await store.get_session(session.id, a.id)
    assert fetched is not None and fetched.message_count == 4


async def test_messages_for_a_missing_session_are_refused(store: IdentityStore) -> None:
    a = await store.create_user("a", None, "user")
    with pytest.raises(SessionNotFoundError):
        await store.add_messages(a.id, "0" * 32, [("user", "lost")])
    assert await store.list_messages(a.id, "0" * 32) == []


async def test_concurrent_calls_are_all_served(store: IdentityStore) -> None:
    users = await asyncio.gather(*(store.create_user(f"u{i}", None, "user") for i in range(20)))
    sessions = await asyncio.gather(*(store.create_session(u.id, "t", "m") for u in users))
    await asyncio.gather(*(store.add_messages(s.user_id, s.id, [("user", s.id)]) for s in sessions))
    assert len(await store.list_users()) == 20
    assert (await store.count_sessions())[0] == 20
    for session in sessions:
        assert [m.content for m in await store.list_messages(session.user_id, session.id)] == [session.id]


async def test_a_restart_loses_nothing(open_store: StoreOpener) -> None:
    first = open_store()
    user = await first.create_user("keep", "scrypt$hash", "admin")
    gone = await first.create_user("gone", None, "user")
    await first.disable_user(gone.id)
    await first.touch_user(user.id, 42.0)
    key = await first.create_key(user.id, "f" * 64, "wxyz", ["admin", "inference"], ["m"], 9e9)
    revoked = await first.create_key(user.id, "9" * 64, "0000", ["inference"], None, None)
    await first.revoke_key(revoked.id)
    session = await first.create_session(user.id, "title", "m", session_id="kept-session")
    await first.add_messages(user.id, session.id, [("user", "q"), ("assistant", "a")])
    await first.revoke_token("jti-kept", user.id, time.time() + 600)
    version = await first.revoke_all_tokens(user.id)
    await first.close()

    second = open_store()
    try:
        restored = await second.get_user(user.id)
        assert restored is not None and restored.password_hash == "scrypt$hash" and restored.role == "admin"
        assert restored.last_login_at == 42.0
        still_gone = await second.get_user(gone.id)
        assert still_gone is not None and still_gone.disabled
        found = await second.get_key_by_hash("f" * 64)
        assert found is not None and found.id == key.id and found.models == ("m",) and found.expires_at == 9e9
        assert found.scopes == ("admin", "inference") and not found.revoked
        found_revoked = await second.get_key_by_hash("9" * 64)
        assert found_revoked is not None and found_revoked.revoked
        assert await second.get_session("kept-session", user.id) is not None
        assert restored.token_version == version == 1 and await second.token_revoked("jti-kept")
        assert [(m.role, m.content) for m in await second.list_messages(user.id, "kept-session")] == [
            ("user", "q"),
            ("assistant", "a"),
        ]
        assert await second.count_sessions() == (1, {"keep": 1})
    finally:
        await second.close()


async def test_a_closed_store_refuses_work(open_store: StoreOpener) -> None:
    opened = open_store()
    await opened.close()
    await opened.close()  # idempotent
    with pytest.raises(StoreClosedError):
        await opened.list_users()


async def test_a_limit_override_change_is_reported_like_an_identity_change(store: IdentityStore) -> None:
    # key lookups carry their limits: the caches holding them must hear of a change, like a revocation
    await store.open()
    listening = getattr(store, "listening", None)  # PostgreSQL reports once when its LISTEN connects
    if isinstance(listening, asyncio.Event):
        await asyncio.wait_for(listening.wait(), 10)
    reported: list[str] = []
    store.on_identity_change(lambda: reported.append("changed"))
    await store.get_limit_overrides(["key:k1"])
    assert reported == []  # a read is no change
    await store.set_limit_override("key:k1", LimitOverride(rpm=1))
    assert reported
    before = len(reported)
    await store.set_limit_override("key:k1", LimitOverride())  # cleared: a change too
    assert len(reported) > before


async def test_limit_overrides_are_stored_replaced_and_cleared(open_store: StoreOpener) -> None:
    store = open_store()
    try:
        assert await store.get_limit_overrides([]) == {}
        assert await store.get_limit_overrides(["key:k1", "user:u1"]) == {}
        await store.set_limit_override("key:k1", LimitOverride(rpm=20))
        await store.set_limit_override("user:u1", LimitOverride(tpm=1000, concurrency=UNLIMITED))
        await store.set_limit_override("user:u2", LimitOverride(rpm=1))
        found = await store.get_limit_overrides(["key:k1", "user:u1", "user:nobody", "key:k1"])
        assert found == {
            "key:k1": LimitOverride(rpm=20),
            "user:u1": LimitOverride(tpm=1000, concurrency=UNLIMITED),
        }
        await store.set_limit_override("key:k1", LimitOverride(rpm=0, concurrency=2))  # replaced whole
        assert (await store.get_limit_overrides(["key:k1"]))["key:k1"] == LimitOverride(rpm=0, concurrency=2)
        await store.set_limit_override("user:u1", LimitOverride())  # empty: back to the defaults
        await store.set_limit_override("user:gone", LimitOverride())  # clearing nothing is fine
        assert await store.get_limit_overrides(["user:u1", "user:gone"]) == {}
    finally:
        await store.close()
    reopened = open_store()  # they survive a restart
    try:
        assert await reopened.get_limit_overrides(["key:k1", "user:u2"]) == {
            "key:k1": LimitOverride(rpm=0, concurrency=2),
            "user:u2": LimitOverride(rpm=1),
        }
    finally:
        await reopened.close()


def _response(user_id: str, response_id: str, previous_id: str | None, at: float) -> StoredResponse:
    return StoredResponse(
        response_id,
        user_id,
        previous_id,
        "m",
        at,
        f'[{{"turn": "{response_id}"}}]',
        f'{{"id": "{response_id}"}}',
    )


async def test_responses_are_owner_scoped_and_chained(open_store: StoreOpener) -> None:
    store = open_store()
    try:
        alice = await store.create_user("alice", None, "user")
        bob = await store.create_user("bob", None, "user")
        first = _response(alice.id, "resp_1", None, 1.5)
        second = _response(alice.id, "resp_2", "resp_1", 2.5)
        third = _response(alice.id, "resp_3", "resp_2", 3.5)
        for response in (first, second, third):
            await store.save_response(response)
        await store.save_response(_response(bob.id, "resp_b", "resp_2", 4.0))  # bob names alice's id
        assert await store.get_response("resp_2", alice.id) == second
        assert await store.get_response("resp_2", bob.id) is None  # another user's: as if missing
        assert await store.response_chain("resp_3", alice.id) == [first, second, third]
        assert await store.response_chain("resp_1", alice.id) == [first]
        assert await store.response_chain("resp_3", bob.id) == []
        # bob's link to alice's id is not followed: chains never cross users
        assert [r.id for r in await store.response_chain("resp_b", bob.id)] == ["resp_b"]
        assert not await store.delete_response("resp_2", bob.id)
        assert await store.delete_response("resp_2", alice.id)
        assert not await store.delete_response("resp_2", alice.id)
        assert await store.get_response("resp_2", alice.id) is None
        assert await store.response_chain("resp_3", alice.id) == [third]  # the chain ends at a deleted one
    finally:
        await store.close()
    reopened = open_store()  # they survive a restart
    try:
        users = {u.username: u.id for u in await reopened.list_users()}
        found = await reopened.get_response("resp_1", users["alice"])
        assert found is not None and found.body == '{"id": "resp_1"}' and found.created_at == 1.5
    finally:
        await reopened.close()
