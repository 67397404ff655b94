"""The Responses API (``/v1/responses``) with the official ``openai`` SDK, on the real model."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from tests.api.cache_support import new_key, new_user
from tests.conftest import MODEL_ID, ServedApp

EVENTS: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture
def sdk(served: ServedApp) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=served.api_key, max_retries=0) as client:
        yield client


def _unique() -> str:
    """A line that makes a prompt new to the response cache and the slots."""
    return f"Conversation {uuid.uuid4().hex[:8]}."


def _raw_events(served: ServedApp, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The ``(event:, data:)`` pairs of a streamed response, as sent."""
    events = []
    with (
        httpx.Client(base_url=served.base_url, headers=served.headers, timeout=120) as http,
        http.stream("POST", "/v1/responses", json={**body, "stream": True}) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_create_json_with_output_text_and_usage(sdk: openai.OpenAI) -> None:
    raw = sdk.responses.with_raw_response.create(
        model=MODEL_ID,
        input=_unique() + " Say hello.",
        instructions="Answer in one short sentence.",
        max_output_tokens=24,
        temperature=0,
        metadata={"purpose": "test"},
    )
    strict = Response.model_validate(raw.http_response.json(), strict=True)  # every field as typed
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response" and response.id == strict.id
    assert response.status in ("completed", "incomplete") and response.model == MODEL_ID
    assert response.instructions == "Answer in one short sentence." and response.metadata == {
        "purpose": "test"
    }
    assert [item.type for item in response.output] == ["message"]
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert response.output_text and response.output_text == message.content[0].text  # type: ignore[union-attr]
    usage = response.usage
    assert usage is not None and usage.input_tokens > 20 and 0 < usage.output_tokens <= 24
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    if response.status == "incomplete":
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens" and usage.output_tokens == 24


def test_stream_events_parse_and_match_the_stored_response(sdk: openai.OpenAI, served: ServedApp) -> None:
    body = {
        "model": MODEL_ID,
        "input": _unique() + " Count to three.",
        "max_output_tokens": 20,
        "temperature": 0,
    }
    events = _raw_events(served, body)
    parsed = [EVENTS.validate_python(data, strict=True) for _, data in events]  # the SDK's event classes
    assert [name for name, _ in events] == [event.type for event in parsed]
    assert [event.sequence_number for event in parsed] == list(range(len(parsed)))
    kinds = [event.type for event in parsed]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 0
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        kinds[-1],
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in parsed if e.type == "response.output_text.delta")
    done = parsed[-1]
    assert done.type in ("response.completed", "response.incomplete")
    assert done.response.output_text == text
    assert parsed[0].type == "response.created" and parsed[0].response.status == "in_progress"
    assert sdk.responses.retrieve(done.response.id) == done.response  # stored as streamed


def test_the_sdk_stream_helper(sdk: openai.OpenAI) -> None:
    seen = []
    with sdk.responses.stream(
        model=MODEL_ID, input=_unique() + " Say yes.", max_output_tokens=400, temperature=0
    ) as stream:
        for event in stream:
            seen.append(event.type)
        final = stream.get_final_response()
    assert seen[0] == "response.created" and seen[-1] == "response.completed"
    assert final.status == "completed" and final.output_text


def test_a_chain_by_previous_response_id_costs_only_the_new_tokens(sdk: openai.OpenAI) -> None:
    first = sdk.responses.create(
        model=MODEL_ID, input=_unique() + " My name is Ada.", max_output_tokens=16, temperature=0
    )
    second = sdk.responses.create(
        model=MODEL_ID,
        previous_response_id=first.id,
        input="What is my name?",
        max_output_tokens=16,
        temperature=0,
    )
    assert first.usage is not None and second.usage is not None
    assert second.previous_response_id == first.id
    # the second prompt holds the first turn (its input and its answer) ...
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    # ... which the slot that ran it still has: only the new turn is computed
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    third = sdk.responses.create(
        model=MODEL_ID, previous_response_id=second.id, input="Thanks.", max_output_tokens=8, temperature=0
    )
    assert third.usage is not None
    assert third.usage.input_tokens_details.cached_tokens >= second.usage.input_tokens


ARCHIVIST = "You are the archivist of a small harbour town. Answer briefly and kindly. " * 6


