"""Soak: minutes of mixed load in waves; memory, file descriptors and asyncio tasks must not grow.

Not part of the default run (marker ``soak``): ``SOAK_MINUTES=10 python -m pytest -m soak``.
The server runs in this process (its event loop in a thread), so its tasks can be counted; the
client of each wave is closed before measuring, so its sockets do not count.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import ServedApp, make_settings, serve
from tests.reliability.traffic_support import format_summary, plan_roles, run_wave, summarize

pytestmark = pytest.mark.soak  # not `reliability`: `-m reliability` must stay bounded

MINUTES = float(os.environ.get("SOAK_MINUTES", "10"))
WAVE_CLIENTS = 40
MAX_RSS_GROWTH = 0.05


@pytest.fixture(scope="module")
def soaked(model_path: Path) -> Iterator[ServedApp]:
    del model_path
    settings = make_settings(
        model={"slots": 4, "n_ctx": 4 * 512},
        # the wait limit is far above what a wave needs, so only a starved machine could time one out
        queue={"max_queue": 16, "max_wait_s": 600.0, "ping_interval_s": 0.2},
    )
    with serve(settings) as app:
        yield app


def _server_tasks(app: ServedApp) -> int:
    loop = app.server.servers[0].get_loop()

    async def count() -> int:
        return len(asyncio.all_tasks())

    return asyncio.run_coroutine_threadsafe(count(), loop).result(10)


def _measure(app: ServedApp) -> dict[str, float]:
    state = app.wait_idle(5.0)
    assert (state["busy"], state["queued"]) == (0, 0), state
    process = psutil.Process()
    return {
        "rss_mb": process.memory_info().rss / 2**20,
        "fds": process.num_fds(),
        "tasks": _server_tasks(app),
    }


@pytest.mark.timeout(int(MINUTES * 60) + 600)
def test_soak(soaked: ServedApp) -> None:
    rng = random.Random(11)
    waves: list[dict[str, float]] = []
    totals = {"requests": 0, "completed": 0, "refused": 0, "dropped": 0}

    def wave(index: int) -> None:
        roles = plan_roles(WAVE_CLIENTS, rng)
        outcomes = asyncio.run(
            run_wave(
                soaked.base_url,
                soaked.headers,
                roles,
                max_tokens=rng.choice((8, 16, 32)),
                spread_s=3.0,
                seed=index,
                first_index=index * WAVE_CLIENTS,
            )
        )
        summary = summarize(outcomes)
        problems = [o for o in outcomes if o.problems]
        assert not problems, problems[:3]
        totals["requests"] += len(outcomes)
        totals["completed"] += summary["completed"]
        totals["refused"] += summary["refused_503_429"]
        totals["dropped"] += summary["dropped_mid_stream"] + summary["dropped_queued"]

    # warm-up: allocator pools, KV caches and connection handling settle before the baseline
    for index in range(2):
        wave(index)
    baseline = _measure(soaked)
    started = time.monotonic()
    index = 2
    while time.monotonic() - started < MINUTES * 60:
        wave(index)
        index += 1
        if index % 5 == 0:
            waves.append(_measure(soaked))
    final = _measure(soaked)
    growth = final["rss_mb"] / baseline["rss_mb"] - 1
    print(
        "\n"
        + format_summary(
            f"soak: {MINUTES:g} min, {index} waves of {WAVE_CLIENTS} clients",
            {
                **totals,
                "rss_baseline_mb": baseline["rss_mb"],
                "rss_final_mb": final["rss_mb"],
                "rss_peak_mb": max([final["rss_mb"], *(w["rss_mb"] for w in waves)]),
                "rss_growth_pct": growth * 100,
                "fds_baseline": baseline["fds"],
                "fds_final": final["fds"],
                "tasks_baseline": baseline["tasks"],
                "tasks_final": final["tasks"],
            },
        )
    )
    assert growth < MAX_RSS_GROWTH, (baseline, final)
    assert final["fds"] <= baseline["fds"], (baseline, final)
    assert final["tasks"] <= baseline["tasks"], (baseline, final)
