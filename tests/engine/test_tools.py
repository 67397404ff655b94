"""Tool calling on the real model: each tool_choice, both formats (generic and template-native)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from engine.llamacpp.batched import BatchedEngine
from engine.tools import (
    FunctionChoice,
    FunctionTool,
    ToolChoice,
    ToolOutput,
    ToolRequest,
)
from tests.engine.tool_runs_support import answer

WEATHER = FunctionTool(
    "get_weather",
    "Get the current weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
)
ADD = FunctionTool(
    "add",
    "Add two integers",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"],
    },
)
TOOLS = (WEATHER, ADD)
SCHEMAS = {tool.name: tool.parameters for tool in TOOLS}
QUESTIONS = ["What is the weather like in Paris?", "What is 2 plus 3?", "Hello, how are you?"]

# A Hermes-style template written for these tests (ChatML turns; tools in the system turn; calls as
# <tool_call> blocks; results as <tool_response> blocks), standing in for a Qwen 2.5 GGUF's own.
HERMES_TEMPLATE = """
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call functions. Their signatures:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Write each call as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user
{% endif %}<tool_response>
{{ message.content }}
</tool_response>
{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>
{% endif %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}
{%- for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% elif message.role != 'system' %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[BatchedEngine]:
    engine = BatchedEngine(model_path, slots=3, n_ctx_per_slot=2048, n_threads=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hermes(model_path: Path) -> Iterator[BatchedEngine]:
    engine = BatchedEngine(
        model_path, slots=1, n_ctx_per_slot=2048, n_threads=2, chat_template=HERMES_TEMPLATE
    )
    yield engine
    engine.close()


def run_all(
    engine: BatchedEngine, request: ToolRequest, questions: Sequence[str] = QUESTIONS
) -> list[ToolOutput]:
    async def main() -> list[ToolOutput]:
        return await asyncio.gather(
            *(
                answer(engine, slot % engine.slots, [{"role": "user", "content": question}], request)
                for slot, question in enumerate(questions)
            )
        )

    return asyncio.run(main())


def assert_valid_calls(output: ToolOutput, names: Sequence[str]) -> None:
    for call in output.calls:
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    if output.calls and output.finish_reason != "length":
        assert output.finish_reason == "tool_calls"


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("choice", ["required", FunctionChoice("add")], ids=["required", "named"])
def test_required_and_named_always_call_an_offered_function(
    engine: BatchedEngine, choice: ToolChoice, parallel: bool
) -> None:
    names = ["add"] if isinstance(choice, FunctionChoice) else [tool.name for tool in TOOLS]
    for output in run_all(engine, ToolRequest(TOOLS, choice, parallel)):
        assert output.content is None
        assert output.calls or output.truncated, "a forced call must at least begin"
        if output.finish_reason != "length":
            assert output.finish_reason == "tool_calls" and output.calls
        if not parallel:
            assert len(output.calls) <= 1
        assert_valid_calls(output, names)


def test_none_never_calls(engine: BatchedEngine) -> None:
    prompt = engine.tool_prompt([{"role": "user", "content": "Hi"}], ToolRequest(TOOLS, "none"))
    assert prompt.grammar is None and "get_weather" not in prompt.text
    for output in run_all(engine, ToolRequest(TOOLS, "none")):
        assert output.calls == () and output.truncated is None
        assert output.content and output.finish_reason in ("stop", "length")


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_replies_or_calls_and_every_call_validates(engine: BatchedEngine, parallel: bool) -> None:
    questions = [*QUESTIONS, "Call get_weather for Rome.", "Use the add tool on 4 and 5."]
    outputs = run_all(engine, ToolRequest(TOOLS, "auto", parallel), questions)
    for output in outputs:
        assert not (output.content and (output.calls or output.truncated))  # text or calls, never both
        if not parallel:
            assert len(output.calls) <= 1
        assert_valid_calls(output, [tool.name for tool in TOOLS])


def test_a_two_step_loop_reads_the_result_back(engine: BatchedEngine) -> None:
    """Call, then the tool's result as a ``tool`` message, then a final answer in text."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather like in Paris?"}]
    first = asyncio.run(
        answer(engine, 0, messages, ToolRequest(TOOLS, FunctionChoice("get_weather"), parallel=False))
    )
    assert first.finish_reason == "tool_calls"
    call = first.calls[0]
    messages.append({"role": "assistant", "content": None, "tool_calls": [call.openai()]})
    messages.append(
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 31, "sky": "clear"}'}
    )
    prompt = engine.tool_prompt(messages, ToolRequest(TOOLS, "auto"))
    assert call.arguments in prompt.text and "<tool_response>" in prompt.text
    final = asyncio.run(answer(engine, 0, messages, ToolRequest(TOOLS, "none"), max_tokens=40))
    assert final.content and final.calls == ()


def test_smollm2_template_knows_no_tools_so_the_format_is_generic(engine: BatchedEngine) -> None:
    assert engine.tool_format == "generic"
    prompt = engine.tool_prompt([{"role": "user", "content": "Hi"}], ToolRequest(TOOLS))
    assert prompt.tool_format == "generic"
    assert prompt.text.startswith("<|im_start|>system\nYou can call functions.")


def test_a_template_that_renders_tools_is_used_natively(hermes: BatchedEngine) -> None:
    assert hermes.tool_format == "hermes"
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "What is 2 plus 3?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_9", "content": "5"},
        {"role": "user", "content": "And the weather in Oslo?"},
    ]
    prompt = hermes.tool_prompt(history, ToolRequest(TOOLS, "required", parallel=False))
    assert prompt.tool_format == "hermes"
    assert "<tools>" in prompt.text and "You can call functions" not in prompt.text
    assert '{"name": "add", "arguments": {"a": 2, "b": 3}}' in prompt.text  # arguments as an object
    assert "<tool_response>\n5\n</tool_response>" in prompt.text
    output = asyncio.run(answer(hermes, 0, history, ToolRequest(TOOLS, "required", parallel=False)))
    assert len(output.calls) == 1 and output.finish_reason == "tool_calls"
    assert_valid_calls(output, [tool.name for tool in TOOLS])
    plain = hermes.tool_prompt(history, ToolRequest(TOOLS, "none"))
    assert "<tools>" not in plain.text and plain.grammar is None
