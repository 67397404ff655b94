"""The Responses API without a model: input items, chat messages, refusals, and the event/object builder
(every event read by the ``openai`` SDK's own classes, strictly)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from engine.tools import CALL_CLOSE, CALL_OPEN
from gateway.cache.entry import CachedChoice, CachedCompletion
from gateway.errors import InvalidRequestError, ServiceUnavailableError
from gateway.openai.frames import Piece, usage_of
from gateway.openai.responses.convert import chat_messages, check_supported, input_items, tool_request
from gateway.openai.responses.frames import ResponseFrames
from gateway.openai.responses.protocol import ResponseObject, ResponseRequest
from tests.unit.gateway.openai.shape_support import shape

EVENTS: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)
TOOL = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}


def request(**fields: Any) -> ResponseRequest:
    return msgspec.convert({"model": "m", "input": "hi", **fields}, ResponseRequest)


def template(**fields: Any) -> ResponseObject:
    values: dict[str, Any] = {
        "id": "",
        "created_at": 0,
        "status": "in_progress",
        "instructions": None,
        "max_output_tokens": None,
        "model": "m",
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        **fields,
    }
    return ResponseObject(**values)


def events(data: bytes | None) -> list[ResponseStreamEvent]:
    """The SDK's events of SSE frames (``event:`` must name each ``data:``'s type)."""
    parsed = []
    for block in (data or b"").decode().split("\n\n"):
        if not block:
            continue
        name, body = block.split("\n")
        event = EVENTS.validate_python(json.loads(body.removeprefix("data: ")), strict=True)
        assert name == f"event: {event.type}"
        parsed.append(event)
    return parsed


def answer(text: str, finish: str = "stop") -> CachedCompletion:
    return CachedCompletion(
        choices=[CachedChoice(index=0, text=text, finish_reason=finish)],
        prompt_tokens=10,
        completion_tokens=5,
    )


def stream(frames: ResponseFrames, pieces: list[str], finish: str = "stop") -> list[ResponseStreamEvent]:
    """What a streamed run sends: head, the pieces, ``finish`` (the pipeline's ``on_answer``), the end."""
    seen = [event for head in frames.head() for event in events(head)]
    for text in pieces:
        seen += events(frames.chunk(Piece(0, text)))
    frames.finish(answer("".join(pieces), finish), cached_tokens=7)
    seen += events(frames.chunk(Piece(0, finish_reason=finish, usage=usage_of(10, 5, 7))))
    return seen


def test_text_streams_as_one_message_and_ends_completed() -> None:
    frames = ResponseFrames(shape(), template(), calls_allowed=False)
    seen = stream(frames, ["Hel", "lo", " there"])
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    assert [e.type for e in seen] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = seen[-1]
    assert final.type == "response.completed"
    assert final.response.output_text == "Hello there" and final.response.id == frames.id
    assert final.response.usage is not None and final.response.usage.input_tokens_details.cached_tokens == 7
    body = Response.model_validate(msgspec.to_builtins(frames.body(answer("ignored"), 0)), strict=True)
    assert body == final.response  # the JSON body is the streamed final response


def test_calls_stream_as_function_call_items_with_the_same_ids_as_the_final_object() -> None:
    frames = ResponseFrames(shape(), template(), calls_allowed=True)
    first = CALL_OPEN + '{"name": "f", "arguments": {"a": 1}}' + CALL_CLOSE
    second = "\n" + CALL_OPEN + '{"name": "g", "arguments": {}}' + CALL_CLOSE
    text = first + second
    seen = stream(frames, [text[:9], text[9:30], text[30:]])
    added = [e for e in seen if e.type == "response.output_item.added"]
    assert [e.item.type for e in added] == ["function_call", "function_call"]
    assert [e.output_index for e in added] == [0, 1]
    done = [e for e in seen if e.type == "response.function_call_arguments.done"]
    assert [(e.name, e.arguments) for e in done] == [("f", '{"a": 1}'), ("g", "{}")]
    for index, event in enumerate(done):
        deltas = [
            e.delta
            for e in seen
            if e.type == "response.function_call_arguments.delta" and e.item_id == event.item_id
        ]
        assert "".join(deltas) == event.arguments and added[index].item.id == event.item_id
    final = seen[-1]
    assert final.type == "response.completed"
    calls = final.response.output
    assert [(c.type, c.name, c.id) for c in calls] == [  # type: ignore[union-attr]
        ("function_call", "f", added[0].item.id),
        ("function_call", "g", added[1].item.id),
    ]
    assert [c.call_id for c in calls] == [a.item.call_id for a in added]  # type: ignore[union-attr]


def test_a_json_answer_is_parsed_whole_and_length_is_incomplete() -> None:
    frames = ResponseFrames(shape(), template(), calls_allowed=True)
    final = frames.body(answer("Plain text, cut", "length"), cached_tokens=0)
    parsed = Response.model_validate(msgspec.to_builtins(final), strict=True)
    assert parsed.status == "incomplete" and parsed.incomplete_details is not None
    assert parsed.incomplete_details.reason == "max_output_tokens"
    assert parsed.output_text == "Plain text, cut" and parsed.output[0].status == "incomplete"  # type: ignore[union-attr]
    empty = ResponseFrames(shape(), template(), calls_allowed=False).body(answer(""), 0)
    plain = msgspec.to_builtins(empty.output)
    assert [(i["type"], i["content"][0]["text"]) for i in plain] == [("message", "")]  # an empty message


def test_a_failure_is_response_failed_after_created_and_an_error_event_before() -> None:
    error = ServiceUnavailableError("queue timed out", code="queue_timeout")
    before = events(ResponseFrames(shape(), template(), calls_allowed=False).error(error))
    assert before[0].type == "error" and before[0].code == "queue_timeout"
    frames = ResponseFrames(shape(), template(), calls_allowed=False)
    list(frames.head())
    failed = events(frames.error(error))[0]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error is not None and failed.response.error.message == "queue timed out"


def test_input_items_and_the_chat_messages_they_make() -> None:
    items = input_items(
        [
            {"role": "developer", "content": "Be brief."},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
            },
            {"role": "assistant", "content": "Let me look."},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "g", "arguments": '{"x": 1}'},
            {"type": "function_call_output", "call_id": "c1", "output": "one"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [{"type": "input_text", "text": "two"}],
            },
        ]
    )
    assert len({item.id for item in items}) == len(items)  # ids given where none was sent
    messages = chat_messages(items, "System.")
    assert messages == [
        {"role": "system", "content": "System."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ab"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    assert chat_messages(input_items("hello"), None) == [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"tools": [{"type": "web_search_preview"}]}, "built-in tool `web_search_preview`"),
        ({"tools": [TOOL, TOOL]}, "unique"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "not in tools"),
        ({"tools": [TOOL], "tool_choice": {"type": "allowed_tools"}}, "`allowed_tools` is not supported"),
        ({"tools": [{"type": "function", "name": "bad name"}]}, "invalid function tool"),
        ({"reasoning": {"effort": "low"}}, "not a reasoning model"),
        ({"conversation": "conv_1"}, "Conversations API"),
        ({"truncation": "auto"}, "truncation: auto"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "at most 16"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "`item_reference` are not supported"),
        ({"input": [{"type": "message", "role": "tool", "content": "x"}]}, "role"),
        ({"input": []}, "must not be empty"),
    ],
)
def test_refusals_name_what_is_not_supported(fields: dict[str, Any], words: str) -> None:
    data = request(**fields)

    def convert() -> None:
        check_supported(data)
        tool_request(data)
        input_items(data.input)

    with pytest.raises(InvalidRequestError) as err:
        convert()
    assert words in err.value.message


def test_a_reasoning_object_with_nothing_set_is_accepted() -> None:
    data = request(
        reasoning={"effort": None}, background=False, include=[], tools=[TOOL], tool_choice="required"
    )
    check_supported(data)
    tools = tool_request(data)
    assert tools is not None and tools.choice == "required" and tools.parallel
    assert tool_request(request(tool_choice="none")) is None
