"""What only the PostgreSQL backend promises: versioned migrations under a lock, and outages that give a
typed error and heal by themselves (a private server that the test stops and starts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from auth.errors import AuthenticationError, StoreUnavailableError
from auth.migrations import MIGRATIONS, SCHEMA_VERSION, statements
from auth.postgres_store import PostgresStore, describe
from auth.sqlite_store import SQLiteStore
from auth.stores import open_store
from tests.postgres_support import LocalPostgres, create_schema, free_port, postgres_bin
from tests.unit.auth.migration_support import check_version_3_rows_kept, version_3_schema

pytestmark = pytest.mark.anyio

_count = 0


@pytest.fixture
def schema_url(postgres_database: str) -> str:
    """An empty schema of the run's database."""
    global _count  # noqa: PLW0603
    _count += 1
    return create_schema(postgres_database, f"postgres_only_{_count}")


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall()
    return {row[0] for row in rows}


async def test_a_version_3_database_gets_sessions_per_user_keeping_every_message(schema_url: str) -> None:
    with psycopg.connect(schema_url, autocommit=True) as conn:
        for statement in version_3_schema("postgresql"):
            conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version (version) VALUES (3)")
    store = PostgresStore(schema_url)
    await store.open()
    try:
        assert store.migrated_from == 3
        await check_version_3_rows_kept(store)
    finally:
        await store.close()


