"""Every route that generates cancels its generation when its client goes away, JSON or streaming, and
frees the slot: /v1/chat/completions, /v1/completions, POST /chat and /chat/ws (one pipeline). A /chat/ws
turn still queued for a slot leaves the queue when its socket closes, and never runs.

The server counts a request as cancelled only when its client left before the answer was complete, so
each test also proves the generation was still running when the client went (a counting prompt with a
1,500-token budget runs for >10 s here; the tests leave after well under a second)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import websockets.sync.client
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL_ID, NO_EOS, ServedApp, make_settings, serve

COUNT = "Count from 1 to 2000, separated by commas: 1, 2, 3,"


@pytest.fixture(scope="module")
def one_slot(model_path: Any) -> Iterator[ServedApp]:
    """One slot: while a dropped generation still ran, nothing else could."""
    del model_path
    with serve(make_settings(model={"slots": 1, "n_ctx": 4096}, queue={"max_queue": 4})) as app:
        yield app


def _cancelled(app: ServedApp) -> int:
    metrics = httpx.get(
        f"{app.base_url}/admin/metrics", headers={"Authorization": f"Bearer {app.admin_token}"}, timeout=30
    ).json()
    cancelled: int = metrics["requests"]["cancelled"]
    return cancelled


def _assert_freed(app: ServedApp, cancelled_before: int | None) -> None:
    """The slot is free at once (the budget would hold it for >10 s), the server answers the next request,
    and the drop counted as cancelled (not finished)."""
    assert app.wait_idle(2.0)["busy"] == 0
    quick = httpx.post(
        f"{app.base_url}/v1/completions",
        headers=app.headers,
        json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2},
        timeout=30,
    )
    assert quick.status_code == 200, quick.text
    if cancelled_before is not None:
        deadline = time.monotonic() + 5
        while _cancelled(app) <= cancelled_before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _cancelled(app) == cancelled_before + 1


ROUTES: dict[str, Callable[[bool], tuple[str, dict[str, Any]]]] = {
    "chat-completions": lambda stream: (
        "/v1/chat/completions",
        {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": COUNT}],
            "max_tokens": 1500,
            "logit_bias": NO_EOS,
            "stream": stream,
        },
    ),
    "completions": lambda stream: (
        "/v1/completions",
        {"model": MODEL_ID, "prompt": COUNT, "max_tokens": 1500, "logit_bias": NO_EOS, "stream": stream},
    ),
    "pocket-chat": lambda stream: (
        "/chat",
        {"prompt": COUNT, "max_tokens": 1500, "temperature": 0, "stream": stream},
    ),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_dropped_json_request_is_cancelled(one_slot: ServedApp, route: str) -> None:
    path, body = ROUTES[route](False)
    before = _cancelled(one_slot)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{one_slot.base_url}{path}", json=body, headers=one_slot.headers, timeout=1.5)
    _assert_freed(one_slot, before)


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_dropped_stream_is_cancelled(one_slot: ServedApp, route: str) -> None:
    path, body = ROUTES[route](True)
    before = _cancelled(one_slot)
    with (
        httpx.Client(base_url=one_slot.base_url, timeout=60, headers=one_slot.headers) as http,
        http.stream("POST", path, json=body) as response,
    ):
        assert response.status_code == 200
        frames = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                assert "[DONE]" not in line and '"done"' not in line
                frames += 1
            if frames == 5:
                break
    _assert_freed(one_slot, before)


def test_a_closed_websocket_cancels_its_turn(one_slot: ServedApp) -> None:
    url = one_slot.base_url.replace("http://", "ws://") + "/chat/ws"
    with websockets.sync.client.connect(url, additional_headers=one_slot.headers) as socket:
        socket.send(json.dumps({"prompt": COUNT, "max_tokens": 1500}))
        deltas = 0
        while deltas < 5:
            message = json.loads(socket.recv(timeout=30))
            assert message["type"] == "delta", message
            deltas += 1
    # (WebSocket turns are not HTTP requests in the request metrics: the free slot is the evidence)
    _assert_freed(one_slot, None)


def _model_state(app: ServedApp) -> dict[str, Any]:
    state: dict[str, Any] = app.health()["models"][MODEL_ID]
    return state


def _queue_waits(app: ServedApp) -> float:
    """How many queued requests of the model have been given a slot (``GET /metrics``)."""
    text = httpx.get(f"{app.base_url}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "pocketllm_queue_wait_time_seconds_count" and sample.labels.get("model") == MODEL_ID
    )


def test_a_websocket_turn_closed_while_queued_leaves_the_queue(one_slot: ServedApp) -> None:
    """The only slot generates for a stream; a /chat/ws turn queues behind it; its socket closes. The turn
    leaves the queue at once, while the stream still holds the slot (it would for >10 s), and it never gets
    a slot afterwards (no queued request is handed one)."""
    url = one_slot.base_url.replace("http://", "ws://") + "/chat/ws"
    waits_before = _queue_waits(one_slot)
    path, body = ROUTES["chat-completions"](True)
    with (
        httpx.Client(base_url=one_slot.base_url, timeout=60, headers=one_slot.headers) as http,
        http.stream("POST", path, json=body) as blocker,
    ):
        assert blocker.status_code == 200
        lines = blocker.iter_lines()  # kept: closing this iterator would close the stream
        next(line for line in lines if line.startswith("data: "))  # it holds the only slot
        with websockets.sync.client.connect(url, additional_headers=one_slot.headers) as socket:
            socket.send(json.dumps({"prompt": "Say hi", "max_tokens": 8}))
            deadline = time.monotonic() + 30
            while _model_state(one_slot)["queued"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _model_state(one_slot)["queued"] == 1  # the turn waits for the slot
        # the socket is closed: the queued turn goes, the stream still generates
        deadline = time.monotonic() + 2
        state = _model_state(one_slot)
        while state["queued"] and time.monotonic() < deadline:
            time.sleep(0.05)
            state = _model_state(one_slot)
        assert (state["busy"], state["queued"]) == (1, 0), state
    _assert_freed(one_slot, None)  # the stream is dropped: the slot is free and nothing waits for it
    assert _queue_waits(one_slot) == waits_before
