"""``response_format: json_schema`` on the real model: every answer is JSON that validates."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from engine.base import Cancellation, Finished, GenerationParams, TokenEvent
from engine.llamacpp.batched import BatchedEngine

NEWLINE = 198  # "\n" in SmolLM2's vocabulary (checked below)
NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[BatchedEngine]:
    engine = BatchedEngine(model_path, slots=2, n_ctx_per_slot=1024, n_threads=2)
    yield engine
    engine.close()


async def _answer(engine: BatchedEngine, content: str, params: GenerationParams) -> tuple[str, Finished]:
    prompt = engine.tokenize(engine.render_chat([{"role": "user", "content": content}]))
    text = ""
    async for event in engine.generate(0, prompt, params, Cancellation()):
        if isinstance(event, TokenEvent):
            text += event.text
        else:
            return text, event
    raise AssertionError("no Finished event")


@pytest.mark.parametrize(
    "content",
    [
        "Give me a JSON object with a name.",
        "Name a famous scientist, as JSON.",
        "Who are you? Answer in JSON.",
    ],
)
def test_schema_strings_never_hold_raw_control_characters(engine: BatchedEngine, content: str) -> None:
    """Issue 15 item 3: a strong push towards "\\n" inside a schema string still gives valid JSON
    (the converter's string rule used to let the raw newline in, and the answer ran to max_tokens)."""
    assert engine.detokenize([NEWLINE]) == "\n"
    grammar = engine.grammar_for("json_schema", NAME_SCHEMA)
    params = GenerationParams(max_tokens=64, temperature=0, grammar=grammar, logit_bias={NEWLINE: 30.0})
    text, finished = asyncio.run(_answer(engine, content, params))
    assert finished.finish_reason == "stop", text
    jsonschema.validate(json.loads(text), NAME_SCHEMA)


def test_bounded_numbers_stay_in_bounds(engine: BatchedEngine) -> None:
    """The converter ignored minimum/maximum; pushing towards large digits must not break the bounds."""
    schema = {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 65},
            "score": {"type": "number", "exclusiveMinimum": -2.5, "maximum": 3},
        },
        "required": ["age", "score"],
    }
    grammar = engine.grammar_for("json_schema", schema)
    nines = engine.tokenize("9", add_special=False)[0]
    params = GenerationParams(max_tokens=64, temperature=0, grammar=grammar, logit_bias={nines: 20.0})
    text, finished = asyncio.run(_answer(engine, "A person's age and score as JSON.", params))
    assert finished.finish_reason == "stop", text
    jsonschema.validate(json.loads(text), schema)
