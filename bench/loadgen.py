"""A streaming load generator for any OpenAI-compatible server.

``concurrency`` clients each send requests back to back until ``total`` requests are done. Each request
streams a chat completion of ``max_tokens`` tokens with end-of-sequence tokens banned (so every complete
stream has exactly ``max_tokens`` tokens) and is timed: time to first content token, end to end, and the
tokens it actually delivered. A stream is complete when it ends with a finish_reason and ``[DONE]`` and
delivered ``max_tokens`` tokens; anything else counts as truncated.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx

# SmolLM2's end-of-turn tokens: banned so that every request generates exactly max_tokens.
NO_EOS = {"0": -100.0, "1": -100.0, "2": -100.0}
TOPICS = [
    "the sea",
    "a lighthouse",
    "winter",
    "a small town",
    "the moon",
    "a train journey",
    "a garden",
    "an old library",
    "the desert",
    "a thunderstorm",
    "a market",
    "the mountains",
    "a river",
    "a clock",
]


@dataclass
class RequestResult:
    """What one streamed request delivered."""

    ttft: float | None
    e2e: float
    tokens: int
    complete: bool
    error: str | None = None


@dataclass
class PhaseResult:
    """One concurrency level against one target."""

    concurrency: int
    wall: float
    results: list[RequestResult] = field(default_factory=list)

    tokens_override: int | None = None
    """For a row merged from several rounds: the tokens of the round whose wall time is kept."""

    @property
    def tokens(self) -> int:
        if self.tokens_override is not None:
            return self.tokens_override
        return sum(r.tokens for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    @property
    def complete(self) -> int:
        return sum(r.complete for r in self.results)

    def pct(self, attr: str, q: float) -> float:
        values = sorted(getattr(r, attr) for r in self.results if getattr(r, attr) is not None)
        if not values:
            return float("nan")
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else values[-1]


def prompt(index: int) -> str:
    """A distinct prompt per request (same set for every target)."""
    return f"Request {index}: write a long, detailed story about {TOPICS[index % len(TOPICS)]}."


async def one_request(client: httpx.AsyncClient, model: str, index: int, max_tokens: int) -> RequestResult:
    """Stream one chat completion and time it."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt(index)}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": NO_EOS,
    }
    started = time.perf_counter()
    first = None
    deltas = 0
    usage = None
    finish = None
    done = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(
                    None, time.perf_counter() - started, 0, False, f"HTTP {response.status_code}"
                )
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(
                        first, time.perf_counter() - started, deltas, False, str(chunk["error"])
                    )
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if choice.get("delta", {}).get("content"):
                        deltas += 1
                        if first is None:
                            first = time.perf_counter() - started
                    finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as exc:
        return RequestResult(first, time.perf_counter() - started, deltas, False, type(exc).__name__)
    tokens = usage if usage is not None else deltas
    complete = done and finish is not None and tokens == max_tokens
    return RequestResult(first, time.perf_counter() - started, tokens, complete)


async def run_phase(
    base_url: str,
    model: str,
    concurrency: int,
    total: int,
    max_tokens: int,
    offset: int = 0,
    headers: dict[str, str] | None = None,
) -> PhaseResult:
    """``concurrency`` clients share ``total`` requests; wall time spans the whole phase."""
    counter = iter(range(offset, offset + total))
    phase = PhaseResult(concurrency, 0.0)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits, headers=headers) as client:

        async def worker() -> None:
            for index in counter:
                phase.results.append(await one_request(client, model, index, max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        phase.wall = time.perf_counter() - started
    return phase
