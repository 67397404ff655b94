"""``/admin/metrics``, ``/admin/model/info`` and model load/unload, under load, with two models."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.registry import load_registry
from gateway.settings import settings_from_mapping
from tests.conftest import NO_EOS, ServedApp, serve

PLAIN_TEMPLATE = "{{ messages[-1]['content'] }}"


@pytest.fixture(scope="module")
def two_models(model_path: Path) -> Iterator[ServedApp]:
    settings = settings_from_mapping(
        {
            "data_dir": tempfile.mkdtemp(prefix="pocketllm-test-"),
            "queue": {"ping_interval_s": 0.5},
            "models": [
                {"id": "chat-a", "path": str(model_path), "n_ctx": 2048, "slots": 1, "n_threads": 2},
                {
                    "id": "plain-b",
                    "path": str(model_path),
                    "n_ctx": 1024,
                    "slots": 2,
                    "n_threads": 1,
                    "aliases": ["b-alias"],
                    "chat_template": PLAIN_TEMPLATE,
                    "embeddings": False,
                },
            ],
        }
    )
    with serve(settings) as app:
        yield app


def _admin(app: ServedApp) -> httpx.Client:
    return httpx.Client(
        base_url=app.base_url, headers={"Authorization": f"Bearer {app.admin_token}"}, timeout=120
    )


class Stream:
    """A streaming chat completion read on its own thread; ``started`` once its first token arrived."""

    def __init__(self, app: ServedApp, model: str, max_tokens: int) -> None:
        self.body = {
            "model": model,
            "messages": [{"role": "user", "content": "Write a long story"}],
            "max_tokens": max_tokens,
            "logit_bias": NO_EOS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.app = app
        self.started = threading.Event()
        self.frames: list[dict[str, Any]] = []
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with (
            httpx.Client(base_url=self.app.base_url, headers=self.app.headers, timeout=300) as http,
            http.stream("POST", "/v1/chat/completions", json=self.body) as response,
        ):
            assert response.status_code == 200
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    frame = json.loads(line.removeprefix("data: "))
                    self.frames.append(frame)
                    if any(c["delta"].get("content") for c in frame.get("choices", [])):
                        self.started.set()

    def result(self) -> dict[str, Any]:
        self.thread.join(timeout=300)
        assert self.done, self.frames[-1:]
        assert "error" not in self.frames[-1]
        usage: dict[str, Any] = self.frames[-1]["usage"]
        return usage


def _wait_for(condition: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_non_admins_get_403_and_anonymous_401(two_models: ServedApp) -> None:
    routes = [
        ("GET", "/admin/metrics"),
        ("GET", "/admin/model/info"),
        ("POST", "/admin/models/plain-b/load"),
        ("POST", "/admin/models/plain-b/unload"),
    ]
    with httpx.Client(base_url=two_models.base_url, headers=two_models.headers, timeout=30) as user:
        for method, path in routes:
            response = user.request(method, path)
            assert response.status_code == 403, (path, response.text)
            assert response.json()["error"]["code"] == "permission_denied"
    for method, path in routes:
        assert httpx.request(method, f"{two_models.base_url}{path}", timeout=30).status_code == 401
    assert two_models.health()["models"]["plain-b"]["state"] == "ready"  # nothing was unloaded


def test_model_info_describes_every_model(two_models: ServedApp, model_path: Path) -> None:
    with _admin(two_models) as admin:
        response = admin.get("/admin/model/info")
    assert response.status_code == 200
    models = {m["id"]: m for m in response.json()["models"]}
    assert list(models) == ["chat-a", "plain-b"]
    registry = load_registry()["smollm2-135m-instruct"]
    for model in models.values():
        assert model["path"] == str(model_path)
        assert model["size_bytes"] == model_path.stat().st_size
        assert model["sha256"] == registry.sha256  # computed from the file itself
        assert model["quantization"] == "Q4_1"
        assert 100_000_000 < model["parameters"] < 200_000_000
        assert model["state"] == "ready"
        assert model["context"]["n_ctx_train"] == 8192
    a, b = models["chat-a"], models["plain-b"]
    assert (a["aliases"], b["aliases"]) == ([], ["b-alias"])
    assert (a["slots"], b["slots"], a["threads"], b["threads"]) == (1, 2, 2, 1)
    assert (a["context"]["n_ctx"], a["context"]["n_ctx_per_slot"]) == (2048, 2048)
    assert (b["context"]["n_ctx"], b["context"]["n_ctx_per_slot"]) == (1024, 512)
    assert (a["chat_template_source"], b["chat_template_source"]) == ("gguf", "override")
    assert (a["embeddings"], b["embeddings"]) == (True, False)


def test_admin_metrics_under_load_and_unload_reload_of_another_model(two_models: ServedApp) -> None:
    """Two streams on chat-a (one slot: one runs, one queues) while plain-b is unloaded and loaded."""
    with _admin(two_models) as admin:
        before = admin.get("/admin/metrics").json()
        first = Stream(two_models, "chat-a", 300)
        assert first.started.wait(60)
        second = Stream(two_models, "chat-a", 5)
        loaded = _wait_for(
            lambda: (m := admin.get("/admin/metrics").json())["models"]["chat-a"]["queued"] == 1 and m,
            "the second stream to queue",
        )
        assert loaded["models"]["chat-a"] == {"state": "ready", "slots": 1, "busy": 1, "queued": 1}
        assert loaded["models"]["plain-b"] == {"state": "ready", "slots": 2, "busy": 0, "queued": 0}
        system = loaded["system"]
        assert system["process_rss_bytes"] > 50 * 2**20
        assert system["process_threads"] >= 2 and system["process_open_fds"] >= 3
        assert 0 < system["system_memory_used_bytes"] < system["system_memory_total_bytes"]
        assert loaded["uptime_s"] >= before["uptime_s"]

        # unload the other model while chat-a streams: chat-a's requests are not touched
        unloaded = admin.post("/admin/models/plain-b/unload")
        assert unloaded.status_code == 200, unloaded.text
        assert unloaded.json() == {"id": "plain-b", "state": "unloaded", "slots": 2, "busy": 0, "queued": 0}
        with httpx.Client(base_url=two_models.base_url, headers=two_models.headers, timeout=60) as user:
            body = {
                "model": "b-alias",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2,
                "logit_bias": NO_EOS,
            }
            refused = user.post("/v1/chat/completions", json=body)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "model_not_ready"
            info = {m["id"]: m for m in admin.get("/admin/model/info").json()["models"]}
            assert info["plain-b"]["state"] == "unloaded" and info["chat-a"]["state"] == "ready"
            reloaded = admin.post("/admin/models/b-alias/load")
            assert reloaded.status_code == 200, reloaded.text
            assert reloaded.json()["state"] == "ready"
            assert user.post("/v1/chat/completions", json=body).status_code == 200
        assert admin.post("/admin/models/nope/load").status_code == 404

        assert first.result()["completion_tokens"] == 300
        assert second.result()["completion_tokens"] == 5
        after = _wait_for(
            lambda: (m := admin.get("/admin/metrics").json())["models"]["chat-a"]["busy"] == 0 and m,
            "chat-a to be idle",
        )

    requests, tokens = after["requests"], after["tokens"]
    assert requests["total"] > before["requests"]["total"]
    assert requests["generations"] - before["requests"]["generations"] == 3  # two streams and plain-b's reply
    assert requests["errors"] > before["requests"]["errors"]  # the 503 and the 404 at least
    assert tokens["output"] - before["tokens"]["output"] == 300 + 5 + 2
    for key in ("latency_s", "ttft_s", "decode_tokens_per_s"):
        stats = after[key]
        assert stats["window"] >= 3
        assert 0 < stats["p50"] <= stats["p95"] <= stats["p99"], (key, stats)
    assert after["ttft_s"]["p99"] <= after["latency_s"]["p99"]
    assert after["models"]["chat-a"] == {"state": "ready", "slots": 1, "busy": 0, "queued": 0}
    cache = after["cache"]
    assert set(cache) == {
        "hit",
        "miss",
        "bypass",
        "hit_ratio",
        "backend",
        "enabled",
        "available",
        "entries",
        "bytes",
    }
    assert cache["backend"] == "memory" and cache["enabled"] is True and cache["available"] is True
    assert cache["hit"] + cache["miss"] + cache["bypass"] >= 3 and cache["entries"] >= 0
