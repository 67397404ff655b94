"""Round trips to the identity store per HTTP request (issue 18), counted on the served app's real store,
SQLite and PostgreSQL.

An API key's request costs at most one (the key, its owner and both their limit overrides in one query)
and none while the key's lookup is cached, on ``/v1/chat/completions`` and on ``/chat`` (whose session
writes are its own work, listed apart); one of our JWTs costs one on every request. A limit changed
through this replica applies to a cached key at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from auth.sql_store import SqlStore
from tests.api.cache_support import admin, chat, chat_body, new_key, new_user
from tests.conftest import ServedApp, login, make_settings
from tests.postgres_support import temporary_database, unreachable_reason

KEY_CACHE_TTL_S = 600.0
"""Long enough that "warm" never depends on how fast the machine answers."""

KINDS = {
    "FROM api_keys k JOIN users u": "key lookup",
    "FROM limit_overrides WHERE subject IN": "limit overrides",
    "FROM revoked_tokens r WHERE r.jti": "token owner",
    "FROM revoked_tokens WHERE jti": "token revoked",
    "FROM users WHERE id = ?": "user",
    "INSERT INTO chat_sessions": "create session",
    "UPDATE chat_sessions SET updated_at": "add messages",
}
"""What a statement is, by a piece of its SQL (a statement not listed stands for itself)."""


class RoundTrips:
    """Counts the round trips of a real store: ``SqlStore`` reaches its database only through its four
    primitives, one round trip each (a guarded write is one transaction); each is wrapped to record its
    statement and then run it unchanged."""

    PRIMITIVES = ("_fetch_one", "_fetch_all", "_execute", "_execute_if_changed")

    def __init__(self, store: SqlStore) -> None:
        self._statements: list[str] = []
        for name in self.PRIMITIVES:
            setattr(store, name, self._counted(getattr(store, name)))

    def _counted(self, primitive: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def counted(sql: str, *args: Any, **kwargs: Any) -> Any:
            self._statements.append(sql)
            return await primitive(sql, *args, **kwargs)

        return counted

    def take(self) -> list[str]:
        """The kinds of the round trips made since the last call, in order."""
        taken = self._statements[:]
        del self._statements[: len(taken)]
        return [next((kind for part, kind in KINDS.items() if part in sql), sql) for sql in taken]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def counted_app(request: pytest.FixtureRequest, model_path: Path) -> Iterator[tuple[ServedApp, RoundTrips]]:
    del model_path
    with _store_url(request.param) as url:
        store = {"url": url} if url is not None else {}
        settings = make_settings(auth={"key_cache_ttl_s": KEY_CACHE_TTL_S}, store=store)
        app = ServedApp(settings)
        trips = RoundTrips(app.app.state.authenticator.store)  # the one store every route reaches
        app.start()
        try:
            yield app, trips
        finally:
            app.stop()


def _store_url(backend: str) -> contextlib.AbstractContextManager[str | None]:
    """No URL for SQLite (under the data directory); a throw-away database on the shared PostgreSQL."""
    if backend == "sqlite":
        return contextlib.nullcontext()
    reason = unreachable_reason()
    if reason is not None:
        pytest.skip(reason)
    return temporary_database()


def _pocket_chat(app: ServedApp, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{app.base_url}/chat", json={"prompt": "Hi", "max_tokens": 2}, headers=headers, timeout=120
    )


def test_an_api_key_request_costs_one_round_trip_cold_and_none_warm(
    counted_app: tuple[ServedApp, RoundTrips],
) -> None:
    app, trips = counted_app
    user = new_user(app)  # a new user and key: nothing of theirs is cached
    _, headers = new_key(app, user["username"])
    trips.take()
    first = chat(app, headers, chat_body("Hi"))
    assert first.status_code == 200, first.text
    assert trips.take() == ["key lookup"]  # authentication and admission (its limits came with the key)
    for _ in range(2):
        again = chat(app, headers, chat_body("Hello"))
        assert again.status_code == 200, again.text
        assert trips.take() == []


def test_a_pocket_chat_turn_adds_one_round_trip_cold_and_none_warm(
    counted_app: tuple[ServedApp, RoundTrips],
) -> None:
    app, trips = counted_app
    user = new_user(app)
    _, headers = new_key(app, user["username"])
    trips.take()
    first = _pocket_chat(app, headers)
    assert first.status_code == 200, first.text
    # a turn without a session id starts one and writes both turns to it: its own two round trips
    assert trips.take() == ["key lookup", "create session", "add messages"]
    again = _pocket_chat(app, headers)
    assert again.status_code == 200, again.text
    assert trips.take() == ["create session", "add messages"]


def test_a_jwt_request_costs_one_round_trip_every_time(counted_app: tuple[ServedApp, RoundTrips]) -> None:
    app, trips = counted_app
    user = new_user(app)
    token = login(app.base_url, user["username"], "password-" + user["username"])
    headers = {"Authorization": f"Bearer {token}"}
    trips.take()
    for _ in range(2):  # never cached: a logout or a disabled user is seen by the next request
        response = chat(app, headers, chat_body("Hi"))
        assert response.status_code == 200, response.text
        assert trips.take() == ["token owner"]  # the user, the token's revocation and the user's limits


def test_a_limit_set_through_this_replica_applies_to_a_cached_key_at_once(
    counted_app: tuple[ServedApp, RoundTrips],
) -> None:
    app, trips = counted_app
    user = new_user(app)
    key_id, headers = new_key(app, user["username"])
    assert chat(app, headers, chat_body("Hi")).status_code == 200
    assert chat(app, headers, chat_body("Hi")).status_code == 200  # the lookup is cached
    put = httpx.put(
        f"{app.base_url}/admin/keys/{key_id}/limits", json={"rpm": 1}, headers=admin(app), timeout=30
    )
    assert put.status_code == 200, put.text
    time.sleep(0.5)  # PostgreSQL: the change's NOTIFY also comes back to this replica (and drops it again)
    trips.take()
    admitted = chat(app, headers, chat_body("Hi"))
    assert admitted.status_code == 200, admitted.text
    assert admitted.headers["x-ratelimit-limit-requests"] == "1"  # the new limit, not the cached lookup's
    assert trips.take() == ["key lookup"]  # the change dropped the cached lookup: read again, once
    refused = chat(app, headers, chat_body("Hi"))
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "requests", refused.text
    assert trips.take() == []
