"""Property: for generated function schemas, every call the real model makes validates (issue 15)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.llamacpp.batched import BatchedEngine
from engine.tools import FunctionChoice, FunctionTool, ToolRequest
from tests.engine.tool_runs_support import answer

SCHEMAS_PER_EXAMPLE = 8
EXAMPLES = 25  # 200 schemas
BUDGET = 96  # max_tokens: the call marker and name take ~15, random property names ~3 each

names = st.from_regex(r"[a-z][a-z_]{0,9}", fullmatch=True)
bound = st.integers(-1000, 1000)


@st.composite
def integers(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    low, high = sorted((draw(bound), draw(bound)))
    if draw(st.booleans()):
        schema["exclusiveMinimum" if draw(st.booleans()) and low < high - 1 else "minimum"] = low
    if draw(st.booleans()):
        schema["exclusiveMaximum" if draw(st.booleans()) and low < high - 1 else "maximum"] = high
    return schema


@st.composite
def numbers(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number"}
    low, high = sorted((draw(bound) / 4, draw(bound) / 4))
    if draw(st.booleans()):
        schema["exclusiveMinimum" if draw(st.booleans()) and low < high else "minimum"] = low
    if draw(st.booleans()):
        schema["exclusiveMaximum" if draw(st.booleans()) and low < high else "maximum"] = high
    return schema


@st.composite
def strings(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if draw(st.integers(0, 3)):  # mostly bounded: unbounded strings mostly run out of budget
        schema["maxLength"] = draw(st.integers(1, 12))
        if draw(st.booleans()):
            schema["minLength"] = draw(st.integers(0, schema["maxLength"]))
    return schema


enums = st.lists(
    st.one_of(st.text(alphabet="abcxyz _", max_size=6), st.integers(-9, 9)),
    min_size=1,
    max_size=4,
    unique=True,
).map(lambda values: {"enum": values})
leaves = st.one_of(strings(), integers(), numbers(), st.just({"type": "boolean"}), enums)


def objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        properties = draw(st.dictionaries(names, children, min_size=1, max_size=4))
        required = draw(st.lists(st.sampled_from(sorted(properties)), unique=True))
        return {"type": "object", "properties": properties, "required": required}

    return build()


@st.composite
def arrays(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": draw(children)}
    low = draw(st.integers(0, 2))
    if draw(st.booleans()):
        schema["minItems"] = low
    if draw(st.booleans()):
        schema["maxItems"] = draw(st.integers(max(low, 1), 3))
    return schema


values = st.recursive(leaves, lambda children: st.one_of(objects(children), arrays(children)), max_leaves=4)
parameters = objects(values)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[BatchedEngine]:
    engine = BatchedEngine(model_path, slots=SCHEMAS_PER_EXAMPLE, n_ctx_per_slot=1024, n_threads=2)
    yield engine
    engine.close()


@pytest.mark.timeout(1800)  # 200 generations: ~3 min on an idle 2-core machine, far more on a busy one
def test_every_call_validates_against_its_generated_schema(engine: BatchedEngine) -> None:
    counts: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(parameters, min_size=SCHEMAS_PER_EXAMPLE, max_size=SCHEMAS_PER_EXAMPLE))
    def check(schemas: list[dict[str, Any]]) -> None:
        async def main() -> None:
            outputs = await asyncio.gather(
                *(
                    answer(
                        engine,
                        index % engine.slots,
                        [{"role": "user", "content": "Call the function with sensible arguments."}],
                        ToolRequest(
                            (FunctionTool(f"f{index}", "A test function.", schema),),
                            FunctionChoice(f"f{index}"),
                            parallel=False,
                        ),
                        max_tokens=BUDGET,
                    )
                    for index, schema in enumerate(schemas)
                )
            )
            for index, (schema, output) in enumerate(zip(schemas, outputs, strict=True)):
                counts["schemas"] += 1
                assert output.content is None
                assert len(output.calls) <= 1
                if output.finish_reason == "length" and not output.calls:  # the budget cut the call
                    assert output.truncated is None or output.truncated.name == f"f{index}"
                    continue
                # (a call can end on the very last token of the budget: "length" with a whole call)
                assert output.finish_reason in ("tool_calls", "length") and len(output.calls) == 1
                assert output.calls[0].name == f"f{index}"
                jsonschema.validate(json.loads(output.calls[0].arguments), schema)
                counts["finished"] += 1

        asyncio.run(main())

    check()
    print(f"tool call property: {counts['finished']} of {counts['schemas']} calls finished and validated")
    assert counts["schemas"] >= EXAMPLES * SCHEMAS_PER_EXAMPLE
    # most calls fit in answer()'s budget, so the property is checked on most schemas, not a few
    assert counts["finished"] >= counts["schemas"] * 0.5, counts
