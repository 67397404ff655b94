"""Running a chat request with tools on an engine, parsing its answer as a stream (shared by the tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.base import Cancellation, Finished, GenerationParams, TokenEvent
from engine.llamacpp.batched import BatchedEngine
from engine.tools import ArgumentsDelta, ContentDelta, ToolCallParser, ToolCallStart, ToolOutput, ToolRequest


async def answer(
    engine: BatchedEngine,
    slot: int,
    messages: Sequence[Mapping[str, Any]],
    request: ToolRequest,
    max_tokens: int = 48,
) -> ToolOutput:
    """Generate under the tool grammar, parsing as a stream; check the stream says what the whole does."""
    prompt = engine.tool_prompt(messages, request)
    parser = ToolCallParser(calls_allowed=prompt.calls_allowed)
    deltas = []
    params = GenerationParams(max_tokens=max_tokens, temperature=0, grammar=prompt.grammar)
    finished = None
    async for event in engine.generate(slot, engine.tokenize(prompt.text), params, Cancellation()):
        if isinstance(event, TokenEvent):
            deltas += parser.feed(event.text)
        else:
            finished = event
    assert isinstance(finished, Finished)
    tail, output = parser.finish(finished.finish_reason)
    deltas += tail
    content = "".join(delta.text for delta in deltas if isinstance(delta, ContentDelta))
    assert content == (output.content or "")
    starts = [delta for delta in deltas if isinstance(delta, ToolCallStart)]
    streamed = [
        "".join(d.text for d in deltas if isinstance(d, ArgumentsDelta) and d.index == i)
        for i in range(len(starts))
    ]
    assert [(s.id, s.name, a) for s, a in zip(starts, streamed, strict=True)][: len(output.calls)] == [
        (call.id, call.name, call.arguments) for call in output.calls
    ]
    return output
