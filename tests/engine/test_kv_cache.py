"""The batched engine's host-memory KV cache on the real model: sessions beyond the slots, LRU, tenants.

Flash attention is off in these engines: greedy output is then bit-identical whatever the KV cache
held, so a restored session must answer exactly as a cold run does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.base import CacheScope, Cancellation, Finished, GenerationParams, TokenEvent
from engine.kvcache import system_prefix
from engine.llamacpp.batched import MIN_RESTORE_GAIN, BatchedEngine

GREEDY = GenerationParams(max_tokens=24, temperature=0)
ALICE = CacheScope("alice")
BOB = CacheScope("bob")
SYSTEM = "You are the archivist of a small harbour town. Answer briefly and kindly. " * 6


def _story(topic: str) -> str:
    return f"Tell me about {topic}. " + f"Some background on {topic}: it is old, quiet and well kept. " * 25


async def _run(
    engine: BatchedEngine, slot: int, prompt: list[int], scope: CacheScope | None
) -> tuple[str, Finished]:
    text, finished = "", None
    async for event in engine.generate(slot, prompt, GREEDY, Cancellation(), scope):
        if isinstance(event, TokenEvent):
            text += event.text
        else:
            finished = event
    assert finished is not None
    return text, finished


def run(
    engine: BatchedEngine, slot: int, prompt: list[int], scope: CacheScope | None
) -> tuple[str, Finished]:
    return asyncio.run(_run(engine, slot, prompt, scope))


def chat(engine: BatchedEngine, messages: list[dict[str, str]]) -> list[int]:
    return engine.tokenize(engine.render_chat(messages))


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[BatchedEngine]:
    engine = BatchedEngine(
        model_path, slots=2, n_ctx_per_slot=2048, n_threads=2, flash_attention=False, kv_cache_mib=256
    )
    yield engine
    engine.close()


def test_an_evicted_session_comes_back_from_host_memory_with_the_cold_answer(engine: BatchedEngine) -> None:
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _story("the lighthouse")}]
    opening = chat(engine, history)
    assert len(opening) > 400
    reply, first = run(engine, 0, opening, ALICE)
    assert first.cached_tokens == 0
    # two other conversations take both slots: the session's sequence leaves slot 0
    run(engine, 0, chat(engine, [{"role": "user", "content": _story("the market")}]), ALICE)
    run(engine, 1, chat(engine, [{"role": "user", "content": _story("the bakery")}]), ALICE)
    assert engine.prefix_match(0, opening) < 16 and engine.prefix_match(1, opening) < 16
    before = engine.kv_cache_stats()
    assert before.entries >= 1 and before.size_bytes > 0

    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And who lives there?"}]
    second = chat(engine, history)
    text, finished = run(engine, 1, second, ALICE)  # another slot than the one it left
    after = engine.kv_cache_stats()
    assert after.hits == before.hits + 1
    # the opening and the reply came back; only the new turn (and the reply's end) was decoded
    assert finished.cached_tokens >= len(opening)
    assert len(second) - finished.cached_tokens < 40

    # a cold run of the same prompt (a tenant with no entries: nothing is reused) answers the same
    cold_text, cold = run(engine, 0, second, CacheScope("carol"))
    assert cold.cached_tokens == 0
    assert text == cold_text


def test_another_tenant_gets_only_the_shared_system_prefix(engine: BatchedEngine) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _story("the old mill")}]
    prompt = chat(engine, messages)
    run(engine, 0, prompt, ALICE)
    run(engine, 0, chat(engine, [{"role": "user", "content": _story("the river")}]), ALICE)  # stash
    assert engine.prefix_match(0, prompt) < 16
    misses = engine.kv_cache_stats().misses

    # bob's identical prompt does not restore alice's entry, neither from host memory nor her slot
    _, finished = run(engine, 0, prompt, BOB)
    assert finished.cached_tokens == 0
    assert engine.kv_cache_stats().misses == misses + 1
    _, finished = run(engine, 0, prompt, BOB)  # now the slot holds bob's own sequence
    assert finished.cached_tokens >= len(prompt) - 2

    # the system part, rendered by the template, is shared by construction: carol may reuse that much
    shared = system_prefix(
        lambda m: engine.render_chat(m, add_generation_prompt=False), engine.tokenize, messages, prompt
    )
    assert MIN_RESTORE_GAIN <= shared < len(prompt) // 2
    _, finished = run(engine, 1, prompt, CacheScope("carol", shared_prefix=shared))
    assert finished.cached_tokens == shared


def test_the_host_cache_stays_within_its_bound_and_drops_the_least_recently_used(model_path: Path) -> None:
    engine = BatchedEngine(
        model_path, slots=1, n_ctx_per_slot=2048, n_threads=2, flash_attention=False, kv_cache_mib=24
    )
    try:
        prompts = [chat(engine, [{"role": "user", "content": _story(t)}]) for t in ("a", "b", "c", "d", "e")]
        for prompt in prompts:  # each request replaces the single slot's sequence
            run(engine, 0, prompt, ALICE)
        stats = engine.kv_cache_stats()
        assert stats.capacity_bytes == 24 * 1024 * 1024
        assert 0 < stats.size_bytes <= stats.capacity_bytes
        # about 10 MB per sequence: two fit; the slot's sequences were copied on replacement, and
        # maybe once more while the engine was idle (an unchanged sequence is never stored twice)
        assert stats.entries <= 2 and stats.evictions >= 2
        # the most recent stashed sequence comes back, the oldest was evicted
        _, recent = run(engine, 0, prompts[3], ALICE)
        assert recent.cached_tokens >= len(prompts[3]) - 2
        _, oldest = run(engine, 0, prompts[0], ALICE)
        assert oldest.cached_tokens < len(prompts[0]) // 2
        assert engine.kv_cache_stats().size_bytes <= stats.capacity_bytes
    finally:
        engine.close()
