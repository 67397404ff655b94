"""``GET /metrics``: after a known amount of traffic, every counter and histogram moved by exactly that."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from tests.conftest import MODEL_ID, NO_EOS, ServedApp, make_settings, serve

CHAT = "/v1/chat/completions"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def app(model_path: Path) -> Iterator[ServedApp]:
    del model_path
    with serve(make_settings()) as served:
        yield served


def scrape(app: ServedApp) -> Samples:
    """Every sample of ``/metrics``, parsed by Prometheus' own text parser."""
    response = httpx.get(f"{app.base_url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def chat(http: httpx.Client, max_tokens: int, **extra: Any) -> httpx.Response:
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Count to ten"}],
        "max_tokens": max_tokens,
        "logit_bias": NO_EOS,
        "temperature": 0,
        **extra,
    }
    return http.post(CHAT, json=body)


def stream_usage(http: httpx.Client, max_tokens: int) -> dict[str, int]:
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": max_tokens,
        "logit_bias": NO_EOS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with http.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    usage: dict[str, int] = json.loads(lines[-2].removeprefix("data: "))["usage"]
    return usage


def test_counters_and_histograms_move_by_exactly_the_traffic(app: ServedApp) -> None:
    before = scrape(app)
    usages = []
    reply_choices: list[Any] = []
    with httpx.Client(base_url=app.base_url, headers=app.headers, timeout=120) as http:
        for max_tokens in (3, 5):
            reply = chat(http, max_tokens)
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-cache"] == "miss"
            usages.append(reply.json()["usage"])
            reply_choices.append(reply.json()["choices"])
        for max_tokens in (4, 6):
            usages.append(stream_usage(http, max_tokens))
        # the first request again: answered by the response cache, no generation
        hit = chat(http, 3)
        assert hit.status_code == 200, hit.text
        assert hit.headers["x-cache"] == "hit"
        assert hit.json()["choices"] == reply_choices[0]
        too_long = chat(http, 10**6)
        assert too_long.status_code == 400
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        # a stream whose client goes away after the first chunk: counted as cancelled
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Go"}], "max_tokens": 1500}
        with http.stream("POST", CHAT, json={**body, "logit_bias": NO_EOS, "stream": True}) as response:
            next(response.iter_lines())
    assert [u["completion_tokens"] for u in usages] == [3, 5, 4, 6]

    deadline = time.monotonic() + 60
    after = scrape(app)
    while delta(before, after, "pocketllm_requests_cancelled_total", http_route=CHAT) < 1:
        assert time.monotonic() < deadline, "the cancelled stream was never recorded"
        time.sleep(0.1)
        after = scrape(app)
    app.wait_idle()
    after = scrape(app)

    route = {"http_route": CHAT}
    model = {"model": MODEL_ID}
    assert (
        delta(before, after, "pocketllm_requests_total", **route, **model, http_response_status_code="200")
        == 6
    )
    assert (
        delta(before, after, "pocketllm_requests_total", **route, **model, http_response_status_code="400")
        == 1
    )
    assert delta(before, after, "pocketllm_requests_cancelled_total", **route, **model) == 1
    assert delta(before, after, "http_server_request_duration_seconds_count", **route) == 7
    # cache: two deterministic misses, one hit; the sampled streams (no temperature) bypass it
    cache = "pocketllm_cache_requests_total"
    assert delta(before, after, cache, outcome="miss") == 2
    assert delta(before, after, cache, outcome="hit") == 1
    assert delta(before, after, cache, outcome="bypass") == 3

    gen_ai = {
        "gen_ai_operation_name": "chat",
        "gen_ai_request_model": MODEL_ID,
        "gen_ai_provider_name": "llama.cpp",
    }
    duration = "gen_ai_server_request_duration_seconds_count"
    assert delta(before, after, duration, **gen_ai) == 7
    assert delta(before, after, duration, **gen_ai, error_type="context_length_exceeded") == 1
    assert delta(before, after, duration, **gen_ai, error_type="cancelled") == 1
    # token usage, TTFT and TPOT: the four generations only (not the cache hit), with their token counts
    usage = "gen_ai_client_token_usage"
    assert delta(before, after, f"{usage}_count", **gen_ai, gen_ai_token_type="input") == 4
    assert delta(before, after, f"{usage}_count", **gen_ai, gen_ai_token_type="output") == 4
    assert delta(before, after, f"{usage}_sum", **gen_ai, gen_ai_token_type="input") == sum(
        u["prompt_tokens"] for u in usages
    )
    assert delta(before, after, f"{usage}_sum", **gen_ai, gen_ai_token_type="output") == 18
    assert delta(before, after, "gen_ai_server_time_to_first_token_seconds_count", **gen_ai) == 4
    assert delta(before, after, "gen_ai_server_time_per_output_token_seconds_count", **gen_ai) == 4
    # a bucket boundary of minutes exists for LLM latencies, and the +Inf bucket equals the count
    assert value(after, "gen_ai_server_request_duration_seconds_bucket", **gen_ai, le="600.0") >= 4
    assert value(after, "gen_ai_server_request_duration_seconds_bucket", **gen_ai, le="+Inf") == value(
        after, duration, **gen_ai
    )
    # nothing queued (requests ran one after another), the pool is idle again
    assert delta(before, after, "pocketllm_queue_wait_time_seconds_count", **model) == 0
    assert value(after, "pocketllm_slots_busy", **model) == 0
    assert value(after, "pocketllm_queue_length", **model) == 0
    # psutil gauges are there and plausible
    assert value(after, "process_memory_usage_bytes") > 50 * 2**20
    assert value(after, "process_thread_count") >= 2
    assert value(after, "process_unix_file_descriptor_count") >= 3
    assert 0 <= value(after, "system_memory_utilization") <= 1
    # no user or key ever becomes a label
    labels = {k for (_, got) in after for k, _ in got}
    assert not labels & {"user", "user_id", "username", "key", "key_id", "enduser_id"}


