"""The SSE wire format as curl and non-SDK clients see it."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.conftest import MODEL_ID, NO_EOS


def _frames(text: str) -> list[str]:
    assert text.endswith("\n\n")
    return [block for block in text.split("\n\n") if block]


def test_chat_stream_wire_format(client: httpx.Client) -> None:
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": NO_EOS,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    frames = _frames(response.text)
    assert all(f.startswith("data: ") for f in frames)
    assert frames[-1] == "data: [DONE]"
    chunks: list[dict[str, Any]] = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks if c["choices"]]
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_stream_without_usage_has_no_usage_chunk(client: httpx.Client) -> None:
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "stream": True,
    }
    frames = _frames(client.post("/v1/chat/completions", json=body).text)
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    assert all(c.get("usage") is None for c in chunks)
    assert frames[-1] == "data: [DONE]"


def test_completions_stream_wire_format(client: httpx.Client) -> None:
    body = {
        "model": MODEL_ID,
        "prompt": "Hello",
        "max_tokens": 4,
        "stream": True,
        "echo": True,
        "logit_bias": NO_EOS,
    }
    frames = _frames(client.post("/v1/completions", json=body).text)
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    assert chunks[0]["object"] == "text_completion"
    assert chunks[0]["choices"][0]["text"] == "Hello"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
