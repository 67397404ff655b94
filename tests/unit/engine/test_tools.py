"""The tool call parser (whole and streamed) and the prompts for templates that know no tools."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.tools import (
    ArgumentsDelta,
    ContentDelta,
    FunctionChoice,
    FunctionTool,
    ToolCallFormatError,
    ToolCallParser,
    ToolCallStart,
    ToolDelta,
    ToolRequest,
    ToolSpecError,
    format_call,
    generic_messages,
    parse_tool_output,
    template_messages,
)

WEATHER = FunctionTool("get_weather", "Weather in a city", {"type": "object", "properties": {}})
ADD = FunctionTool("add", "Add", {"type": "object", "properties": {"a": {"type": "integer"}}})
TRICKY = {"s": 'a "quoted" } ] { [ \\ brace', "n": [1, {"x": None}], "u": "\u00e9\u2028"}


def _calls_text(*calls: tuple[str, object]) -> str:
    return "\n".join(format_call(name, arguments) for name, arguments in calls)


def _stream(text: str, sizes: list[int], *, calls_allowed: bool = True) -> list[ToolDelta]:
    parser = ToolCallParser(calls_allowed=calls_allowed)
    deltas: list[ToolDelta] = []
    position = 0
    for size in sizes:
        deltas += parser.feed(text[position : position + size])
        position += size
    deltas += parser.feed(text[position:])
    deltas += parser.finish("stop")[0]
    return deltas


def _assemble(deltas: list[ToolDelta]) -> tuple[str, list[dict[str, str]]]:
    """Merge deltas the way the openai SDK's stream helpers merge ``delta.tool_calls``."""
    content, calls = "", list[dict[str, str]]()
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            content += delta.text
        elif isinstance(delta, ToolCallStart):
            assert delta.index == len(calls) and delta.id.startswith("call_")
            calls.append({"id": delta.id, "name": delta.name, "arguments": ""})
        else:
            calls[delta.index]["arguments"] += delta.text
    return content, calls


def test_a_plain_reply_is_content_and_finishes_as_stop() -> None:
    output = parse_tool_output("Hello <b>there</b>", "stop")
    assert output.content == "Hello <b>there</b>"
    assert output.calls == ()
    assert output.finish_reason == "stop"


def test_a_reply_that_is_a_prefix_of_the_marker_is_released_at_the_end() -> None:
    parser = ToolCallParser()
    assert parser.feed("<tool") == []  # could still become a call
    deltas, output = parser.finish("length")
    assert deltas == [ContentDelta("<tool")]
    assert output.content == "<tool" and output.finish_reason == "length"


def test_calls_are_parsed_with_ids_and_json_arguments() -> None:
    text = _calls_text(("get_weather", {"city": "Paris"}), ("add", TRICKY))
    output = parse_tool_output(text, "stop")
    assert output.content is None
    assert output.finish_reason == "tool_calls"
    assert [call.name for call in output.calls] == ["get_weather", "add"]
    assert json.loads(output.calls[0].arguments) == {"city": "Paris"}
    assert json.loads(output.calls[1].arguments) == TRICKY
    assert len({call.id for call in output.calls}) == 2
    assert output.calls[0].openai()["type"] == "function"


@given(st.lists(st.integers(min_value=1, max_value=7), max_size=60))
def test_any_chunking_streams_the_same_calls(sizes: list[int]) -> None:
    text = _calls_text(("get_weather", {"city": "Paris"}), ("add", TRICKY))
    content, calls = _assemble(_stream(text, sizes))
    assert content == ""
    whole = parse_tool_output(text, "stop").calls
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (call.name, json.loads(call.arguments)) for call in whole
    ]


def test_a_space_after_the_arguments_is_not_part_of_them() -> None:
    """The schema grammar ends a value with an optional space (found by the property test)."""
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1} }\n</tool_call>'
    for sizes in ([len(text)], [1] * len(text)):
        _, calls = _assemble(_stream(text, sizes))
        assert calls[0]["arguments"] == '{"a": 1}'
    assert parse_tool_output(text, "stop").finish_reason == "tool_calls"


