"""Tool calling and the rest of the chat surface real clients send, through the official ``openai`` SDK
on the real model (issue 15): each ``tool_choice``, streamed and not, ``parallel_tool_calls``, a two-step
loop with the SDK's own objects, ``parse`` with ``pydantic_function_tool``, the legacy ``functions``, the
response message sent back as history, the fields accepted and the features refused in words, and tool
calls replayed from the response cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageToolCall
from pydantic import BaseModel

from tests.conftest import MODEL_ID, ServedApp, make_settings, serve

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}
ADD_SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a", "b"],
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city",
            "parameters": WEATHER_SCHEMA,
        },
    },
    {
        "type": "function",
        "function": {"name": "add", "description": "Add two integers", "parameters": ADD_SCHEMA},
    },
]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "add": ADD_SCHEMA}
ASK: list[Any] = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def app(model_path: Any) -> Iterator[ServedApp]:
    del model_path
    with serve(make_settings()) as served:
        yield served


@pytest.fixture
def sdk(app: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.base_url}/v1", api_key=app.api_key, max_retries=0)


def _valid(calls: list[ChatCompletionMessageToolCall]) -> None:
    """Every call names an offered function and its arguments validate against that function's schema."""
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _create(sdk: openai.OpenAI, **kwargs: Any) -> ChatCompletion:
    arguments: dict[str, Any] = {"model": MODEL_ID, "messages": ASK, "tools": TOOLS, "temperature": 0}
    arguments |= {"max_tokens": 64, "parallel_tool_calls": False, **kwargs}
    return sdk.chat.completions.create(**arguments)


@pytest.mark.parametrize("choice", ["required", "named"])
def test_a_forced_choice_answers_with_a_valid_call(sdk: openai.OpenAI, choice: str) -> None:
    tool_choice: Any = choice if choice == "required" else {"type": "function", "function": {"name": "add"}}
    reply = _create(sdk, tool_choice=tool_choice)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    assert message.content is None and message.tool_calls is not None and len(message.tool_calls) == 1
    _valid(message.tool_calls)  # type: ignore[arg-type]
    if choice == "named":
        assert message.tool_calls[0].function.name == "add"


def test_tool_choice_none_and_auto(sdk: openai.OpenAI) -> None:
    none = _create(sdk, tool_choice="none")
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content and none.choices[0].finish_reason in ("stop", "length")
    greeting = _create(sdk, tool_choice="auto", messages=[{"role": "user", "content": "Hello, how are you?"}])
    weather = _create(sdk, tool_choice="auto")
    for reply in (greeting, weather):
        message = reply.choices[0].message
        if message.tool_calls:
            assert reply.choices[0].finish_reason == "tool_calls"
            _valid(message.tool_calls)  # type: ignore[arg-type]
        else:
            assert message.content and reply.choices[0].finish_reason in ("stop", "length")


def _calls(message: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def test_the_sdks_stream_helper_assembles_the_calls(sdk: openai.OpenAI) -> None:
    whole = _create(sdk, tool_choice="required", extra_headers={"cache-control": "no-store"})
    deltas: list[dict[str, Any]] = []
    with sdk.chat.completions.stream(
        model=MODEL_ID,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=64,
        parallel_tool_calls=False,
        extra_headers={"cache-control": "no-store"},
    ) as stream:
        for event in stream:
            if event.type == "chunk" and event.chunk.choices and event.chunk.choices[0].delta.tool_calls:
                deltas += [d.model_dump(exclude_none=True) for d in event.chunk.choices[0].delta.tool_calls]
        streamed = stream.get_final_completion()
    assert streamed.choices[0].finish_reason == whole.choices[0].finish_reason == "tool_calls"
    assert streamed.choices[0].message.content is None
    assert _calls(streamed.choices[0].message) == _calls(whole.choices[0].message)
    # OpenAI's delta shape: the first delta of a call has index, id, type, name and "" arguments; then
    # argument fragments only
    first = deltas[0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": _calls(whole.choices[0].message)[0][0], "arguments": ""}
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in deltas[1:])


def test_a_streamed_named_choice_assembles_exactly_one_valid_call(sdk: openai.OpenAI) -> None:
    """A named ``tool_choice``, streamed: the deltas, merged by ``index`` as the SDK and LangChain merge them,
    are one call of that function (even with ``parallel_tool_calls`` true) with arguments valid under its
    schema; the function named is not the one the question asks for, so only the grammar can make it so."""
    stream = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=True,
        temperature=0,
        max_tokens=64,
        stream=True,
        extra_headers={"cache-control": "no-store"},
    )
    calls: dict[int, dict[str, str]] = {}
    content, finish = "", None
    with stream:
        for chunk in stream:
            for choice in chunk.choices:
                content += choice.delta.content or ""
                finish = choice.finish_reason or finish
                for delta in choice.delta.tool_calls or []:
                    call = calls.setdefault(delta.index, {"id": "", "type": "", "name": "", "arguments": ""})
                    call["id"] += delta.id or ""
                    call["type"] += delta.type or ""
                    call["name"] += (delta.function and delta.function.name) or ""
                    call["arguments"] += (delta.function and delta.function.arguments) or ""
    assert finish == "tool_calls" and content == ""
    assert list(calls) == [0], calls
    call = calls[0]
    assert call["id"].startswith("call_") and call["type"] == "function" and call["name"] == "add"
    jsonschema.validate(json.loads(call["arguments"]), ADD_SCHEMA)


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_a_stream_says_what_the_json_answer_says(sdk: openai.OpenAI, choice: str) -> None:
    whole = _create(sdk, tool_choice=choice, extra_headers={"cache-control": "no-store"}).choices[0]
    chunks = _create(sdk, tool_choice=choice, stream=True, extra_headers={"cache-control": "no-store"})
    content, finish, names = "", None, []
    for chunk in chunks:  # type: ignore[attr-defined]
        delta = chunk.choices[0].delta
        content += delta.content or ""
        names += [call.function.name for call in delta.tool_calls or [] if call.id]
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason
    assert content == (whole.message.content or "")
    assert names == [name for name, _ in _calls(whole.message)]