def test_kept_kv_state_is_reused_only_by_its_own_user(
    sdk: openai.OpenAI, served: ServedApp, request: pytest.FixtureRequest
) -> None:
    """As on chat completions: a user's conversation stays in the KV cache for that user's next turn,
    and another user sending the same long prompt reuses only the shared system part of it."""
    topic = _unique() + " Tell me about the mill."
    opening: dict[str, Any] = {
        "model": MODEL_ID,
        "instructions": ARCHIVIST,
        "input": topic + " Some background on the mill: it is old, quiet and well kept." * 25,
        "max_output_tokens": 8,
        "temperature": 0,
    }
    first = sdk.responses.create(**opening)
    second = sdk.responses.create(
        model=MODEL_ID,
        instructions=ARCHIVIST,
        previous_response_id=first.id,
        input="Who lives there?",
        max_output_tokens=8,
        temperature=0,
    )
    assert first.usage is not None and second.usage is not None and first.usage.input_tokens > 400
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    other = new_user(served)
    _, headers = new_key(served, other["username"])
    theirs = openai.OpenAI(
        base_url=f"{served.base_url}/v1", api_key=headers["Authorization"].split()[1], max_retries=0
    )
    request.addfinalizer(theirs.close)
    # the slot that holds the first user's conversation is the one that shares the longest prefix with
    # this prompt; only the rendered instructions (the same for everyone) may be reused from it
    copied = theirs.responses.create(**opening)
    assert copied.usage is not None and copied.usage.input_tokens == first.usage.input_tokens
    cached = copied.usage.input_tokens_details.cached_tokens
    assert 0 < cached < copied.usage.input_tokens // 2


def test_a_function_tool_round_trip(sdk: openai.OpenAI, served: ServedApp) -> None:
    asked = sdk.responses.create(
        model=MODEL_ID,
        input=_unique() + " What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        max_output_tokens=64,
        temperature=0,
    )
    assert asked.status == "completed"
    assert [item.type for item in asked.output] == ["function_call"]
    call = asked.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert set(json.loads(call.arguments)) == {"city"}
    assert asked.tools[0].name == "get_weather" and asked.parallel_tool_calls is False  # type: ignore[union-attr]
    answered = sdk.responses.create(
        model=MODEL_ID,
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=32,
        temperature=0,
    )
    assert [item.type for item in answered.output] == ["message"] and answered.output_text
    assert answered.usage is not None and answered.usage.input_tokens_details.cached_tokens > 0
    # streamed: the call's arguments arrive as deltas and end in .done, as the SDK's classes read them
    events = _raw_events(
        served,
        {
            "model": MODEL_ID,
            "input": _unique() + " Weather in Rome?",
            "tools": [WEATHER],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_output_tokens": 64,
            "temperature": 0,
        },
    )
    parsed = [EVENTS.validate_python(data, strict=True) for _, data in events]
    added = [e for e in parsed if e.type == "response.output_item.added"]
    assert added and all(e.item.type == "function_call" for e in added)
    first_id = added[0].item.id
    arguments = "".join(
        e.delta
        for e in parsed
        if e.type == "response.function_call_arguments.delta" and e.item_id == first_id
    )
    done = next(e for e in parsed if e.type == "response.function_call_arguments.done")
    assert done.item_id == first_id and done.arguments == arguments and "city" in json.loads(arguments)
    assert parsed[-1].type == "response.completed"
    assert [item.type for item in parsed[-1].response.output] == ["function_call"] * len(added)


class Animal(BaseModel):
    name: str
    legs: int


def test_text_format_json_schema_parsed_by_the_sdk(sdk: openai.OpenAI) -> None:
    parsed = sdk.responses.parse(
        model=MODEL_ID,
        input=_unique() + " Describe a cat.",
        text_format=Animal,
        max_output_tokens=80,
        temperature=0,
    )
    assert isinstance(parsed.output_parsed, Animal)
    assert parsed.text is not None and parsed.text.format is not None
    assert parsed.text.format.type == "json_schema"
    plain = sdk.responses.create(
        model=MODEL_ID,
        input='Reply with the JSON object {"name": "Tom", "legs": 4}.',
        text={"format": {"type": "json_object"}},
        max_output_tokens=300,
        temperature=0,
    )
    assert plain.status == "completed"
    assert isinstance(json.loads(plain.output_text), dict)