def test_a_call_starts_with_its_name_and_empty_arguments_then_fragments() -> None:
    text = _calls_text(("get_weather", {"city": "Paris"}))
    deltas = _stream(text, [1] * len(text))
    assert isinstance(deltas[0], ToolCallStart) and deltas[0].name == "get_weather" and deltas[0].index == 0
    fragments = [delta for delta in deltas[1:] if isinstance(delta, ArgumentsDelta)]
    assert len(fragments) == len('{"city": "Paris"}')  # one per character fed: streamed as written
    assert "".join(fragment.text for fragment in fragments) == '{"city": "Paris"}'


def test_reply_text_streams_as_soon_as_it_cannot_be_a_call() -> None:
    parser = ToolCallParser()
    assert parser.feed("<t") == []
    assert parser.feed("x") == [ContentDelta("<tx")]
    assert parser.feed(" more") == [ContentDelta(" more")]


def test_a_call_cut_by_length_is_reported_as_truncated_not_as_a_call() -> None:
    text = _calls_text(("get_weather", {"city": "Paris"}), ("add", {"a": 1}))
    cut = text[: text.rindex('"a"') + 3]
    output = parse_tool_output(cut, "length")
    assert [call.name for call in output.calls] == ["get_weather"]
    assert output.finish_reason == "length"
    assert output.truncated is not None and output.truncated.name == "add"
    assert output.truncated.arguments == '{"a"'


def test_a_cut_before_the_next_name_leaves_nothing_truncated() -> None:
    text = _calls_text(("get_weather", {"city": "Paris"})) + '\n<tool_call>\n{"na'
    output = parse_tool_output(text, "length")
    assert len(output.calls) == 1 and output.truncated is None and output.finish_reason == "length"


def test_with_calls_not_allowed_everything_is_content() -> None:
    text = _calls_text(("get_weather", {"city": "Paris"}))
    output = parse_tool_output(text, "stop", calls_allowed=False)
    assert output.content == text and output.calls == () and output.finish_reason == "stop"


def test_text_outside_the_syntax_is_an_error_not_a_wrong_call() -> None:
    with pytest.raises(ToolCallFormatError):
        parse_tool_output('<tool_call>\n{"function": "x"}', "stop")


def test_tool_request_is_checked() -> None:
    with pytest.raises(ToolSpecError):
        ToolRequest((WEATHER, WEATHER))
    with pytest.raises(ToolSpecError):
        ToolRequest((WEATHER,), FunctionChoice("add"))
    with pytest.raises(ToolSpecError):
        ToolRequest((), "required")
    assert not ToolRequest((WEATHER,), "none").calls_allowed
    assert ToolRequest((WEATHER,), FunctionChoice("get_weather")).calls_allowed


HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}],
    },
    {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "2"},
]


def test_generic_messages_describe_tools_and_render_the_history_as_text() -> None:
    rendered = generic_messages(HISTORY, ToolRequest((WEATHER, ADD), "required", parallel=False))
    assert [message["role"] for message in rendered] == ["system", "user", "assistant", "user"]
    system = rendered[0]["content"]
    assert system.startswith("Be brief.\n\n") and '"name": "get_weather"' in system
    assert "You must call a function." in system and "at most one" in system
    assert rendered[1]["content"] == "Weather in Paris?"
    # the history's calls are in exactly the syntax the model writes, so it reads back the same
    assert parse_tool_output(rendered[2]["content"], "stop").calls[1].arguments == '{"a": 1}'
    assert (
        rendered[3]["content"]
        == "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n2\n</tool_response>"
    )


def test_generic_messages_without_calls_allowed_describe_no_tools() -> None:
    rendered = generic_messages(HISTORY[1:], ToolRequest((WEATHER,), "none"))
    assert rendered[0]["role"] == "user"
    assert all("You can call functions" not in message["content"] for message in rendered)


def test_template_messages_give_templates_arguments_as_objects() -> None:
    rendered = template_messages(HISTORY)
    assert rendered[2]["content"] == ""
    assert rendered[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert rendered[3] == {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}
    assert HISTORY[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # not mutated
