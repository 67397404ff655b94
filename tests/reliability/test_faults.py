"""Faults: an engine error mid-stream, SIGTERM with streams in flight, Redis stopped and restarted mid-load."""

from __future__ import annotations

import json
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.base import EngineCrashedError
from engine.models import ModelManager
from tests.conftest import MODEL_ID, NO_EOS, ServedApp, create_key, free_port, login, make_settings, serve
from tests.reliability.faults_support import FAULT_MARKER, FaultyEngine
from tests.serve_support import server_env, start_server, wait_healthy

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
    models: ModelManager = three_slots.app.state.models
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


def test_sigterm_drains_streams_in_flight(model_path: Path) -> None:
    del model_path
    drain_timeout_s = 10.0
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(
        MODEL_SLOTS="2",
        MODEL_N_CTX="8192",
        MODEL_N_THREADS="2",
        POCKETLLM_SERVER__DRAIN_TIMEOUT_S=str(drain_timeout_s),
    )
    process = start_server(port, env)
    try:
        wait_healthy(process, base)
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


def _scrape_sum(base_url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    wanted = set(labels.items())
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted <= set(sample.labels.items())
    )


def test_redis_stopped_and_restarted_mid_load(model_path: Path) -> None:
    """Six clients keep sending cacheable JSON and streaming requests while the test's own Redis is
    stopped and started again: no 5xx and no error frame at any time, every lookup made while Redis is
    down is a bypass, the limiter falls back to the in-process one (Redis errors counted), and the
    cache serves hits again once Redis is back."""
    import asyncio  # noqa: PLC0415

    from tests.unit.gateway.conftest import RedisServer  # noqa: PLC0415

    del model_path
    redis = RedisServer()
    redis.start()
    try:
        settings = make_settings(
            redis={"host": "127.0.0.1", "port": redis.port, "timeout_s": 0.3, "retry_after_s": 0.3},
            ratelimit={"key_rpm": 100_000, "key_concurrency": 64},
            cache={"local_ttl_s": 0},  # every lookup goes to Redis (local copies would answer the outage)
        )
        with serve(settings) as app:
            prompts = [f"Name a colour, {i}." for i in range(3)]
            # (phase the request began and ended in, or "mixed"), status, x-cache, complete and error-free
            seen: list[tuple[str, int, str, bool]] = []
            latencies: dict[str, list[float]] = {}
            phase = "before"

            def note(started_in: str, began: float, response: httpx.Response, ok: bool) -> None:
                ended_in = started_in if phase == started_in else "mixed"
                latencies.setdefault(ended_in, []).append(time.perf_counter() - began)
                seen.append((ended_in, response.status_code, response.headers.get("x-cache", ""), ok))

            async def client(index: int, stop: asyncio.Event) -> None:
                async with httpx.AsyncClient(base_url=app.base_url, headers=app.headers, timeout=120) as http:
                    turn = 0
                    while not stop.is_set():
                        started_in, began = phase, time.perf_counter()
                        body = {
                            "model": MODEL_ID,
                            "messages": [{"role": "user", "content": prompts[(index + turn) % 3]}],
                            "max_tokens": 4,
                            "temperature": 0,
                            "stream": turn % 2 == 1,
                        }
                        turn += 1
                        if not body["stream"]:
                            response = await http.post(CHAT, json=body)
                            note(
                                started_in,
                                began,
                                response,
                                response.status_code != 200 or bool(response.json()["choices"]),
                            )
                            continue
                        async with http.stream("POST", CHAT, json=body) as response:
                            lines = [
                                line async for line in response.aiter_lines() if line.startswith("data: ")
                            ]
                        complete = lines[-1] == "data: [DONE]" and not any(
                            '"error"' in line for line in lines
                        )
                        note(started_in, began, response, response.status_code != 200 or complete)

            async def until(condition: Any, what: str) -> None:
                deadline = time.monotonic() + 120
                while not condition():
                    assert time.monotonic() < deadline, what
                    await asyncio.sleep(0.05)

            def count(wanted_phase: str, outcome: str | None = None) -> int:
                return sum(1 for p, _, c, _ in seen if p == wanted_phase and outcome in (None, c))

            async def drive() -> None:
                # driven by progress, not by the clock: the machine may be slow
                nonlocal phase
                stop = asyncio.Event()
                clients = [asyncio.create_task(client(i, stop)) for i in range(6)]
                await until(lambda: count("before", "hit") >= 6, "no cache hits before the outage")
                await asyncio.to_thread(redis.stop)
                phase = "down"
                await until(lambda: count("down") >= 12, "too few requests during the outage")
                phase = "restarting"
                await asyncio.to_thread(redis.start)
                phase = "after"
                await until(lambda: count("after", "hit") >= 1, "no cache hit after Redis came back")
                stop.set()
                await asyncio.gather(*clients)

            asyncio.run(drive())
            app.wait_idle()

            statuses = [s for _, s, _, _ in seen]
            assert all(s == 200 for s in statuses), sorted(set(statuses))
            assert all(ok for *_, ok in seen), "a response was incomplete or carried an error frame"
            by_phase = {p: [c for q, _, c, _ in seen if q == p] for p in ("before", "down", "after")}
            assert "hit" in by_phase["before"]
            assert by_phase["down"] and set(by_phase["down"]) == {"bypass"}
            assert "hit" in by_phase["after"]
            # the limiter degraded to the in-process one rather than failing requests
            assert _scrape_sum(app.base_url, "pocketllm_redis_errors_total", component="ratelimit") >= 1
            assert _scrape_sum(app.base_url, "pocketllm_redis_errors_total", component="cache") >= 1
            print(
                f"\nredis outage under load: {len(seen)} requests "
                + ", ".join(
                    f"{p}: {len(v)} ({v.count('hit')} hits, latency p50 "
                    f"{statistics.median(latencies.get(p, [0.0])):.2f}s)"
                    for p, v in by_phase.items()
                )
            )
    finally:
        redis.stop()
