"""The pipeline's stages without a model: admission, the cache lookup, replay as pieces, and the release.

(The engine path runs on the real model in tests/api; here a cached answer stands in for the engine.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from auth.principal import Principal
from auth.store import SQLiteStore
from gateway.cache.backend import MemoryCacheBackend
from gateway.cache.entry import CachedChoice, CachedCompletion
from gateway.cache.key import cache_policy
from gateway.cache.service import CacheOutcome, ResponseCache
from gateway.errors import RateLimitExceededError
from gateway.openai.frames import ChatFrames, Piece
from gateway.openai.generation import Job
from gateway.openai.pipeline import Call, Pipeline, Signal, _key_view
from gateway.openai.protocol.chat import ChatCompletionRequest, ChatMessage
from gateway.ratelimit.limiter import LimitSpec, Subject
from gateway.ratelimit.memory import MemoryRateLimiter
from tests.conftest import make_settings
from tests.unit.gateway.openai.shape_support import job

pytestmark = pytest.mark.anyio

USER = Principal("u1", "user1", "user", frozenset({"inference"}), key_id="k1")
REQUEST = ChatCompletionRequest(
    model="m", messages=[ChatMessage(role="user", content="Hi")], temperature=0, max_tokens=8
)
ANSWER = CachedCompletion(
    choices=[CachedChoice(index=0, text="Hello there, friend.", finish_reason="stop")],
    prompt_tokens=3,
    completion_tokens=5,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    store = SQLiteStore(tmp_path)
    settings = make_settings(ratelimit={"key_concurrency": 1, "key_rpm": 3})
    yield Pipeline(settings, MemoryRateLimiter(), ResponseCache(MemoryCacheBackend()), store)
    await store.close()


async def _seed(pipeline: Pipeline) -> None:
    """Store ANSWER under the key the pipeline will look REQUEST up by."""
    j = job()
    found = await pipeline.cache.lookup(
        user=USER.user_id,
        model_id=j.runtime.id,
        model_digest=j.runtime.digest,
        request=_key_view(REQUEST, j.shape, pipeline.settings.limits),
        policy=cache_policy(),
    )
    assert found.outcome is CacheOutcome.MISS and await pipeline.cache.store(found, ANSWER)


def call(on_answer: Any = None, prepared: list[Job] | None = None) -> Call:
    """A call of REQUEST whose preparation (a real job on a one-slot pool) is recorded in ``prepared``."""

    async def prepare() -> Job:
        made = job()
        if prepared is not None:
            prepared.append(made)
        return made

    return Call(REQUEST, USER, ChatFrames(job().shape, "m"), prepare, on_answer=on_answer)


async def _concurrency_is_free(pipeline: Pipeline) -> bool:
    decision = await pipeline.limiter.acquire([Subject("key:k1", LimitSpec(concurrency=1))], tokens=0)
    if decision.allowed and decision.ticket is not None:
        await pipeline.limiter.release(decision.ticket, used_tokens=0)
    return decision.allowed


async def test_a_hit_replays_as_pieces_records_and_releases(pipeline: Pipeline) -> None:
    await _seed(pipeline)
    recorded: list[CachedCompletion] = []

    async def on_answer(answer: CachedCompletion) -> None:
        recorded.append(answer)

    run = await pipeline.start(call(on_answer))
    assert run.hit and run.headers["x-cache"] == "hit"
    assert run.headers["x-ratelimit-remaining-requests"] == "2"
    assert not await _concurrency_is_free(pipeline)  # the run holds the key's only slot
    events = [event async for event in run.events()]
    assert events[0] is Signal.BEGIN and Signal.PING not in events
    pieces = [e for e in events if isinstance(e, Piece)]
    assert len([p for p in pieces if p.text]) >= 3  # a real multi-piece replay
    assert "".join(p.text for p in pieces) == ANSWER.choices[0].text
    last = pieces[-1]
    assert last.finish_reason == "stop" and last.usage is not None and last.usage.total_tokens == 8
    assert recorded == [ANSWER]
    assert run.used_tokens == 0  # a hit charges no tokens
    assert await _concurrency_is_free(pipeline)


async def test_answer_collects_what_events_yield(pipeline: Pipeline) -> None:
    await _seed(pipeline)
    run = await pipeline.start(call())
    assert await run.answer() == ANSWER
    assert await _concurrency_is_free(pipeline)


async def test_a_consumer_that_leaves_early_releases_and_records_nothing(pipeline: Pipeline) -> None:
    await _seed(pipeline)
    recorded: list[CachedCompletion] = []

    async def on_answer(answer: CachedCompletion) -> None:
        recorded.append(answer)

    run = await pipeline.start(call(on_answer))
    async with aclosing(run.events()) as events:
        async for event in events:
            if isinstance(event, Piece):
                break
    assert recorded == []
    assert await _concurrency_is_free(pipeline)


async def test_over_the_limit_nothing_is_looked_up_or_held(pipeline: Pipeline) -> None:
    prepared: list[Job] = []
    for _ in range(3):
        run = await pipeline.start(call(prepared=prepared))
        await run.close()
    assert len(prepared) == 3  # misses prepare their job
    with pytest.raises(RateLimitExceededError) as refused:
        await pipeline.start(call(prepared=prepared))
    assert refused.value.kind == "requests" and refused.value.headers["Retry-After"]
    assert await _concurrency_is_free(pipeline)


async def test_a_hit_needs_no_preparation(pipeline: Pipeline) -> None:
    await _seed(pipeline)
    prepared: list[Job] = []
    run = await pipeline.start(call(prepared=prepared))
    assert run.hit and prepared == []  # neither template nor tokenizer ran
    assert await run.answer() == ANSWER