def test_parallel_tool_calls(sdk: openai.OpenAI) -> None:
    one = _create(sdk, tool_choice="required", parallel_tool_calls=False, max_tokens=120)
    assert one.choices[0].finish_reason == "tool_calls" and len(one.choices[0].message.tool_calls or []) == 1
    many = _create(sdk, tool_choice="required", parallel_tool_calls=True, max_tokens=120)
    calls = many.choices[0].message.tool_calls or []
    # SmolLM2-135M is not tool-trained: offered several calls it repeats one until max_tokens
    assert len(calls) >= 2
    if many.choices[0].finish_reason == "length":  # the call that the budget cut off is the last one
        calls = calls[:-1]
    else:
        assert many.choices[0].finish_reason == "tool_calls"
    _valid(calls)  # type: ignore[arg-type]


def test_the_sdks_stream_helper_assembles_parallel_calls(sdk: openai.OpenAI) -> None:
    """``parallel_tool_calls: true``, streamed: ``chat.completions.stream`` merges the deltas into calls with
    distinct ids and indexes, each with JSON arguments valid under its function's schema. (Two cities make
    SmolLM2-135M write two calls and stop at temperature 0; a question with one city makes it repeat its call
    until ``max_tokens``, and the helper's ``get_final_completion`` raises on ``finish_reason: length``.)"""
    indexes: list[int] = []
    with sdk.chat.completions.stream(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "What is the weather in Paris and in London?"}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=True,
        temperature=0,
        max_tokens=96,
        extra_headers={"cache-control": "no-store"},
    ) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.done":
                indexes.append(event.index)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) >= 2, calls
    assert indexes == list(range(len(calls)))  # one "arguments done" event per call, in index order
    assert len({call.id for call in calls}) == len(calls)
    _valid(calls)  # type: ignore[arg-type]


def test_a_two_step_loop_with_the_sdks_own_objects(sdk: openai.OpenAI) -> None:
    messages: list[Any] = list(ASK)
    first = _create(sdk, messages=messages, tool_choice="required")
    message = first.choices[0].message
    assert message.tool_calls
    messages.append(message)  # the SDK object itself, refusal/annotations/audio/function_call included
    for call in message.tool_calls:
        messages.append(
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}
        )
    final = _create(sdk, messages=messages, tool_choice="none")
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
    again = _create(sdk, messages=messages, tool_choice="auto")  # the loop goes on: a call or a reply
    assert again.choices[0].message.content or again.choices[0].message.tool_calls


def test_the_response_message_is_accepted_back_as_history(sdk: openai.OpenAI, app: ServedApp) -> None:
    reply = sdk.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=8, temperature=0)
    echoed = reply.choices[0].message.model_dump()  # refusal, annotations, audio, function_call: null
    assert echoed["refusal"] is None and "annotations" in echoed and "function_call" in echoed
    body = {
        "model": MODEL_ID,
        "max_tokens": 4,
        "messages": [*ASK, echoed, {"role": "user", "content": "And?"}],
    }
    answer = httpx.post(f"{app.base_url}/v1/chat/completions", json=body, headers=app.headers, timeout=120)
    assert answer.status_code == 200, answer.text
    sdk.chat.completions.create(model=MODEL_ID, messages=[*ASK, reply.choices[0].message], max_tokens=4)


