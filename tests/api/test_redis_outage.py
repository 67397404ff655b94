"""Redis stopped mid-run (a redis-server of the test's own, on a spare port): no 5xx, the cache is
bypassed, the limiter falls back to the in-process one; both recover when Redis is back."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx

from tests.api.cache_support import admin, chat, chat_body, new_key
from tests.conftest import make_settings, serve
from tests.unit.gateway.conftest import RedisServer


def test_redis_stopped_and_started_again(model_path: Path) -> None:
    del model_path
    redis = RedisServer()
    redis.start()
    try:
        settings = make_settings(
            redis={"host": "127.0.0.1", "port": redis.port, "timeout_s": 0.5, "retry_after_s": 0.3},
            # the Redis path itself: no local copies answer in front of it (tests/unit/gateway/cache/
            # test_local_layer.py has them during an outage)
            cache={"local_ttl_s": 0},
        )
        with serve(settings) as app:
            _, headers = new_key(app, "user1", rpm=5)
            body = chat_body(f"Greet {uuid.uuid4().hex[:8]}.", max_tokens=4)
            assert [chat(app, headers, body).headers["x-cache"] for _ in range(2)] == ["miss", "hit"]

            redis.stop()
            during = [chat(app, headers, body) for _ in range(6)]
            assert all(r.status_code < 500 for r in during), [r.text for r in during]
            # the in-process fallback enforces the key's 5 RPM on its own (Redis saw 2 of them)
            assert [r.status_code for r in during] == [200] * 5 + [429]
            assert {r.headers["x-cache"] for r in during[:5]} == {"bypass"}
            assert during[5].json()["error"]["code"] == "rate_limit_exceeded"
            assert len({r.json()["choices"][0]["message"]["content"] for r in during[:5]}) == 1
            stats = httpx.get(f"{app.base_url}/admin/cache/stats", headers=admin(app), timeout=30)
            assert stats.status_code == 200 and stats.json()["available"] is False
            flush = httpx.post(f"{app.base_url}/admin/cache/flush", headers=admin(app), timeout=30)
            assert flush.status_code == 503 and flush.json()["error"]["code"] == "cache_unavailable"

            redis.start()  # the same port, empty (no persistence)
            deadline = time.monotonic() + 20
            while True:
                response = chat(app, headers, body)
                assert response.status_code in (200, 429), response.text
                if response.status_code == 200 and response.headers["x-cache"] != "bypass":
                    break
                assert time.monotonic() < deadline, "never recovered"
                time.sleep(0.1)
            # Redis came back empty: a miss, or a hit of an answer stored by a request that was
            # still bypassing at lookup but found Redis back when storing
            assert response.headers["x-cache"] in ("miss", "hit")
            assert chat(app, headers, body).headers["x-cache"] == "hit"
            assert (
                httpx.get(f"{app.base_url}/admin/cache/stats", headers=admin(app), timeout=30).json()[
                    "entries"
                ]
                == 1
            )
    finally:
        redis.stop()
