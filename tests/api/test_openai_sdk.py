"""The official ``openai`` SDK against the app on the real model: sync, async, streaming."""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest

from tests.conftest import MODEL_ID, NO_EOS, ServedApp

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sdk(served: ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=served.api_key, max_retries=0)


def test_models_list_and_retrieve(sdk: openai.OpenAI) -> None:
    models = sdk.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].object == "model"
    assert sdk.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError) as err:
        sdk.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_chat_completion(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in {"stop", "length"}
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_greedy_is_deterministic_and_seed_reproduces(sdk: openai.OpenAI) -> None:
    def ask(**kwargs: object) -> str:
        reply = sdk.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=20,
            **kwargs,  # type: ignore[arg-type]
        )
        return reply.choices[0].message.content or ""

    assert ask(temperature=0) == ask(temperature=0)
    assert ask(temperature=1.0, seed=1234) == ask(temperature=1.0, seed=1234)


def test_content_parts_and_system_message(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=[
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "yes."}]},
        ],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content


def test_streaming_with_usage(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logit_bias=NO_EOS,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None and usage_chunk.usage.completion_tokens == 16
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    greedy = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=16,
        temperature=0,
        logit_bias=NO_EOS,
    )
    assert text == greedy.choices[0].message.content


async def test_async_client_streams_and_completes(served: ServedApp) -> None:
    client = openai.AsyncOpenAI(base_url=f"{served.base_url}/v1", api_key=served.api_key, max_retries=0)
    async with client:
        reply = await client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content
        stream = await client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Hello!"}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert "".join(pieces) == reply.choices[0].message.content


def test_stop_sequences(sdk: openai.OpenAI) -> None:
    base = (
        sdk.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Write a sentence about the sea."}],
            max_tokens=30,
            temperature=0,
            logit_bias=NO_EOS,
        )
        .choices[0]
        .message.content
        or ""
    )
    words = base.split()
    assert len(words) > 3
    stop = words[2]
    reply = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Write a sentence about the sea."}],
        max_tokens=30,
        temperature=0,
        logit_bias=NO_EOS,
        stop=[stop, "zzzz-never"],
    )
    content = reply.choices[0].message.content or ""
    assert reply.choices[0].finish_reason == "stop"
    assert stop not in content
    assert base.startswith(content)


def test_logit_bias_forces_a_token(sdk: openai.OpenAI, served: ServedApp) -> None:
    del served
    token_id = 4093  # the token "user" in SmolLM2's vocabulary: +100 makes it the only choice
    reply = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logit_bias={str(token_id): 100},
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    content = reply.choices[0].message.content or ""
    assert content == "user" * 4


def test_logprobs(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        logit_bias=NO_EOS,
    )
    entries = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries is not None and len(entries) == 6
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
    assert "".join(e.token for e in entries) == reply.choices[0].message.content


def test_n_choices(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Pick a number."}],
        max_tokens=5,
        n=2,
        seed=7,
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage is not None and 2 <= reply.usage.completion_tokens <= 10
    assert all(c.message.content for c in reply.choices)


def test_response_format_json_object(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": 'Reply with the JSON object {"name": "Tom", "legs": 4}.'}],
        max_tokens=300,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_response_format_json_schema(sdk: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "legs": {"type": "integer"}},
        "required": ["name", "legs"],
        "additionalProperties": False,
    }
    reply = sdk.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Describe a cat."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "animal", "schema": schema}},
    )
    value = json.loads(reply.choices[0].message.content or "")
    assert set(value) == {"name", "legs"}
    assert isinstance(value["name"], str) and isinstance(value["legs"], int)


def test_text_completion_and_echo(sdk: openai.OpenAI) -> None:
    reply = sdk.completions.create(
        model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=0, echo=True, logprobs=2
    )
    choice = reply.choices[0]
    assert choice.text.startswith("Once upon a time")
    assert len(choice.text) > len("Once upon a time")
    assert choice.logprobs is not None and choice.logprobs.token_logprobs
    assert all(lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs)
    batch = sdk.completions.create(model=MODEL_ID, prompt=["One", "Two"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in batch.choices) == [0, 1]


def test_text_completion_stream(sdk: openai.OpenAI) -> None:
    stream = sdk.completions.create(
        model=MODEL_ID,
        prompt="The sky is",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logit_bias=NO_EOS,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = sdk.completions.create(
        model=MODEL_ID, prompt="The sky is", max_tokens=6, temperature=0, logit_bias=NO_EOS
    )
    assert text == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_embeddings_float_and_base64(sdk: openai.OpenAI) -> None:
    floats = sdk.embeddings.create(model=MODEL_ID, input=["hello world", "goodbye"], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    first = np.asarray(floats.data[0].embedding)
    assert first.shape == (576,)
    assert np.linalg.norm(first) == pytest.approx(1.0, abs=1e-3)
    assert floats.usage.prompt_tokens > 0
    default = sdk.embeddings.create(model=MODEL_ID, input="hello world")  # the SDK asks for base64
    assert np.allclose(np.asarray(default.data[0].embedding), first, atol=1e-5)
    raw = sdk.embeddings.with_raw_response.create(
        model=MODEL_ID, input="hello world", encoding_format="base64"
    )
    encoded = json.loads(raw.text)["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), first, atol=1e-5)