class Weather(BaseModel):
    city: str
    unit: str


def test_parse_with_pydantic_function_tool(sdk: openai.OpenAI) -> None:
    parsed = sdk.chat.completions.parse(
        model=MODEL_ID,
        messages=ASK,
        tools=[openai.pydantic_function_tool(Weather)],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=64,
    )
    calls = parsed.choices[0].message.tool_calls or []
    assert len(calls) >= 1 and all(isinstance(call.function.parsed_arguments, Weather) for call in calls)


def test_legacy_functions(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=ASK,
        functions=[tool["function"] for tool in TOOLS],
        function_call={"name": "get_weather"},
        temperature=0,
        max_tokens=64,
    )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "function_call" and message.tool_calls is None
    assert message.function_call is not None and message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(message.function_call.arguments), WEATHER_SCHEMA)
    history = [
        *ASK,
        {"role": "assistant", "content": None, "function_call": message.function_call.model_dump()},
        {"role": "function", "name": "get_weather", "content": '{"temperature_c": 21}'},
    ]
    final = sdk.chat.completions.create(model=MODEL_ID, messages=history, max_tokens=16, temperature=0)
    assert final.choices[0].message.content


def test_tool_calls_are_replayed_from_the_cache(sdk: openai.OpenAI) -> None:
    prompt = [{"role": "user", "content": "Weather in Rome, please."}]
    fresh = _create(sdk, messages=prompt, tool_choice="required").choices[0]
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL_ID,
        messages=prompt,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=64,
        parallel_tool_calls=False,
    )
    assert raw.headers["x-cache"] == "hit"
    hit = raw.parse().choices[0]
    assert hit.finish_reason == fresh.finish_reason == "tool_calls" and hit.message.content is None
    expected = [(c.function.name, c.function.arguments) for c in fresh.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in hit.message.tool_calls or []] == expected
    with sdk.chat.completions.stream(
        model=MODEL_ID,
        messages=prompt,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=64,
        parallel_tool_calls=False,
    ) as stream:
        replayed = stream.get_final_completion().choices[0]
    assert replayed.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in replayed.message.tool_calls or []] == expected


def test_fields_that_do_not_change_the_output_are_accepted(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, *ASK],
        max_tokens=4,
        store=False,
        metadata={"team": "docs"},
        service_tier="auto",
        safety_identifier="user-1234",
        prompt_cache_key="weather-bot",
        user="someone",
        parallel_tool_calls=True,
    )
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        (
            {"reasoning_effort": "low"},
            "reasoning_effort",
            "'reasoning_effort' is not supported with this model",
        ),
        (
            {"modalities": ["text", "audio"]},
            "modalities",
            f"audio output is not supported by model {MODEL_ID}",
        ),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction", "not supported by model"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}],
                    }
                ]
            },
            "messages[0].content[0]",
            f"image input is not supported by model {MODEL_ID}",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
                    }
                ]
            },
            "messages[0].content[0]",
            f"audio input is not supported by model {MODEL_ID}",
        ),
        ({"tool_choice": "required"}, "tool_choice", "only allowed when 'tools' are specified"),
        (
            {"messages": [*ASK, {"role": "tool", "content": "21"}]},
            "messages[1].tool_call_id",
            "needs `tool_call_id`",
        ),
    ],
)
def test_unsupported_features_are_refused_in_words(
    app: ServedApp, extra: dict[str, Any], param: str, words: str
) -> None:
    body = {"model": MODEL_ID, "messages": ASK, "max_tokens": 4, **extra}
    response = httpx.post(f"{app.base_url}/v1/chat/completions", json=body, headers=app.headers, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["param"] == param


def test_content_parts_are_joined_without_a_separator(app: ServedApp) -> None:
    """Two text parts are the prompt their concatenation is: same tokens, same greedy answer."""

    def ask(content: Any) -> httpx.Response:
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            "temperature": 0,
        }
        return httpx.post(f"{app.base_url}/v1/chat/completions", json=body, headers=app.headers, timeout=60)

    joined = ask("Say yes, joined.").json()
    parts = ask([{"type": "text", "text": "Say yes, "}, {"type": "text", "text": "joined."}]).json()
    assert parts["choices"][0]["message"] == joined["choices"][0]["message"]
    assert parts["usage"]["prompt_tokens"] == joined["usage"]["prompt_tokens"]
