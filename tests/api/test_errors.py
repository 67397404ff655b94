"""Every error path: status, OpenAI envelope, code and param.

Hostile bodies (malformed, oversized, nested, non-UTF-8, broken schemas, traversal) are one table in
tests/reliability/test_hostile_input.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import MODEL_ID

CHAT = "/v1/chat/completions"


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}


def assert_envelope(
    response: httpx.Response, status: int, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"web_search_options": {}}, "web_search_options"),
        ({"frobnicate": True}, "frobnicate"),
        ({"tools": [{"type": "function", "function": {"name": "f", "when": 1}}]}, "tools[0].function.when"),
    ],
)
def test_unsupported_fields_are_named(client: httpx.Client, fields: dict[str, Any], param: str) -> None:
    error = assert_envelope(client.post(CHAT, json=_chat(**fields)), 400, "unsupported_parameter", param)
    assert param.rsplit(".", 1)[-1] in error["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"functions": []}, "functions"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
            "tool_choice",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"n": 100}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ],
)
def test_invalid_fields(client: httpx.Client, fields: dict[str, Any], param: str) -> None:
    error = assert_envelope(client.post(CHAT, json=_chat(**fields)), 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_missing_model_field(client: httpx.Client) -> None:
    assert_envelope(client.post(CHAT, json={"messages": [{"role": "user", "content": "x"}]}), 400)


def test_unknown_model(client: httpx.Client) -> None:
    for path, body in (
        (CHAT, _chat(model="gpt-9")),
        ("/v1/completions", {"model": "gpt-9", "prompt": "x"}),
        ("/v1/embeddings", {"model": "gpt-9", "input": "x"}),
    ):
        assert_envelope(client.post(path, json=body), 404, "model_not_found", "model")
    assert_envelope(client.get("/v1/models/gpt-9"), 404, "model_not_found")


def test_context_length_checked_before_queueing(client: httpx.Client) -> None:
    error = assert_envelope(client.post(CHAT, json=_chat(max_tokens=100_000)), 400, "context_length_exceeded")
    assert "maximum context length is 2048" in error["message"]
    long_prompt = "word " * 3000
    assert_envelope(
        client.post(CHAT, json=_chat(messages=[{"role": "user", "content": long_prompt}], max_tokens=None)),
        400,
        "context_length_exceeded",
    )
    assert_envelope(
        client.post("/v1/completions", json={"model": MODEL_ID, "prompt": long_prompt}),
        400,
        "context_length_exceeded",
        "prompt",
    )


def test_completion_and_embedding_inputs(client: httpx.Client) -> None:
    assert_envelope(
        client.post("/v1/completions", json={"model": MODEL_ID, "prompt": ["a", 1]}), 400, param="prompt"
    )
    assert_envelope(
        client.post("/v1/completions", json={"model": MODEL_ID, "prompt": [10**9]}), 400, param="prompt"
    )
    assert_envelope(
        client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "x", "best_of": 3}),
        400,
        param="best_of",
    )
    assert_envelope(client.post("/v1/embeddings", json={"model": MODEL_ID, "input": ""}), 400, param="input")
    assert_envelope(
        client.post("/v1/embeddings", json={"model": MODEL_ID, "input": "x", "dimensions": 3}),
        400,
        param="dimensions",
    )


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert_envelope(client.get("/v1/nothing"), 404)
    assert_envelope(client.get(CHAT), 405)


def test_request_id_is_kept_or_made(client: httpx.Client) -> None:
    made = client.get("/v1/models").headers["x-request-id"]
    assert len(made) >= 16
    assert client.get("/v1/models", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    error = client.post(CHAT, json=_chat(model="nope"), headers={"x-request-id": "req-42"})
    assert error.headers["x-request-id"] == "req-42"
    # a malformed id is replaced, not echoed
    assert (
        client.get("/v1/models", headers={"x-request-id": "bad id <x>"}).headers["x-request-id"]
        != "bad id <x>"
    )


def test_a_bad_body_field_named_like_a_dependency_is_a_400(client: httpx.Client) -> None:
    """Litestar reports a body error under a dependency's name as a 500; no body field may share one."""
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}]}
    assert_envelope(
        client.post("/v1/chat/completions", json={**chat, "cache": {"nonsense": 1}}),
        400,
        code="unsupported_parameter",
        param="cache.nonsense",
    )
    assert_envelope(client.post("/v1/chat/completions", json={**chat, "cache": {"ttl": "soon"}}), 400)