async def test_the_schema_is_versioned_and_migrated_once(schema_url: str) -> None:
    store = PostgresStore(schema_url)
    await store.open()
    await store.open()  # idempotent
    assert store.migrated_from == 0 and store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    await store.close()
    assert _tables(schema_url) == {
        "users",
        "api_keys",
        "chat_sessions",
        "chat_messages",
        "revoked_tokens",
        "limit_overrides",
        "responses",
        "schema_version",
    }
    with psycopg.connect(schema_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    again = PostgresStore(schema_url)
    await again.open()
    assert again.migrated_from == SCHEMA_VERSION  # nothing to do the second time
    await again.close()


async def test_replicas_starting_together_migrate_once(schema_url: str) -> None:
    stores = [PostgresStore(schema_url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        assert sorted(s.migrated_from or 0 for s in stores) == [
            0,
            SCHEMA_VERSION,
            SCHEMA_VERSION,
            SCHEMA_VERSION,
        ]
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_version_1_database_is_migrated_keeping_its_rows(schema_url: str) -> None:
    with psycopg.connect(schema_url, autocommit=True) as conn:
        for statement in statements("postgresql")[: len(MIGRATIONS[0])]:
            conn.execute(statement)  # type: ignore[arg-type]
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute(
            "INSERT INTO users (id, username, password_hash, role, created_at) VALUES ('u1', 'old', 'h', 'user', 1.5)"
        )
    store = PostgresStore(schema_url)
    try:
        await store.open()
        assert store.migrated_from == 1
        user = await store.get_user_by_name("old")
        assert user is not None and user.id == "u1" and user.created_at == 1.5 and user.last_login_at is None
        await store.touch_user("u1", 5.25)
        touched = await store.get_user("u1")
        assert touched is not None and touched.last_login_at == 5.25
    finally:
        await store.close()


async def test_a_newer_schema_is_refused(schema_url: str) -> None:
    with psycopg.connect(schema_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION + 1,))
    store = PostgresStore(schema_url)
    with pytest.raises(RuntimeError, match="newer"):
        await store.open()
    await store.close()


async def test_a_failed_migration_changes_nothing(schema_url: str) -> None:
    with psycopg.connect(schema_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE sessions (id TEXT)")  # makes migration 1 fail half-way
    store = PostgresStore(schema_url)
    with pytest.raises(psycopg.errors.DuplicateTable):
        await store.open()
    await store.close()
    assert _tables(schema_url) == {"sessions"}  # not even schema_version: DDL is transactional


async def test_timestamps_keep_full_precision(schema_url: str) -> None:
    store = PostgresStore(schema_url, clock=lambda: 1_765_432_109.123456)
    try:
        user = await store.create_user("a", None, "user")
        fetched = await store.get_user(user.id)
        assert fetched is not None and fetched.created_at == 1_765_432_109.123456
    finally:
        await store.close()


async def test_an_unreachable_server_is_a_typed_error_without_the_password() -> None:
    port = free_port()
    url = f"postgresql://someone:hunter2@127.0.0.1:{port}/nowhere"
    store = PostgresStore(url, connect_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        await store.list_users()
    assert time.monotonic() - started < 10
    assert "hunter2" not in str(caught.value) and "someone" not in str(caught.value)
    assert f"127.0.0.1:{port}/nowhere" in str(caught.value)
    await store.close()


def test_urls_are_described_without_credentials() -> None:
    assert describe("postgresql://u:secret@db.example:6543/identity") == "db.example:6543/identity"


async def test_open_store_picks_the_backend(tmp_path: Path, postgres_database: str) -> None:
    embedded = open_store(tmp_path)
    assert isinstance(embedded, SQLiteStore) and embedded.path.parent == tmp_path
    await embedded.open()
    await embedded.close()
    for scheme in ("postgresql", "postgres"):
        shared = open_store(postgres_database.replace("postgresql", scheme, 1))
        assert isinstance(shared, PostgresStore)
        await shared.open()
        assert await shared.list_users() == []
        await shared.close()


@pytest.fixture(scope="module")
def local_server() -> Iterator[LocalPostgres]:
    """A private server (stopped and started by the outage test)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("the PostgreSQL server binaries are not installed (apt-get install postgresql)")
    server = LocalPostgres(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
async def outage_store(local_server: LocalPostgres) -> AsyncIterator[PostgresStore]:
    """A store on the private server, with short waits so that an outage shows quickly."""
    store = PostgresStore(local_server.url, max_size=4, acquire_timeout_s=1.0, connect_timeout_s=1.0)
    await store.open()
    yield store
    await store.close()


async def _recovers(store: PostgresStore, deadline_s: float) -> float:
    started = time.monotonic()
    while True:
        try:
            await store.list_users()
            return time.monotonic() - started
        except StoreUnavailableError:
            if time.monotonic() - started > deadline_s:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_a_server_outage_is_a_typed_error_and_heals(
    outage_store: PostgresStore, local_server: LocalPostgres, mode: str
) -> None:
    alice = await outage_store.create_user(f"alice-{mode}", None, "user")
    # several pooled connections, so that more than one is stale after the restart
    await asyncio.gather(*(outage_store.get_user(alice.id) for _ in range(8)))
    local_server.stop(mode)
    for call in (
        lambda: outage_store.get_user(alice.id),
        lambda: outage_store.create_user("bob", None, "user"),
        lambda: outage_store.add_messages("0" * 32, "0" * 32, [("user", "lost")]),
    ):
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="unavailable"):
            await call()
        assert time.monotonic() - started < 5  # bounded by acquire_timeout_s, never a hang
    for _ in range(50):  # the notification listener has noticed too
        if not outage_store.listening.is_set():
            break
        await asyncio.sleep(0.1)
    assert not outage_store.listening.is_set()
    local_server.start()
    assert await _recovers(outage_store, deadline_s=30) < 30
    await asyncio.wait_for(outage_store.listening.wait(), 10)  # and listens again
    # after the restart every stale pooled connection has gone: reads and writes all succeed at once
    users = await asyncio.gather(*(outage_store.get_user(alice.id) for _ in range(8)))
    assert all(u == alice for u in users)
    assert (await outage_store.create_user(f"carol-{mode}", None, "user")).username == f"carol-{mode}"


@pytest.mark.slow
async def test_a_restart_between_requests_fails_no_read(
    outage_store: PostgresStore, local_server: LocalPostgres
) -> None:
    alice = await outage_store.create_user("alice-restart", None, "user")
    await asyncio.gather(*(outage_store.get_user(alice.id) for _ in range(8)))  # fill the pool
    local_server.stop("fast")
    local_server.start()
    # every pooled connection is dead now; a read that meets one is tried again on another
    users = await asyncio.gather(*(outage_store.get_user(alice.id) for _ in range(8)))
    assert all(u == alice for u in users)
    await asyncio.sleep(0.5)  # the background check has replaced the dead connections by now
    created = await asyncio.gather(*(outage_store.create_user(f"w{i}", None, "user") for i in range(4)))
    assert len({u.id for u in created}) == 4


async def test_a_revocation_on_one_replica_reaches_the_others_at_once(schema_url: str) -> None:
    from auth.authenticate import Authenticator  # noqa: PLC0415
    from tests.unit.auth.conftest import FAST  # noqa: PLC0415
    from tests.unit.auth.test_authenticate import TOKENS  # noqa: PLC0415

    stores = [PostgresStore(schema_url) for _ in range(3)]
    try:
        # a TTL far beyond the test: only the notification can make the other replicas refuse
        replicas = [Authenticator(s, TOKENS, FAST, key_cache_ttl_s=3600) for s in stores]
        alice = await replicas[0].create_user("alice", "pw", "user")
        bob = await replicas[0].create_user("bob", "pw", "user")
        alices, bobs = await replicas[0].create_key(alice), await replicas[0].create_key(bob)
        for replica in replicas:
            await replica.store.open()
            await asyncio.wait_for(replica.store.listening.wait(), 10)  # type: ignore[attr-defined]
            for key in (alices.key, bobs.key):
                await replica.authenticate(None, key)  # cached now
        assert all(len(r.key_cache) == 2 for r in replicas)
        await replicas[1].store.revoke_key(alices.record.id)
        await replicas[2].store.disable_user(bob.id)
        started = time.monotonic()
        for replica in replicas:
            for key in (alices.key, bobs.key):
                while True:
                    try:
                        await replica.authenticate(None, key)
                    except AuthenticationError:
                        break
                    assert time.monotonic() - started < 1.0, "the change did not arrive within 1 s"
                    await asyncio.sleep(0.005)
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_limit_override_set_on_one_replica_reaches_the_others_at_once(schema_url: str) -> None:
    from auth.authenticate import Authenticator  # noqa: PLC0415
    from auth.limits import CredentialLimits, LimitOverride  # noqa: PLC0415
    from tests.unit.auth.conftest import FAST  # noqa: PLC0415
    from tests.unit.auth.test_authenticate import TOKENS  # noqa: PLC0415

    stores = [PostgresStore(schema_url) for _ in range(3)]
    try:
        # a key's lookup carries its limits: with a TTL far beyond the test, only the notification can
        # bring the new ones to the replicas that hold the key in their cache
        replicas = [Authenticator(s, TOKENS, FAST, key_cache_ttl_s=3600) for s in stores]
        alice = await replicas[0].create_user("alice", "pw", "user")
        issued = await replicas[0].create_key(alice)
        for replica in replicas:
            await replica.store.open()
            await asyncio.wait_for(replica.store.listening.wait(), 10)  # type: ignore[attr-defined]
            assert (await replica.authenticate(None, issued.key)).limits == CredentialLimits()  # cached now
        await replicas[1].store.set_limit_override(f"key:{issued.record.id}", LimitOverride(rpm=3))
        await replicas[1].store.set_limit_override(f"user:{alice.id}", LimitOverride(tpm=30))
        changed = CredentialLimits(LimitOverride(rpm=3), LimitOverride(tpm=30))
        started = time.monotonic()
        for replica in replicas:
            while (await replica.authenticate(None, issued.key)).limits != changed:
                assert time.monotonic() - started < 1.0, "the change did not arrive within 1 s"
                await asyncio.sleep(0.005)
    finally:
        await asyncio.gather(*(s.close() for s in stores))
