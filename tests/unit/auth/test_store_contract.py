"""One contract for every identity-store backend (a second backend passes by joining ``BACKENDS``)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from auth.store import IdentityStore, SQLiteStore, UserExistsError

BACKENDS: dict[str, Callable[[Path], IdentityStore]] = {"sqlite": SQLiteStore}


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(params=sorted(BACKENDS))
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], IdentityStore]:
    return lambda: BACKENDS[request.param](tmp_path)


def test_users(make_store: Callable[[], IdentityStore]) -> None:
    async def main() -> None:
        store = make_store()
        alice = await store.create_user("alice", "hash-a", "user")
        await store.create_user("root", "hash-r", "admin")
        with pytest.raises(UserExistsError):
            await store.create_user("alice", "x", "user")
        assert (await store.get_user(alice.id)) == alice
        assert (await store.get_user_by_name("alice")) == alice
        assert await store.get_user("missing") is None
        assert [u.username for u in await store.list_users()] == ["alice", "root"]
        disabled = await store.disable_user(alice.id)
        assert disabled is not None and disabled.disabled
        again = await store.disable_user(alice.id)
        assert again is not None and again.disabled_at == disabled.disabled_at
        assert await store.disable_user("missing") is None
        await store.set_password_hash(alice.id, "hash-b")
        fetched = await store.get_user(alice.id)
        assert fetched is not None and fetched.password_hash == "hash-b"
        await store.close()

    run(main())


def test_keys(make_store: Callable[[], IdentityStore]) -> None:
    async def main() -> None:
        store = make_store()
        user = await store.create_user("bob", None, "user")
        key = await store.create_key(user.id, "digest-1", "abcd", ["inference"], ["m1"], 123.0)
        other = await store.create_key(user.id, "digest-2", "wxyz", ["inference", "admin"], None, None)
        found = await store.get_key_by_hash("digest-1")
        assert found == key and found.models == ("m1",) and found.expires_at == 123.0
        assert await store.get_key_by_hash("nope") is None
        assert [k.id for k in await store.list_keys()] == [key.id, other.id]
        assert [k.id for k in await store.list_keys(user.id)] == [key.id, other.id]
        assert await store.list_keys("someone-else") == []
        assert await store.revoke_key(key.id)
        revoked = await store.get_key_by_hash("digest-1")
        assert revoked is not None and revoked.revoked_at is not None
        assert not await store.revoke_key("missing")
        await store.close()

    run(main())


def test_sessions_and_messages(make_store: Callable[[], IdentityStore]) -> None:
    async def main() -> None:
        store = make_store()
        a = await store.create_user("a", None, "user")
        b = await store.create_user("b", None, "user")
        first = await store.create_session(a.id, "first", "m")
        second = await store.create_session(a.id, "second", "m", session_id="chosen-id")
        await store.create_session(b.id, "b's", "m")
        await store.add_messages(first.id, [("user", "hi"), ("assistant", "hello")])
        assert [(m.role, m.content) for m in await store.list_messages(first.id)] == [
            ("user", "hi"),
            ("assistant", "hello"),
        ]
        page, total = await store.list_sessions(a.id, limit=1, offset=0)
        assert total == 2 and [s.id for s in page] == [first.id]  # updated most recently
        page, _ = await store.list_sessions(a.id, limit=1, offset=1)
        assert [s.id for s in page] == [second.id]
        assert (await store.get_session(first.id, a.id)) is not None
        assert (await store.get_session(first.id, a.id)).message_count == 2  # type: ignore[union-attr]
        assert await store.get_session(first.id, b.id) is None  # another user's: like a missing one
        assert await store.session_owner("chosen-id") == a.id
        assert await store.count_sessions() == (3, {"a": 2, "b": 1})
        assert not await store.delete_session(first.id, b.id)
        assert await store.delete_session(first.id, a.id)
        assert await store.list_messages(first.id) == []
        assert await store.get_session(first.id, a.id) is None
        await store.close()

    run(main())


def test_restart_loses_nothing(make_store: Callable[[], IdentityStore]) -> None:
    async def write() -> tuple[str, str, str]:
        store = make_store()
        user = await store.create_user("keep", "h", "admin")
        key = await store.create_key(user.id, "d", "1234", ["admin"], None, None)
        session = await store.create_session(user.id, "t", "m")
        await store.add_messages(session.id, [("user", "q"), ("assistant", "a")])
        await store.close()
        return user.id, key.id, session.id

    async def read(ids: tuple[str, str, str]) -> None:
        store = make_store()
        user_id, key_id, session_id = ids
        assert (await store.get_user(user_id)) is not None
        assert [k.id for k in await store.list_keys(user_id)] == [key_id]
        assert len(await store.list_messages(session_id)) == 2
        await store.close()

    run(read(run(write())))


def test_sqlite_schema_is_versioned_and_in_wal_mode(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    run(store.close())
    conn = sqlite3.connect(tmp_path / "pocketllm.sqlite3")
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store.schema_version
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
