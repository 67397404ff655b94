"""Two gateway apps on one shared Redis, each with its own local layer in front of the response cache
(``cache.local_ttl_s``): a repeated hit reaches no Redis (seen by Redis's ``MONITOR``), a flush empties
the flushing app's copies at once and the other app's within ``local_ttl_s``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.cache_support import admin, chat, chat_body, drop_prefix, unique_prefix
from tests.conftest import ServedApp, make_settings, serve
from tests.unit.gateway.conftest import RedisMonitor

LOCAL_TTL_S = 1.0


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    value = unique_prefix()
    yield value
    drop_prefix(value)


@pytest.fixture(scope="module")
def replicas(model_path: Path, prefix: str) -> Iterator[tuple[ServedApp, ServedApp]]:
    """Two apps sharing the key prefix; one scope for every user, since each app has its own identity
    store (the same user would have another id in each)."""
    del model_path
    settings = [
        make_settings(
            redis={"host": "127.0.0.1", "key_prefix": prefix, "timeout_s": 2.0},
            cache={"shared_scope": True, "local_ttl_s": LOCAL_TTL_S},
            model={"slots": 1},
        )
        for _ in range(2)
    ]
    with contextlib.ExitStack() as stack:
        first, second = (stack.enter_context(serve(s)) for s in settings)
        yield first, second


def stats(app: ServedApp) -> dict[str, object]:
    response = httpx.get(f"{app.base_url}/admin/cache/stats", headers=admin(app), timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def hits_by_tier(app: ServedApp) -> dict[str, float]:
    """``pocketllm_cache_requests_total{outcome="hit"}`` of ``/metrics`` by its ``tier`` label."""
    text = httpx.get(f"{app.base_url}/metrics", timeout=30).text
    return {
        sample.labels["tier"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "pocketllm_cache_requests_total" and sample.labels.get("outcome") == "hit"
    }


def test_a_repeated_hit_reaches_no_redis(replicas: tuple[ServedApp, ServedApp], prefix: str) -> None:
    first, second = replicas
    before = hits_by_tier(second)
    body = chat_body(f"Say hi to {time.monotonic_ns()}.")
    answer = chat(first, first.headers, body)
    assert answer.headers["x-cache"] == "miss"
    cache_keys = f"{prefix}cache:"
    monitor = RedisMonitor(cache_keys)
    try:
        monitor.commands()
        from_redis = chat(second, second.headers, body)  # not in the second app's memory yet
        assert from_redis.headers["x-cache"] == "hit"
        assert [c[0] for c in monitor.commands(lua=True)] == ["evalsha", "get", "pttl"]
        for app in (second, second, first):  # each app answers from its own copy now
            again = chat(app, app.headers, body)
            assert again.headers["x-cache"] == "hit"
            assert again.json()["choices"] == answer.json()["choices"]
        assert monitor.commands(lua=True) == []  # no cache key was touched in Redis
    finally:
        monitor.close()
    local = stats(second)["local"]
    assert isinstance(local, dict) and local["ttl_s"] == LOCAL_TTL_S and local["hits"] >= 2
    after = hits_by_tier(second)  # the hit counter says where each hit came from
    assert after.get("redis", 0) - before.get("redis", 0) == 1
    assert after.get("local", 0) - before.get("local", 0) == 2


def test_a_flush_is_seen_at_once_here_and_within_local_ttl_on_the_other(
    replicas: tuple[ServedApp, ServedApp],
) -> None:
    first, second = replicas
    body = chat_body(f"Say bye to {time.monotonic_ns()}.")
    assert chat(first, first.headers, body).headers["x-cache"] == "miss"  # stored, kept by the first
    assert chat(second, second.headers, body).headers["x-cache"] == "hit"  # read from Redis, kept
    copied_at = time.monotonic()

    flushed = httpx.post(f"{first.base_url}/admin/cache/flush", headers=admin(first), timeout=30)
    assert flushed.status_code == 200 and flushed.json()["flushed"] >= 1
    # no-store: look up without storing the answer again, so that Redis stays empty
    look = {"Cache-Control": "no-store"}
    assert chat(first, first.headers, body, **look).headers["x-cache"] == "miss"  # its copy went at once

    # the second app answers the flushed entry from its copy until the copy's local_ttl_s is over (the
    # copy was made before `copied_at`), then asks Redis, which no longer has it
    outcomes: list[tuple[float, str]] = []  # (sent, seconds after copied_at; x-cache)
    while not outcomes or (outcomes[-1][1] == "hit" and outcomes[-1][0] < 3 * LOCAL_TTL_S):
        sent = time.monotonic() - copied_at
        outcomes.append((sent, chat(second, second.headers, body, **look).headers["x-cache"]))
    assert outcomes[-1][1] == "miss", outcomes
    assert all(sent <= LOCAL_TTL_S for sent, state in outcomes if state == "hit"), outcomes


def test_local_ttl_zero_reads_redis_every_time(model_path: Path) -> None:
    del model_path
    prefix = unique_prefix()
    settings = make_settings(
        redis={"host": "127.0.0.1", "key_prefix": prefix, "timeout_s": 2.0},
        cache={"local_ttl_s": 0},
        model={"slots": 1},
    )
    monitor = RedisMonitor(f"{prefix}cache:e:")
    try:
        with serve(settings) as app:
            body = chat_body(f"Count to {time.monotonic_ns()}.")
            assert chat(app, app.headers, body).headers["x-cache"] == "miss"
            monitor.commands()
            assert [chat(app, app.headers, body).headers["x-cache"] for _ in range(3)] == ["hit"] * 3
            assert [c[0] for c in monitor.commands()] == ["get"] * 3
            assert stats(app)["local"] is None
    finally:
        monitor.close()
        drop_prefix(prefix)
