"""/v1/embeddings takes the same admission as completions and cannot starve other users (issue: embeddings
were outside every limit, ran one request at a time on an unbounded queue, and ignored a client that left);
token-id input, which a client may have made with another vocabulary, is refused unless configured."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.cache_support import new_key, new_user
from tests.conftest import MODEL_ID, ServedApp, make_settings, serve

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today. "
LONG_INPUT = SENTENCE * 30  # 451 tokens
MEDIUM_INPUT = SENTENCE * 6  # ~90 tokens: one turn each


@pytest.fixture(scope="module")
def app(model_path: Any) -> Iterator[ServedApp]:
    del model_path
    with serve(make_settings(model={"embedding_token_ids": False})) as served:
        yield served


def _embed(app: ServedApp, headers: dict[str, str], inputs: Any, timeout: float = 120) -> httpx.Response:
    return httpx.post(
        f"{app.base_url}/v1/embeddings",
        json={"model": MODEL_ID, "input": inputs},
        headers=headers,
        timeout=timeout,
    )


def test_embeddings_count_against_rpm(app: ServedApp) -> None:
    _, headers = new_key(app, new_user(app)["username"], rpm=2)
    assert [_embed(app, headers, "hello").status_code for _ in range(2)] == [200, 200]
    refused = _embed(app, headers, "hello")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1


def test_embeddings_count_input_tokens_against_tpm(app: ServedApp) -> None:
    _, headers = new_key(app, new_user(app)["username"], tpm=300)
    first = _embed(app, headers, LONG_INPUT)  # ~480 tokens: over a 300-token minute at once
    assert first.status_code == 429 and first.json()["error"]["type"] == "tokens"
    assert _embed(app, headers, "hello").status_code == 200


def test_a_large_request_does_not_hold_back_another_users_small_one(app: ServedApp) -> None:
    _, big_headers = new_key(app, new_user(app)["username"])
    _, small_headers = new_key(app, new_user(app)["username"])
    results: dict[str, Any] = {}

    def big() -> None:
        started = time.perf_counter()
        results["big"] = _embed(app, big_headers, [MEDIUM_INPUT] * 12, timeout=600)
        results["big_s"] = time.perf_counter() - started

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(1.0)  # the big request is running its turns
    started = time.perf_counter()
    small = _embed(app, small_headers, "hello")
    small_s = time.perf_counter() - started
    thread.join()
    assert small.status_code == 200 and results["big"].status_code == 200
    assert len(results["big"].json()["data"]) == 12
    # the small request waited for at most a turn or two of the big one, not for all twelve inputs
    assert small_s < results["big_s"] / 3, (small_s, results["big_s"])


def test_a_client_that_leaves_stops_its_embeddings(app: ServedApp) -> None:
    _, headers = new_key(app, new_user(app)["username"])
    with pytest.raises(httpx.ReadTimeout):
        _embed(app, headers, [MEDIUM_INPUT] * 12, timeout=1.0)
    # the remaining turns were dropped: the next request waits for the turn that was running at most
    started = time.perf_counter()
    assert _embed(app, headers, "hello").status_code == 200
    assert time.perf_counter() - started < 8.0


def test_token_id_input_is_refused_with_a_way_out(app: ServedApp) -> None:
    refused = _embed(app, app.headers, [[9906, 1917]])  # "Hello world" in OpenAI's cl100k vocabulary
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "token_ids_not_supported" and error["param"] == "input"
    assert "check_embedding_ctx_length=False" in error["message"]


def test_token_ids_are_accepted_where_configured(model_path: Any) -> None:
    del model_path
    with serve(make_settings(model={"embedding_token_ids": True})) as served:
        by_ids = _embed(served, served.headers, [[19556, 905]])  # SmolLM2's own ids of "Hello world"
        by_text = _embed(served, served.headers, "Hello world")
        assert by_ids.status_code == 200 and by_text.status_code == 200
        a, b = by_ids.json()["data"][0]["embedding"], by_text.json()["data"][0]["embedding"]
        cosine = sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )
        assert cosine > 0.999


def test_one_request_is_bounded_in_tokens(app: ServedApp) -> None:
    refused = _embed(app, app.headers, [LONG_INPUT] * 40)  # ~19,000 tokens > 16,384
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"
    assert "at most 16384" in refused.json()["error"]["message"]
