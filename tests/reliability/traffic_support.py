"""A load generator for the reliability suites: async httpx clients that stream, wait or walk away.

Each client plays one *role* and returns an ``Outcome`` saying what it saw. The load and soak suites
share it; nothing here asserts: the tests do, on the outcomes.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from tests.conftest import MODEL_ID, NO_EOS

Role = Literal["stream", "json", "drop_mid_stream", "drop_queued"]
CHAT = "/v1/chat/completions"


@dataclass
class Outcome:
    """What one client saw."""

    role: Role
    status: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    completed: bool = False
    """A full answer: JSON with a finish_reason, or a stream with a finish_reason and ``[DONE]``."""
    error_code: str | None = None
    retry_after: str | None = None
    dropped: Literal["mid_stream", "queued", "late"] | None = None
    """Where a dropping client actually hung up (``late``: it never saw the moment it waited for)."""
    problems: list[str] = field(default_factory=list)
    """Anything wrong with a response that should have been fine."""


def chat_body(index: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    """A chat request that runs to ``max_tokens`` (EOS banned), with a prompt unique to ``index``."""
    return {
        "model": MODEL_ID,
        "messages": [
            {"role": "user", "content": f"Request {index}: say something about the number {index}."}
        ],
        "max_tokens": max_tokens,
        "stream": stream,
        "logit_bias": NO_EOS,
        "temperature": 0.7,
    }


async def run_client(http: httpx.AsyncClient, role: Role, index: int, max_tokens: int) -> Outcome:
    """One client's request, played according to ``role``."""
    outcome = Outcome(role)
    started = time.perf_counter()
    try:
        if role == "json":
            await _json(http, index, max_tokens, outcome)
        else:
            await _stream(http, role, index, max_tokens, outcome, started)
    except httpx.HTTPError as exc:
        outcome.problems.append(f"transport error: {type(exc).__name__}: {exc}")
    outcome.latency_s = time.perf_counter() - started
    return outcome


def _refusal(response: httpx.Response, body: bytes, outcome: Outcome) -> None:
    outcome.retry_after = response.headers.get("retry-after")
    try:
        outcome.error_code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        outcome.problems.append(f"{response.status_code} without the error envelope: {body[:200]!r}")


async def _json(http: httpx.AsyncClient, index: int, max_tokens: int, outcome: Outcome) -> None:
    response = await http.post(CHAT, json=chat_body(index, max_tokens, stream=False))
    outcome.status = response.status_code
    if response.status_code != 200:
        _refusal(response, response.content, outcome)
        return
    body = response.json()
    choice = body["choices"][0]
    if choice["finish_reason"] != "length" or body["usage"]["completion_tokens"] != max_tokens:
        outcome.problems.append(f"incomplete answer: {body}")
        return
    outcome.completed = True


async def _stream(
    http: httpx.AsyncClient, role: Role, index: int, max_tokens: int, outcome: Outcome, started: float
) -> None:
    async with http.stream("POST", CHAT, json=chat_body(index, max_tokens, stream=True)) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            _refusal(response, await response.aread(), outcome)
            return
        finish, done, content_tokens = None, False, 0
        async for line in response.aiter_lines():
            if line == ": ping" and role == "drop_queued":
                outcome.dropped = "queued"
                return
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                outcome.error_code = chunk["error"]["code"]
                outcome.problems.append(f"error frame: {chunk['error']}")
                return
            delta = chunk["choices"][0]
            if delta["delta"].get("content"):
                content_tokens += 1
                if outcome.ttft_s is None:
                    outcome.ttft_s = time.perf_counter() - started
                if role == "drop_mid_stream" and content_tokens >= 2:
                    outcome.dropped = "mid_stream"
                    return
            finish = delta.get("finish_reason") or finish
        if role in ("drop_mid_stream", "drop_queued"):
            outcome.dropped = "late"
        if finish == "length" and done:
            outcome.completed = True
        else:
            outcome.problems.append(f"stream ended without finish/[DONE] (finish={finish}, done={done})")


def plan_roles(clients: int, rng: random.Random) -> list[Role]:
    """20% drop mid-stream, 5% drop while queued, the rest split between streaming and JSON."""
    mid, queued = clients * 20 // 100, clients * 5 // 100
    rest = clients - mid - queued
    roles: list[Role] = ["drop_mid_stream"] * mid + ["drop_queued"] * queued
    roles += ["stream"] * (rest // 2) + ["json"] * (rest - rest // 2)
    rng.shuffle(roles)
    return roles


async def run_wave(
    base_url: str,
    headers: dict[str, str],
    roles: list[Role],
    *,
    max_tokens: int,
    spread_s: float,
    seed: int,
    burst: int = 8,
    first_index: int = 0,
) -> list[Outcome]:
    """All ``roles`` as concurrent clients.

    ``burst`` clients arrive at once (filling the slots and starting a queue), then the clients that
    drop while queued (so that they do find a queue with room), then the rest at random over
    ``spread_s`` seconds.
    """
    rng = random.Random(seed)
    delays: list[float] = []
    burst_left = burst
    for role in roles:
        if role == "drop_queued":
            delays.append(0.1)
        elif burst_left:
            burst_left -= 1
            delays.append(0.0)
        else:
            delays.append(rng.uniform(0.2, spread_s))
    limits = httpx.Limits(max_connections=len(roles) + 8, max_keepalive_connections=len(roles) + 8)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=httpx.Timeout(600.0), limits=limits
    ) as http:

        async def delayed(role: Role, index: int) -> Outcome:
            await asyncio.sleep(delays[index])
            return await run_client(http, role, first_index + index, max_tokens)

        return await asyncio.gather(*(delayed(role, i) for i, role in enumerate(roles)))


def percentile(values: list[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts and latency percentiles of a wave."""
    completed = [o for o in outcomes if o.completed]
    refused = [o for o in outcomes if o.status in (429, 503)]
    ttfts = [o.ttft_s for o in completed if o.ttft_s is not None]
    lat = [o.latency_s for o in completed]
    return {
        "clients": len(outcomes),
        "completed": len(completed),
        "completed_stream": sum(1 for o in completed if o.role != "json"),
        "completed_json": sum(1 for o in completed if o.role == "json"),
        "refused_503_429": len(refused),
        "dropped_mid_stream": sum(1 for o in outcomes if o.dropped == "mid_stream"),
        "dropped_queued": sum(1 for o in outcomes if o.dropped == "queued"),
        "problems": sum(1 for o in outcomes if o.problems),
        "latency_p50_s": percentile(lat, 50),
        "latency_p99_s": percentile(lat, 99),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "refusal_latency_max_s": max((o.latency_s for o in refused), default=0.0),
        "refusal_latency_median_s": statistics.median([o.latency_s for o in refused]) if refused else 0.0,
    }


def format_summary(title: str, summary: dict[str, Any]) -> str:
    """One printable block."""
    lines = [f"== {title} =="]
    for key, value in summary.items():
        lines.append(f"  {key:26} {value:.3f}" if isinstance(value, float) else f"  {key:26} {value}")
    return "\n".join(lines)