def admin_summary(app: ServedApp) -> dict[str, Any]:
    """``GET /admin/metrics`` (the console's dashboard reads it)."""
    response = httpx.get(
        f"{app.base_url}/admin/metrics", headers={"Authorization": f"Bearer {app.admin_token}"}, timeout=30
    )
    assert response.status_code == 200, response.text
    summary: dict[str, Any] = response.json()
    return summary


GEN_AI_CHAT = {
    "gen_ai_operation_name": "chat",
    "gen_ai_request_model": MODEL_ID,
    "gen_ai_provider_name": "llama.cpp",
}


def assert_generations_measured(
    before: Samples,
    after: Samples,
    summary_before: dict[str, Any],
    summary_after: dict[str, Any],
    usages: list[tuple[int, int]],
) -> None:
    """The gen_ai token, TTFT and TPOT histograms and the ``/admin/metrics`` summary moved by exactly these
    generations (``(input_tokens, output_tokens)`` each, every one of two or more output tokens)."""
    usage = "gen_ai_client_token_usage"
    count = len(usages)
    gen_ai = GEN_AI_CHAT
    assert delta(before, after, f"{usage}_count", **gen_ai, gen_ai_token_type="input") == count
    assert delta(before, after, f"{usage}_count", **gen_ai, gen_ai_token_type="output") == count
    assert delta(before, after, f"{usage}_sum", **gen_ai, gen_ai_token_type="input") == sum(
        i for i, _ in usages
    )
    assert delta(before, after, f"{usage}_sum", **gen_ai, gen_ai_token_type="output") == sum(
        o for _, o in usages
    )
    assert delta(before, after, "gen_ai_server_time_to_first_token_seconds_count", **gen_ai) == count
    assert delta(before, after, "gen_ai_server_time_per_output_token_seconds_count", **gen_ai) == count
    assert delta(before, after, "gen_ai_server_request_duration_seconds_count", **gen_ai) == count
    requests_before, requests_after = summary_before["requests"], summary_after["requests"]
    assert requests_after["generations"] - requests_before["generations"] == count
    tokens_before, tokens_after = summary_before["tokens"], summary_after["tokens"]
    assert tokens_after["input"] - tokens_before["input"] == sum(i for i, _ in usages)
    assert tokens_after["output"] - tokens_before["output"] == sum(o for _, o in usages)
    assert summary_after["ttft_s"]["window"] - summary_before["ttft_s"]["window"] == count
    assert summary_after["ttft_s"]["p50"] is not None


