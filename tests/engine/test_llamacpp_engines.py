"""The two llama.cpp engines on the real model: same greedy output, batching, cancellation, KV reuse."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.base import Cancellation, ContextOverflowError, Finished, GenerationParams, TokenEvent
from engine.llamacpp.batched import BatchedEngine
from engine.llamacpp.sequential import SequentialEngine

NO_EOS = {0: -100.0, 1: -100.0, 2: -100.0}
PROMPTS = ["Hello!", "What is the capital of France?", "Write a poem about the sea.", "Tell me a joke."]


@pytest.fixture(scope="module")
def batched(model_path: Path) -> Iterator[BatchedEngine]:
    engine = BatchedEngine(model_path, slots=4, n_ctx_per_slot=1024, n_threads=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def sequential(model_path: Path) -> Iterator[SequentialEngine]:
    engine = SequentialEngine(model_path, slots=1, n_ctx_per_slot=1024, n_threads=2)
    yield engine
    engine.close()


async def _run(
    engine: BatchedEngine | SequentialEngine,
    slot: int,
    prompt: list[int],
    params: GenerationParams,
    cancel: Cancellation | None = None,
    keep: int | None = None,
) -> tuple[str, Finished | None, float]:
    text, finished, started, first = "", None, time.perf_counter(), 0.0
    seen = 0
    async for event in engine.generate(slot, prompt, params, cancel or Cancellation()):
        if isinstance(event, TokenEvent):
            text += event.text
            seen += 1
            first = first or time.perf_counter() - started
            if keep is not None and seen >= keep:
                break
        else:
            finished = event
    return text, finished, first


def _chat(engine: BatchedEngine | SequentialEngine, content: str) -> list[int]:
    return engine.tokenize(engine.render_chat([{"role": "user", "content": content}]))


def test_greedy_output_equals_the_sequential_engine(
    batched: BatchedEngine, sequential: SequentialEngine
) -> None:
    params = GenerationParams(max_tokens=40, temperature=0)
    for slot, content in enumerate(PROMPTS):
        ours = asyncio.run(_run(batched, slot, _chat(batched, content), params))
        reference = asyncio.run(_run(sequential, 0, _chat(sequential, content), params))
        assert ours[0] == reference[0]
        assert ours[1] is not None and reference[1] is not None
        assert ours[1].completion_tokens == reference[1].completion_tokens


def test_greedy_with_logit_bias_equals_the_sequential_engine(
    batched: BatchedEngine, sequential: SequentialEngine
) -> None:
    """The batched engine's argmax shortcut honours logit_bias exactly as a sampler chain does."""

    async def first_token(engine: BatchedEngine | SequentialEngine, prompt: list[int]) -> int:
        async for event in engine.generate(
            0, prompt, GenerationParams(max_tokens=1, temperature=0), Cancellation()
        ):
            if isinstance(event, TokenEvent) and event.token_id >= 0:
                return event.token_id
        raise AssertionError("no token")

    prompt = _chat(batched, "Name a colour.")
    banned = asyncio.run(first_token(batched, prompt))
    assert banned == asyncio.run(first_token(sequential, prompt))
    # the favourite first token banned, EOS banned, and a nudge to an arbitrary token: another answer
    params = GenerationParams(max_tokens=24, temperature=0, logit_bias={**NO_EOS, banned: -100.0, 314: 2.5})
    plain = asyncio.run(_run(batched, 0, prompt, GenerationParams(max_tokens=24, temperature=0)))
    ours = asyncio.run(_run(batched, 1, prompt, params))
    reference = asyncio.run(_run(sequential, 0, prompt, params))
    assert ours[0] == reference[0]
    assert ours[0] != plain[0]
    assert ours[1] is not None and ours[1].completion_tokens == 24


def test_four_sequences_run_together_and_a_late_one_starts_at_once(batched: BatchedEngine) -> None:
    params = GenerationParams(max_tokens=64, temperature=0.8, seed=1, logit_bias=NO_EOS)

    async def main() -> tuple[list[tuple[str, Finished | None, float]], float, float]:
        started = time.perf_counter()
        first = [
            asyncio.create_task(_run(batched, s, _chat(batched, f"Story {s}"), params)) for s in range(3)
        ]
        await asyncio.sleep(0.3)  # the three are decoding now
        late = await _run(batched, 3, _chat(batched, "A late story"), params)
        late_done = time.perf_counter() - started
        results = await asyncio.gather(*first)
        return [*results, late], late_done, time.perf_counter() - started

    results, late_done, all_done = asyncio.run(main())
    for _, finished, _ in results:
        assert finished is not None
        assert finished.finish_reason == "length" and finished.completion_tokens == 64
    # the late sequence did not wait for the first three to finish before starting
    assert results[3][2] < 2.0
    assert late_done <= all_done


