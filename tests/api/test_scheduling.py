"""Concurrency, disconnects, queue bounds and waits, on the real model."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL_ID, NO_EOS, ServedApp, make_settings, serve


def _long_chat(max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "stream": stream,
        "logit_bias": NO_EOS,
        "temperature": 0.7,
    }


def test_four_simultaneous_streams_all_complete(served: ServedApp) -> None:
    async def one(client: openai.AsyncOpenAI, index: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": f"Story number {index}, please."}],
            max_tokens=64,
            stream=True,
            stream_options={"include_usage": True},
            logit_bias=NO_EOS,
        )
        text, finish, tokens = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens

    async def main() -> list[tuple[str, str | None, int]]:
        async with openai.AsyncOpenAI(
            base_url=f"{served.base_url}/v1", api_key=served.api_key, max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(4)))

    results = asyncio.run(main())
    for text, finish, tokens in results:
        assert finish == "length"
        assert tokens == 64
        assert text.strip()
    assert served.wait_idle()["busy"] == 0


def test_models_answer_while_every_slot_is_busy(served: ServedApp) -> None:
    stop = threading.Event()

    def hog() -> None:
        with (
            httpx.Client(base_url=served.base_url, timeout=60, headers=served.headers) as http,
            http.stream("POST", "/v1/chat/completions", json=_long_chat(400)) as response,
        ):
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    hogs = [threading.Thread(target=hog) for _ in range(3)]
    for t in hogs:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while served.health()["models"][MODEL_ID]["busy"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert served.health()["models"][MODEL_ID]["busy"] == 2
        started = time.perf_counter()
        response = httpx.get(f"{served.base_url}/v1/models", timeout=5, headers=served.headers)
        assert response.status_code == 200
        assert time.perf_counter() - started < 1.0
    finally:
        stop.set()
        for t in hogs:
            t.join()
    assert served.wait_idle()["busy"] == 0


@pytest.fixture(scope="module")
def one_slot(model_path: Any) -> Iterator[ServedApp]:
    """One slot, a queue of one, short waits: for disconnect and admission tests."""
    del model_path
    settings = make_settings(
        model={"slots": 1, "n_ctx": 4096}, queue={"max_queue": 1, "max_wait_s": 3.0, "ping_interval_s": 0.2}
    )
    with serve(settings) as app:
        yield app


def _quick(app: ServedApp) -> float:
    started = time.perf_counter()
    response = httpx.post(
        f"{app.base_url}/v1/chat/completions",
        timeout=60,
        headers=app.headers,
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def test_dropped_stream_frees_its_slot(one_slot: ServedApp) -> None:
    with (
        httpx.Client(base_url=one_slot.base_url, timeout=60, headers=one_slot.headers) as http,
        http.stream("POST", "/v1/chat/completions", json=_long_chat(1500)) as response,
    ):
        chunks = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks += 1
            if chunks == 5:
                break
    # 1,500 tokens would take >10 s; the next request must not wait for them
    assert _quick(one_slot) < 5.0
    assert one_slot.wait_idle(2.0)["busy"] == 0


def test_dropped_non_streaming_request_frees_its_slot(one_slot: ServedApp) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{one_slot.base_url}/v1/chat/completions",
            json=_long_chat(1500, stream=False),
            timeout=1.0,
            headers=one_slot.headers,
        )
    assert _quick(one_slot) < 5.0
    assert one_slot.wait_idle(2.0)["busy"] == 0


def test_queue_full_and_queue_timeout(one_slot: ServedApp) -> None:
    results: dict[str, Any] = {}
    holding = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with (
            httpx.Client(base_url=one_slot.base_url, timeout=60, headers=one_slot.headers) as http,
            http.stream("POST", "/v1/chat/completions", json=_long_chat(1500)) as response,
        ):
            for line in response.iter_lines():
                if line.startswith("data: "):
                    holding.set()
                if release.is_set():
                    return

    def waiter() -> None:
        with httpx.Client(base_url=one_slot.base_url, timeout=60, headers=one_slot.headers) as http:
            response = http.post("/v1/chat/completions", json=_long_chat(4, stream=True))
            results["waiter"] = response

    first = threading.Thread(target=holder)
    first.start()
    try:
        assert holding.wait(20)
        second = threading.Thread(target=waiter)
        second.start()
        deadline = time.monotonic() + 5
        while one_slot.health()["models"][MODEL_ID]["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        # the queue (1) is full: the third request is refused at once
        started = time.perf_counter()
        refused = httpx.post(
            f"{one_slot.base_url}/v1/chat/completions",
            json=_long_chat(4, stream=False),
            timeout=10,
            headers=one_slot.headers,
        )
        assert time.perf_counter() - started < 1.0
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        second.join(15)
        # the streaming waiter got pings while queued, then an error frame after max_wait_s
        waited = results["waiter"]
        assert waited.status_code == 200
        frames = [f for f in waited.text.split("\n\n") if f]
        assert frames[0] == ": ping"
        error = json.loads(frames[-1].removeprefix("data: "))["error"]
        assert error["code"] == "queue_timeout"
    finally:
        release.set()
        first.join(30)
    assert one_slot.wait_idle(3.0) == {"state": "ready", "slots": 1, "busy": 0, "queued": 0}


def test_request_cancelled_while_queued_leaves_the_queue(one_slot: ServedApp) -> None:
    release = threading.Event()
    holding = threading.Event()

    def holder() -> None:
        with (
            httpx.Client(base_url=one_slot.base_url, timeout=60, headers=one_slot.headers) as http,
            http.stream("POST", "/v1/chat/completions", json=_long_chat(1500)) as response,
        ):
            for line in response.iter_lines():
                if line.startswith("data: "):
                    holding.set()
                if release.is_set():
                    return

    first = threading.Thread(target=holder)
    first.start()
    try:
        assert holding.wait(20)
        with (
            httpx.Client(base_url=one_slot.base_url, timeout=60, headers=one_slot.headers) as http,
            http.stream("POST", "/v1/chat/completions", json=_long_chat(1500)) as queued,
        ):
            for line in queued.iter_lines():
                if line == ": ping":
                    # still waiting for the slot, and counted in the queue
                    assert one_slot.health()["models"][MODEL_ID]["queued"] == 1
                    break
        # leaving the block dropped the connection of the queued request
        deadline = time.monotonic() + 2
        while one_slot.health()["models"][MODEL_ID]["queued"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert one_slot.health()["models"][MODEL_ID]["queued"] == 0
    finally:
        release.set()
        first.join(30)
    assert one_slot.wait_idle(2.0)["busy"] == 0
