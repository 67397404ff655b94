"""100 concurrent clients on the real model: streams, JSON, clients that hang up mid-stream or while queued."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL_ID, ServedApp, make_settings, serve
from tests.reliability.traffic_support import format_summary, plan_roles, run_wave, summarize

pytestmark = pytest.mark.reliability

CLIENTS = 100
SLOTS = 4
MAX_QUEUE = 12
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def loaded(model_path: Path) -> Iterator[ServedApp]:
    """Four slots and a queue of 12: 100 clients overflow it, so some are refused.

    The queue wait limit is far above what the admitted work needs (16 requests of 8 tokens), so that
    only a starved machine could make a queued request time out.
    """
    del model_path
    settings = make_settings(
        model={"slots": SLOTS, "n_ctx": SLOTS * 512},
        queue={"max_queue": MAX_QUEUE, "max_wait_s": 300.0, "ping_interval_s": 0.2},
    )
    with serve(settings) as app:
        yield app


def test_hundred_clients_mixed(loaded: ServedApp) -> None:
    roles = plan_roles(CLIENTS, random.Random(7))
    outcomes = asyncio.run(
        run_wave(
            loaded.base_url,
            loaded.headers,
            roles,
            max_tokens=MAX_TOKENS,
            spread_s=5.0,
            seed=7,
            burst=2 * SLOTS,
        )
    )
    summary = summarize(outcomes)
    print("\n" + format_summary(f"load: {CLIENTS} clients, {SLOTS} slots, queue {MAX_QUEUE}", summary))

    # no slot or queue place leaks once the load is over
    state = loaded.wait_idle(2.0)
    assert (state["busy"], state["queued"]) == (0, 0), state

    for outcome in outcomes:
        assert not outcome.problems, outcome
        if outcome.status in (429, 503):
            # a refusal is immediate (queue full), never a timeout, and says when to come back
            assert outcome.error_code in ("queue_full", "rate_limit_exceeded"), outcome
            assert outcome.retry_after is not None and int(outcome.retry_after) >= 1, outcome
            continue
        assert outcome.status == 200, outcome
        if outcome.dropped in ("mid_stream", "queued"):
            continue
        assert outcome.completed, outcome

    # the test exercised what it claims: completions, refusals and both kinds of hang-up
    assert summary["completed_stream"] > 0 and summary["completed_json"] > 0
    assert summary["refused_503_429"] > 0
    assert summary["dropped_mid_stream"] > 0
    assert summary["dropped_queued"] > 0

    # the server is unaffected: a normal request still runs to the end
    after = httpx.post(
        f"{loaded.base_url}/v1/chat/completions",
        headers=loaded.headers,
        timeout=60,
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["message"]["content"]