def test_cancellation_frees_the_slot_within_a_token(batched: BatchedEngine) -> None:
    long = GenerationParams(max_tokens=900, temperature=0.7, logit_bias=NO_EOS)

    async def main() -> tuple[str, Finished | None, float]:
        cancel = Cancellation()
        await _run(batched, 0, _chat(batched, "A very long story"), long, cancel, keep=3)
        cancel.cancel()
        started = time.perf_counter()
        result = await _run(batched, 0, _chat(batched, "Hi"), GenerationParams(max_tokens=4, temperature=0))
        return result[0], result[1], time.perf_counter() - started

    _, finished, elapsed = asyncio.run(main())
    assert finished is not None and finished.completion_tokens <= 4
    assert elapsed < 3.0  # 900 tokens of the cancelled one would take ~10 s


@pytest.fixture(scope="module")
def exact(model_path: Path) -> Iterator[BatchedEngine]:
    """Flash attention off: greedy output must not depend on what the KV cache held."""
    engine = BatchedEngine(model_path, slots=2, n_ctx_per_slot=1024, n_threads=2, flash_attention=False)
    yield engine
    engine.close()


def test_prefix_reuse_skips_the_cached_prompt_and_keeps_greedy_output(exact: BatchedEngine) -> None:
    batched = exact
    history = "You are a careful assistant. " * 40
    prompt = _chat(batched, history + "Question one?")
    params = GenerationParams(max_tokens=24, temperature=0)
    cold = asyncio.run(_run(batched, 1, prompt, params))
    warm = asyncio.run(_run(batched, 1, prompt, params))
    assert cold[1] is not None and warm[1] is not None
    assert warm[1].cached_tokens >= len(prompt) - 2
    assert warm[0] == cold[0]
    follow_up = _chat(batched, history + "Question two?")
    assert batched.prefix_match(1, follow_up) > len(follow_up) // 2
    reused = asyncio.run(_run(batched, 1, follow_up, params))
    assert reused[1] is not None and reused[1].cached_tokens > len(follow_up) // 2


def test_seeded_sampling_reproduces_and_grammar_holds(batched: BatchedEngine) -> None:
    params = GenerationParams(max_tokens=20, temperature=0.9, seed=42)
    one = asyncio.run(_run(batched, 2, _chat(batched, "Invent a word."), params))
    two = asyncio.run(_run(batched, 3, _chat(batched, "Invent a word."), params))
    assert one[0] == two[0]
    grammar = batched.grammar_for("json_object", None)
    structured = asyncio.run(
        _run(
            batched,
            2,
            _chat(batched, 'Reply with the JSON object {"name": "Tom", "legs": 4}.'),
            GenerationParams(max_tokens=200, temperature=0, grammar=grammar),
        )
    )
    assert isinstance(json.loads(structured[0]), dict)


def test_logprobs_and_stops(batched: BatchedEngine) -> None:
    params = GenerationParams(max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, logit_bias=NO_EOS)

    async def events() -> list[TokenEvent]:
        out = []
        async for event in batched.generate(0, _chat(batched, "Hi"), params, Cancellation()):
            if isinstance(event, TokenEvent) and event.token_id >= 0:
                out.append(event)
        return out

    tokens = asyncio.run(events())
    assert len(tokens) == 8
    assert all(t.logprob is not None and t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
    text, finished, _ = asyncio.run(
        _run(
            batched,
            0,
            _chat(batched, "Write a poem about the sea."),
            GenerationParams(max_tokens=40, temperature=0, stop=("the",)),
        )
    )
    assert finished is not None and finished.finish_reason == "stop" and "the" not in text


def test_context_overflow_is_an_engine_error(batched: BatchedEngine) -> None:
    with pytest.raises(ContextOverflowError):
        asyncio.run(_run(batched, 0, list(range(10, 1000)), GenerationParams(max_tokens=100)))