def test_responses_are_measured_like_chat_completions(app: ServedApp) -> None:
    before, summary_before = scrape(app), admin_summary(app)
    body = {"model": MODEL_ID, "input": "Tell me a story", "max_output_tokens": 6, "temperature": 0.7}
    usages = []
    with httpx.Client(base_url=app.base_url, headers=app.headers, timeout=120) as http:
        reply = http.post("/v1/responses", json=body)
        assert reply.status_code == 200, reply.text
        usages.append(reply.json()["usage"])
        with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            events = [
                json.loads(line.removeprefix("data: "))
                for line in response.iter_lines()
                if line.startswith("data: ")
            ]
        assert events[-1]["type"] in ("response.completed", "response.incomplete")
        usages.append(events[-1]["response"]["usage"])
    app.wait_idle()
    after, summary_after = scrape(app), admin_summary(app)
    assert all(u["output_tokens"] >= 2 for u in usages), usages
    counts = [(u["input_tokens"], u["output_tokens"]) for u in usages]
    assert_generations_measured(before, after, summary_before, summary_after, counts)
    route = {"http_route": "/v1/responses", "http_response_status_code": "200", "model": MODEL_ID}
    assert delta(before, after, "pocketllm_requests_total", **route) == 2


def test_a_websocket_chat_turn_is_measured_like_post_chat(app: ServedApp) -> None:
    """The console chats over ``/chat/ws``: each turn is in the gen_ai metrics and the dashboard's
    ``/admin/metrics`` tokens and TTFT, and a turn the client leaves is a cancellation, not an error."""
    url = f"ws://127.0.0.1:{app.port}/chat/ws"
    before, summary_before = scrape(app), admin_summary(app)
    with connect(url) as socket:
        socket.send(json.dumps({"token": app.api_key}))
        assert json.loads(socket.recv(timeout=10))["type"] == "ready"
        socket.send(json.dumps({"prompt": "Tell me a story", "max_tokens": 6, "temperature": 0.7}))
        frames = []
        while not frames or frames[-1]["type"] == "delta":
            frames.append(json.loads(socket.recv(timeout=60)))
    done = frames[-1]
    assert done["type"] == "done", done
    usage = done["usage"]
    assert usage["completion_tokens"] >= 2, usage
    # recorded before `done` went out: no waiting needed
    after, summary_after = scrape(app), admin_summary(app)
    counts = [(usage["prompt_tokens"], usage["completion_tokens"])]
    assert_generations_measured(before, after, summary_before, summary_after, counts)
    turn = {"http_route": "/chat/ws", "http_request_method": "WS", "model": MODEL_ID}
    assert delta(before, after, "pocketllm_requests_total", **turn, http_response_status_code="200") == 1

    # Stop in the console closes the socket mid-reply
    with connect(url, additional_headers={"Authorization": f"Bearer {app.api_key}"}) as socket:
        socket.send(json.dumps({"prompt": "Count from 1 to 500, one number per line.", "max_tokens": 400}))
        assert json.loads(socket.recv(timeout=60))["type"] == "delta"
    deadline = time.monotonic() + 30
    while (
        delta(before, latest := scrape(app), "pocketllm_requests_cancelled_total", http_route="/chat/ws") < 1
    ):
        assert time.monotonic() < deadline, "the abandoned turn was never recorded"
        time.sleep(0.1)
    assert delta(before, latest, "pocketllm_requests_total", **turn, http_response_status_code="499") == 1
    assert admin_summary(app)["requests"]["server_errors"] == summary_before["requests"]["server_errors"]


def test_a_queued_request_is_measured_once(model_path: Path) -> None:
    """With one slot, a second stream waits for the first: exactly one queue wait is recorded."""
    del model_path
    with serve(make_settings(model={"slots": 1, "n_ctx": 2048})) as app:
        before = scrape(app)
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "Go"}],
            "max_tokens": 200,
            "logit_bias": NO_EOS,
            "stream": True,
        }
        first_http = httpx.Client(base_url=app.base_url, headers=app.headers, timeout=120)
        with first_http, first_http.stream("POST", CHAT, json=body) as first:
            lines = first.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it holds the only slot
            with httpx.Client(base_url=app.base_url, headers=app.headers, timeout=120) as second_http:
                second = second_http.post(CHAT, json={**body, "stream": False, "max_tokens": 2})
                assert second.status_code == 200
            assert [line for line in lines if line][-1] == "data: [DONE]"
        after = scrape(app)
        model = {"model": MODEL_ID}
        assert delta(before, after, "pocketllm_queue_wait_time_seconds_count", **model) == 1
        assert delta(before, after, "pocketllm_requests_total", http_route=CHAT, **model) == 2
