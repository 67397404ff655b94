"""Cached completions: stored form round-trips, replay chunks rebuild the content exactly."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cache.entry import CachedChoice, CachedCompletion, decode_completion, encode_completion


def completion(*texts: str, logprobs: list[dict[str, object] | None] | None = None) -> CachedCompletion:
    return CachedCompletion(
        choices=[
            CachedChoice(index=i, text=t, finish_reason="stop", logprobs=(logprobs or [None] * len(texts))[i])
            for i, t in enumerate(texts)
        ],
        prompt_tokens=5,
        completion_tokens=9,
    )


def joined(value: CachedCompletion, index: int, max_chunks: int = 16) -> str:
    return "".join(c.text for c in value.chunks(max_chunks) if c.index == index)


def test_round_trip() -> None:
    value = completion("Hello there, world.", "Second")
    assert decode_completion(encode_completion(value)) == value
    assert value.total_tokens == 14


@given(st.text(max_size=300), st.integers(1, 20))
def test_chunks_join_to_the_content(content: str, max_chunks: int) -> None:
    value = completion(content)
    chunks = value.chunks(max_chunks)
    assert "".join(c.text for c in chunks) == content
    assert 1 <= len(chunks) <= max_chunks
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]


def test_several_chunks_per_choice_in_order() -> None:
    text = "The quick brown fox jumps over the lazy dog and keeps running far away."
    value = completion(text, "Another answer here")
    chunks = value.chunks(4)
    assert [c.index for c in chunks] == sorted(c.index for c in chunks)
    assert len([c for c in chunks if c.index == 0]) == 4
    assert joined(value, 0, 4) == text and joined(value, 1, 4) == "Another answer here"
    assert chunks[1].text.startswith(("quick", "brown", "fox", "jumps"))  # split between words
    assert len(completion("x" * 40).chunks(5)) == 5  # one long word still streams in pieces


def test_chat_logprobs_follow_tokens() -> None:
    entries: list[dict[str, object]] = [
        {"token": t, "logprob": -0.1, "bytes": None, "top_logprobs": []} for t in ["Hel", "lo", " wor", "ld"]
    ]
    value = completion("Hello world", logprobs=[{"content": entries}])
    chunks = value.chunks(2)
    assert [c.text for c in chunks] == ["Hello", " world"]
    assert [e["token"] for c in chunks for e in (c.logprobs or {})["content"]] == ["Hel", "lo", " wor", "ld"]


def test_legacy_logprobs_follow_tokens() -> None:
    logprobs = {
        "tokens": ["a", "b", "c"],
        "token_logprobs": [-1.0, -2.0, -3.0],
        "top_logprobs": [None, None, None],
        "text_offset": [0, 1, 2],
    }
    value = completion("abc", logprobs=[logprobs])
    chunks = value.chunks(3)
    assert [c.text for c in chunks] == ["a", "b", "c"]
    assert chunks[2].logprobs == {
        "tokens": ["c"],
        "token_logprobs": [-3.0],
        "top_logprobs": [None],
        "text_offset": [2],
    }


@pytest.mark.parametrize("logprobs", [{"content": [{"token": "nope"}]}, {"tokens": ["x"]}, {"other": 1}])
def test_logprobs_that_do_not_spell_the_text_fall_back_to_words(logprobs: dict[str, object]) -> None:
    value = completion("one two three", logprobs=[logprobs])
    assert joined(value, 0) == "one two three"


CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def test_tool_calls_round_trip_and_ride_on_the_last_chunk() -> None:
    value = CachedCompletion(
        choices=[CachedChoice(index=0, text="", finish_reason="tool_calls", tool_calls=[CALL, CALL])],
        prompt_tokens=5,
        completion_tokens=9,
    )
    assert decode_completion(encode_completion(value)) == value
    chunks = value.chunks()
    assert [c.tool_calls for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].tool_calls == [CALL, CALL] and chunks[-1].finish_reason == "tool_calls"


def test_an_entry_stored_before_tool_calls_still_decodes() -> None:
    old = msgspec.msgpack.encode(
        {
            "choices": [{"index": 0, "text": "Hi", "finish_reason": "stop"}],
            "prompt_tokens": 1,
            "completion_tokens": 1,
        }
    )
    assert decode_completion(old).choices[0].tool_calls is None