def test_retrieve_delete_and_input_items(sdk: openai.OpenAI) -> None:
    created = sdk.responses.create(
        model=MODEL_ID,
        input=[
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": _unique()}]},
            {"role": "user", "content": "Say hi."},
        ],
        max_output_tokens=8,
        temperature=0,
    )
    assert sdk.responses.retrieve(created.id) == created
    items = sdk.responses.input_items.list(created.id)
    assert [item.role for item in items.data] == ["user", "user", "developer"]  # type: ignore[union-attr]
    assert items.data[0].content[0].text == "Say hi."  # type: ignore[union-attr]
    ascending = sdk.responses.input_items.list(created.id, order="asc", limit=2)
    assert [item.role for item in ascending.data] == ["developer", "user"]  # type: ignore[union-attr]
    assert ascending.has_more and ascending.last_id == ascending.data[1].id
    rest = sdk.responses.input_items.list(created.id, order="asc", after=ascending.last_id)
    assert [item.id for item in rest.data] == [items.data[0].id] and not rest.has_more
    sdk.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model=MODEL_ID, previous_response_id=created.id, input="Hi", max_output_tokens=4)


def test_store_false_is_not_kept(sdk: openai.OpenAI) -> None:
    created = sdk.responses.create(
        model=MODEL_ID, input=_unique(), store=False, max_output_tokens=4, temperature=0
    )
    assert created.store is False
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(created.id)


def test_another_users_response_is_a_404(
    sdk: openai.OpenAI, served: ServedApp, request: pytest.FixtureRequest
) -> None:
    mine = sdk.responses.create(model=MODEL_ID, input=_unique(), max_output_tokens=4, temperature=0)
    other = new_user(served)
    _, headers = new_key(served, other["username"])
    theirs = openai.OpenAI(
        base_url=f"{served.base_url}/v1", api_key=headers["Authorization"].split()[1], max_retries=0
    )
    request.addfinalizer(theirs.close)
    for attempt in (
        lambda: theirs.responses.retrieve(mine.id),
        lambda: theirs.responses.delete(mine.id),
        lambda: theirs.responses.input_items.list(mine.id),
        lambda: theirs.responses.create(
            model=MODEL_ID, previous_response_id=mine.id, input="Hi", max_output_tokens=4
        ),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            attempt()
        assert err.value.body["code"] == "response_not_found"  # type: ignore[index]
    assert sdk.responses.retrieve(mine.id).id == mine.id  # still there for its owner


def test_a_deterministic_request_is_answered_from_the_cache(sdk: openai.OpenAI) -> None:
    body: dict[str, Any] = {"model": MODEL_ID, "input": _unique(), "max_output_tokens": 8, "temperature": 0}
    first = sdk.responses.with_raw_response.create(**body)
    again = sdk.responses.with_raw_response.create(**body)
    assert first.headers["x-cache"] == "miss" and again.headers["x-cache"] == "hit"
    one, two = first.parse(), again.parse()
    assert one.id != two.id and one.output_text == two.output_text
    assert sdk.responses.retrieve(two.id).output_text == one.output_text  # a hit is stored too


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"tools": [{"type": "web_search"}]}, "built-in tool `web_search` (web search) is not supported"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "`file_search` (file search)"),
        ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "code interpreter"),
        ({"reasoning": {"effort": "high"}}, "is not a reasoning model"),
        ({"background": True}, "background responses"),
        ({"include": ["reasoning.encrypted_content"]}, "reasoning.encrypted_content"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input_image",
        ),
        ({"tool_choice": "required"}, "needs function tools"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
    ],
)
def test_unsupported_fields_are_refused_in_words(
    sdk: openai.OpenAI, fields: dict[str, Any], words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk.responses.create(model=MODEL_ID, input="Hi", extra_body=fields)
    assert words in err.value.message


def test_unauthenticated_is_refused(served: ServedApp) -> None:
    response = httpx.post(
        f"{served.base_url}/v1/responses", json={"model": MODEL_ID, "input": "Hi"}, timeout=30
    )
    assert response.status_code == 401
