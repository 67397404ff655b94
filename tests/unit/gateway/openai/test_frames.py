"""The frame builders: SSE chunks and JSON bodies of chat and text completions, from pieces and answers."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from engine.base import TokenEvent, TopLogprob
from gateway.cache.entry import CachedChoice, CachedCompletion
from gateway.openai.frames import ChatFrames, CompletionFrames, Piece, usage_of
from tests.unit.gateway.openai.shape_support import shape


def payload(frame: bytes | None) -> dict[str, Any]:
    assert frame is not None and frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    parsed: dict[str, Any] = json.loads(frame[len(b"data: ") :])
    return parsed


def test_chat_stream_chunks_have_the_openai_shape() -> None:
    frames = ChatFrames(shape(n=2), "alias", include_usage=True)
    heads = [payload(f) for f in frames.head()]
    assert [h["choices"][0]["delta"] for h in heads] == [{"role": "assistant", "content": ""}] * 2
    assert {h["object"] for h in heads} == {"chat.completion.chunk"}
    assert heads[0]["id"].startswith("chatcmpl-") and heads[0]["model"] == "alias"
    assert heads[0]["system_fingerprint"] == "fp_abcdef0123"
    delta = payload(frames.chunk(Piece(1, "Hi")))
    assert delta["choices"] == [
        {"index": 1, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}
    ]
    assert frames.chunk(Piece(0, "")) is None  # nothing to send
    end = payload(frames.chunk(Piece(0, finish_reason="length")))
    assert end["choices"][0]["finish_reason"] == "length" and end["choices"][0]["delta"] == {}
    (usage,) = [payload(f) for f in frames.tail(usage_of(3, 5, 2))]
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    assert list(ChatFrames(shape(), "m").tail(usage_of(1, 1, 0))) == []  # no include_usage, no chunk


def test_completion_stream_echoes_prompts_first() -> None:
    frames = CompletionFrames(shape(n=2, prompts=2, echo=["A", "B"]), "m")
    heads = [payload(f)["choices"][0] for f in frames.head()]
    assert [(h["index"], h["text"]) for h in heads] == [(0, "A"), (1, "A"), (2, "B"), (3, "B")]
    assert payload(frames.chunk(Piece(3, " more")))["choices"][0]["text"] == " more"


def test_json_bodies_from_an_answer() -> None:
    answer = CachedCompletion(
        choices=[CachedChoice(index=0, text="Hello", finish_reason="stop")],
        prompt_tokens=4,
        completion_tokens=2,
    )
    chat = msgspec.to_builtins(ChatFrames(shape(), "m").body(answer, cached_tokens=3))
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hello", "refusal": None}
    assert chat["usage"]["total_tokens"] == 6
    assert chat["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    text = msgspec.to_builtins(CompletionFrames(shape(echo=["Say: "]), "m").body(answer, cached_tokens=0))
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "Say: Hello"


def test_logprobs_of_a_token_and_from_storage_agree() -> None:
    event = TokenEvent("Hi", 7, b"Hi", -0.5, (TopLogprob("Hi", -0.5, [72, 105]),))
    chat = ChatFrames(shape(logprobs=True), "m")
    wire = chat.token_logprobs(event, 0)
    assert chat.stored_logprobs(msgspec.to_builtins(wire)) == wire
    assert ChatFrames(shape(), "m").stored_logprobs(msgspec.to_builtins(wire)) is None  # not asked for
    legacy = CompletionFrames(shape(logprobs=True), "m")
    column = legacy.token_logprobs(event, 5)
    assert msgspec.to_builtins(column) == {
        "tokens": ["Hi"],
        "token_logprobs": [-0.5],
        "top_logprobs": [{"Hi": -0.5}],
        "text_offset": [5],
    }
    assert legacy.stored_logprobs(msgspec.to_builtins(column)) == column
