"""/v1/embeddings takes the same admission as completions and cannot starve other users (issue: embeddings
were outside every limit, ran one request at a time on an unbounded queue, and ignored a client that left);
token-id input, which a client may have made with another vocabulary, is refused unless configured."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from engine.models import ModelManager
from engine.pool import SlotPool
from tests.api.cache_support import new_key, new_user
from tests.conftest import MODEL_ID, ServedApp, make_settings, serve

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today. "
LONG_INPUT = SENTENCE * 30  # 451 tokens
MEDIUM_INPUT = SENTENCE * 6  # ~90 tokens: one turn each
VERY_LONG_INPUT = SENTENCE * 120  # ~1,800 tokens: one long turn (about 16 times a MEDIUM_INPUT one)


@pytest.fixture(scope="module")
def app(model_path: Any) -> Iterator[ServedApp]:
    del model_path
    with serve(make_settings(model={"embedding_token_ids": False})) as served:
        yield served


@dataclass
class Tight:
    """A server whose queues hold 2 requests, and its wait limit."""

    app: ServedApp
    wait_s: float
    """``queue.max_wait_s``: well above a turn of MEDIUM_INPUT, well below one of VERY_LONG_INPUT."""


@pytest.fixture(scope="module")
def tight(app: ServedApp) -> Iterator[Tight]:
    """The wait limit is the geometric mean of a MEDIUM_INPUT turn and a VERY_LONG_INPUT turn timed on
    ``app`` first, so that the tests hold on a fast machine and a slow (or busy) one alike."""
    headers = _another_user(app)
    medium_s = min(_timed(app, headers, MEDIUM_INPUT)[1] for _ in range(2))
    long_s = _timed(app, headers, VERY_LONG_INPUT)[1]
    wait_s = round(math.sqrt(medium_s * long_s), 2)
    print(
        f"\nembedding turns: ~90 tokens {medium_s:.2f} s, ~1,800 tokens {long_s:.2f} s; wait limit {wait_s} s"
    )
    assert long_s > 4 * medium_s, (medium_s, long_s)
    queue = {"ping_interval_s": 0.5, "max_queue": 2, "max_wait_s": wait_s}
    with serve(make_settings(model={"embedding_token_ids": False}, queue=queue)) as served:
        yield Tight(served, wait_s)


def _embed_pool(app: ServedApp) -> SlotPool:
    models: ModelManager = app.app.state.models
    pool = models.resolve(MODEL_ID).embed_pool
    assert pool is not None
    return pool


def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _another_user(app: ServedApp) -> dict[str, str]:
    """The auth header of a key of a new user (made before a timed request: a user costs a hash)."""
    return new_key(app, new_user(app)["username"])[1]


class Background:
    """An embeddings request on a thread of its own: its response and how long it took."""

    def __init__(self, app: ServedApp, headers: dict[str, str], inputs: Any) -> None:
        self.headers = headers
        self.response: httpx.Response | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(app, inputs))
        self._thread.start()

    def _run(self, app: ServedApp, inputs: Any) -> None:
        started = time.perf_counter()
        self.response = _embed(app, self.headers, inputs, timeout=600)
        self.seconds = time.perf_counter() - started

    def result(self) -> httpx.Response:
        self._thread.join(timeout=600)
        assert self.response is not None
        return self.response


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


def _timed(app: ServedApp, headers: dict[str, str], inputs: Any) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = _embed(app, headers, inputs)
    return response, time.perf_counter() - started


def test_a_large_request_does_not_hold_back_another_users_small_one(app: ServedApp) -> None:
    _, small_headers = new_key(app, new_user(app)["username"])
    alone, alone_s = _timed(app, small_headers, "hello")
    big = Background(app, _another_user(app), [MEDIUM_INPUT] * 12)
    _until(lambda: _embed_pool(app).busy == 1)
    time.sleep(1.0)  # the big request is running its turns
    small, small_s = _timed(app, small_headers, "hello")
    assert big.result().status_code == 200 and small.status_code == 200 and alone.status_code == 200
    assert len(big.result().json()["data"]) == 12
    print(
        f"\nembeddings fairness: 12 x ~90-token request {big.seconds:.2f} s; another user's 1-token request "
        f"{alone_s:.3f} s alone, {small_s:.3f} s during it"
    )
    # the small request waited for at most a turn or two of the big one, not for all twelve inputs
    assert small_s < big.seconds / 3, (small_s, big.seconds)


def test_embeddings_count_against_concurrency(app: ServedApp) -> None:
    _, headers = new_key(app, new_user(app)["username"], concurrency=1)
    big = Background(app, headers, [MEDIUM_INPUT] * 4)
    _until(lambda: _embed_pool(app).busy == 1)  # admitted (admission comes before the first turn)
    second = _embed(app, headers, "hello")
    assert big.response is None, "the first request ended too soon to show anything"
    assert second.status_code == 429, second.text
    assert second.json()["error"]["type"] == "concurrency" and int(second.headers["retry-after"]) >= 1
    assert big.result().status_code == 200
    assert _embed(app, headers, "hello").status_code == 200  # the slot came back


def test_a_full_embedding_queue_refuses_a_new_request_at_once(tight: Tight) -> None:
    pool = _embed_pool(tight.app)
    users = [_another_user(tight.app) for _ in range(4)]
    running, waiting = (Background(tight.app, users[i], [MEDIUM_INPUT] * 6) for i in (0, 1))
    _until(lambda: pool.busy == 1 and pool.waiting == 1)  # they take turns: one runs, one waits
    singles = [Background(tight.app, users[i], "hello") for i in (2, 3)]  # one queued, one refused
    statuses = sorted(single.result().status_code for single in singles)
    assert statuses == [200, 503], statuses
    refused = next(single for single in singles if single.result().status_code == 503)
    assert refused.result().json()["error"]["code"] == "queue_full"
    assert int(refused.result().headers["retry-after"]) >= 1
    assert refused.seconds < tight.wait_s / 2, refused.seconds  # at once, not after a wait
    for started in (running, waiting):  # the requests already in the rotation are never refused
        assert started.result().status_code == 200 and len(started.result().json()["data"]) == 6


def test_a_new_request_waits_at_most_the_wait_limit(tight: Tight) -> None:
    users = [_another_user(tight.app) for _ in range(2)]
    long_turn = Background(tight.app, users[0], VERY_LONG_INPUT)
    _until(lambda: _embed_pool(tight.app).busy == 1)
    late = Background(tight.app, users[1], "hello")  # behind a turn that lasts longer than the wait limit
    assert late.result().status_code == 503, late.result().text
    assert late.result().json()["error"]["code"] == "queue_timeout"
    assert tight.wait_s <= late.seconds < tight.wait_s + 2, late.seconds
    assert long_turn.result().status_code == 200


def test_a_started_request_is_never_refused_after_its_first_turn(tight: Tight) -> None:
    """Each turn queues again behind whoever waits. Before, each turn was a new request to the queue: a
    later turn waiting behind another user's long turn longer than ``queue.max_wait_s`` got 503, and
    the turns that had run were thrown away. Now only the first turn is admitted or refused."""
    users = [_another_user(tight.app) for _ in range(2)]
    many_short = Background(tight.app, users[0], [MEDIUM_INPUT] * 4)
    _until(lambda: _embed_pool(tight.app).busy == 1)
    long_turn = Background(tight.app, users[1], VERY_LONG_INPUT)  # a turn longer than the wait limit
    answer = many_short.result()
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"]) == 4
    assert long_turn.result().status_code == 200
    assert many_short.seconds > tight.wait_s  # it did wait behind a long turn


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
