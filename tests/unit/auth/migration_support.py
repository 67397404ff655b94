"""A database at schema version 3 (before sessions were namespaced per user) and what migration 4 must
keep of it; used by the SQLite and PostgreSQL backend tests alike."""

from __future__ import annotations

from auth.migrations import MIGRATIONS, Dialect, statements
from auth.store import IdentityStore

V3_STATEMENTS = sum(len(migration) for migration in MIGRATIONS[:3])

V3_ROWS = (
    "INSERT INTO users (id, username, password_hash, role, created_at) VALUES ('u1', 'ann', 'h', 'user', 1.0)",
    "INSERT INTO users (id, username, password_hash, role, created_at) VALUES ('u2', 'ben', 'h', 'user', 1.0)",
    "INSERT INTO sessions (id, user_id, title, model, created_at, updated_at) "
    "VALUES ('chosen-by-ann', 'u1', 'ann chat', 'm', 2.0, 3.0)",
    "INSERT INTO sessions (id, user_id, title, model, created_at, updated_at) "
    "VALUES ('ben-session', 'u2', 'ben chat', 'm', 2.0, 4.0)",
    "INSERT INTO messages (session_id, role, content, created_at) VALUES ('chosen-by-ann', 'user', 'a1', 2.0)",
    "INSERT INTO messages (session_id, role, content, created_at) VALUES ('ben-session', 'user', 'b1', 2.0)",
    "INSERT INTO messages (session_id, role, content, created_at) "
    "VALUES ('chosen-by-ann', 'assistant', 'a2', 2.0)",
)


def version_3_schema(dialect: Dialect) -> list[str]:
    """The statements that make a version-3 database with ``V3_ROWS`` in it."""
    return [*statements(dialect)[:V3_STATEMENTS], *V3_ROWS]


async def check_version_3_rows_kept(store: IdentityStore) -> None:
    """Every session and message of ``V3_ROWS`` is its owner's, in order; ids are now per user."""
    ann = await store.get_session("chosen-by-ann", "u1")
    assert ann is not None and (ann.title, ann.updated_at, ann.message_count) == ("ann chat", 3.0, 2)
    assert [m.content for m in await store.list_messages("u1", "chosen-by-ann")] == ["a1", "a2"]
    assert [m.content for m in await store.list_messages("u2", "ben-session")] == ["b1"]
    assert await store.get_session("chosen-by-ann", "u2") is None
    await store.create_session("u2", "ben's own", "m", session_id="chosen-by-ann")  # no longer taken
    await store.add_messages("u1", "chosen-by-ann", [("user", "a3")])
    assert [m.content for m in await store.list_messages("u1", "chosen-by-ann")] == ["a1", "a2", "a3"]
    user = await store.get_user("u1")
    assert user is not None and user.token_version == 0
