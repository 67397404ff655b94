"""Faults: an engine error mid-stream, SIGTERM with streams in flight.

(The Redis outage fault belongs beside these once the cache and limiter are wired into requests.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.base import EngineCrashedError
from gateway.runtime import ModelManager
from tests.conftest import MODEL_ID, NO_EOS, ServedApp, create_key, free_port, login, make_settings, serve
from tests.reliability.faults import FAULT_MARKER, FaultyEngine

pytestmark = pytest.mark.reliability
CHAT = "/v1/chat/completions"


def _chat(content: str, max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
        "logit_bias": NO_EOS,
    }


def _read_stream(
    base_url: str, headers: dict[str, str], body: dict[str, Any], first: threading.Event | None = None
) -> list[str]:
    """The ``data:`` payloads of one stream (``first`` is set on the first content token)."""
    frames: list[str] = []
    with (
        httpx.Client(base_url=base_url, headers=headers, timeout=120) as http,
        http.stream("POST", CHAT, json=body) as response,
    ):
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                frames.append(line.removeprefix("data: "))
                if first is not None and '"content":"' in line and '"content":""' not in line:
                    first.set()
    return frames


def _completed(frames: list[str], max_tokens: int) -> bool:
    chunks = [json.loads(f) for f in frames[:-1]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    return frames[-1] == "[DONE]" and finish[-1] == "length" and 0 < len(content) <= max_tokens


def _error_frame(frames: list[str]) -> dict[str, Any]:
    last = json.loads(frames[-1])
    assert set(last) == {"error"}, frames[-3:]
    error: dict[str, Any] = last["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    return error


@pytest.fixture(scope="module")
def three_slots(model_path: Path) -> Iterator[ServedApp]:
    del model_path
    with serve(make_settings(model={"slots": 3, "n_ctx": 3 * 1024})) as app:
        yield app


@pytest.fixture
def faulty(three_slots: ServedApp) -> Iterator[FaultyEngine]:
    """The served model's engine wrapped so that marked requests fail after three tokens."""
    models: ModelManager = three_slots.app.dependencies["models"].dependency()
    runtime = models.resolve(MODEL_ID)
    real = runtime.engine
    assert real is not None
    wrapper = FaultyEngine(real, EngineCrashedError("injected: llama_decode failed"))
    runtime.engine = wrapper  # type: ignore[assignment]
    try:
        yield wrapper
    finally:
        runtime.engine = real


@pytest.mark.parametrize("error", [EngineCrashedError("injected decode failure"), RuntimeError("a bug")])
def test_engine_error_mid_stream(three_slots: ServedApp, faulty: FaultyEngine, error: Exception) -> None:
    faulty.error = error
    base, headers = three_slots.base_url, three_slots.headers
    with ThreadPoolExecutor(3) as pool:
        normal = [pool.submit(_read_stream, base, headers, _chat(f"Story {i}.", 32)) for i in range(2)]
        broken = pool.submit(_read_stream, base, headers, _chat(f"{FAULT_MARKER} story.", 32))
        broken_frames = broken.result(120)
        normal_frames = [f.result(120) for f in normal]
    # the faulty request: some tokens, then an error frame, and the stream ends (no [DONE])
    assert faulty.injected >= 1
    error_body = _error_frame(broken_frames)
    assert error_body["type"] == "server_error"
    assert error_body["code"] == "internal_error"
    assert "a bug" not in error_body["message"]
    assert len(broken_frames) >= 2
    # the others, on the same engine at the same time, are untouched
    for frames in normal_frames:
        assert _completed(frames, 32), frames[-3:]
        assert sum(1 for f in frames[:-1] if json.loads(f)["choices"][0]["delta"].get("content")) > 0
    # the slot came back and the model still serves
    state = three_slots.wait_idle(2.0)
    assert (state["busy"], state["queued"]) == (0, 0)
    # every slot (the faulty one included) still runs a request to the end
    with ThreadPoolExecutor(3) as pool:
        after = [pool.submit(_read_stream, base, headers, _chat(f"Again {i}.", 8)) for i in range(3)]
        assert all(_completed(f.result(120), 8) for f in after)


def test_engine_error_in_json_request(three_slots: ServedApp, faulty: FaultyEngine) -> None:
    response = httpx.post(
        f"{three_slots.base_url}{CHAT}",
        headers=three_slots.headers,
        json=_chat(f"{FAULT_MARKER} please.", 16, stream=False),
        timeout=60,
    )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error" and error["type"] == "server_error"
    assert faulty.injected == 1
    assert three_slots.wait_idle(2.0)["busy"] == 0
    ok = httpx.post(
        f"{three_slots.base_url}{CHAT}",
        headers=three_slots.headers,
        json=_chat("Fine now?", 4, stream=False),
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def _serve_process(port: int, drain_timeout_s: float) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETLLM_", "MODEL_"))}
    env.update(
        POCKETLLM_DATA_DIR=tempfile.mkdtemp(prefix="pocketllm-sigterm-"),
        MODEL_SLOTS="2",
        MODEL_N_CTX="8192",
        MODEL_N_THREADS="2",
        POCKETLLM_SERVER__DRAIN_TIMEOUT_S=str(drain_timeout_s),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_drains_streams_in_flight(model_path: Path) -> None:
    del model_path
    drain_timeout_s = 10.0
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = _serve_process(port, drain_timeout_s)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        headers = {
            "Authorization": f"Bearer {create_key(base, login(base, 'admin', 'admin123'), 'user1')['key']}"
        }
        short_started, long_started = threading.Event(), threading.Event()
        with ThreadPoolExecutor(2) as pool:
            # 8 tokens finish well within the drain timeout; 4,000 cannot (that would be >400 tokens/s)
            short = pool.submit(_read_stream, base, headers, _chat("A short one.", 8), short_started)
            long = pool.submit(_read_stream, base, headers, _chat("A long one.", 4000), long_started)
            assert short_started.wait(60) and long_started.wait(60)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            # new requests are refused with a clear 503 while the server drains
            refused = None
            while time.monotonic() - signalled < drain_timeout_s:
                refused = httpx.post(f"{base}{CHAT}", headers=headers, json=_chat("New.", 4), timeout=10)
                if refused.status_code == 503:
                    break
                time.sleep(0.05)
            assert refused is not None and refused.status_code == 503, refused and refused.text
            assert refused.json()["error"]["code"] == "shutting_down"
            assert int(refused.headers["retry-after"]) >= 1
            health = httpx.get(f"{base}/health", timeout=10)
            assert health.status_code == 503
            short_frames, long_frames = short.result(60), long.result(60)
        output, _ = process.communicate(timeout=drain_timeout_s + 30)
        print(f"\nSIGTERM: process exited {process.returncode} {time.monotonic() - signalled:.1f}s after it")
        assert process.returncode == 0, output
        assert _completed(short_frames, 8), short_frames[-3:]
        error = _error_frame(long_frames)
        assert error["code"] == "shutting_down"
        assert "draining" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
