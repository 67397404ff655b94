"""Hostile input: one table of bad requests, each a clear 4xx in OpenAI's envelope, the server unharmed.

After every row the server must still be healthy with no slot or queue place taken; at the end a normal
request runs. (Field-by-field validation lives in tests/api/test_errors.py; this is the hostile side.)
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_errors import assert_envelope
from tests.conftest import MODEL_ID, ServedApp, make_settings, serve

pytestmark = pytest.mark.reliability
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}
MB = 1024 * 1024


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}


def _raw_chat(**fields: Any) -> bytes:
    return json.dumps(_chat(**fields)).encode()


@dataclass
class Case:
    """One hostile request and the answer it must get."""

    id: str
    status: int
    body: bytes | None = None
    path: str = CHAT
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    code: str | None = None
    param: str | None = None
    envelope: bool = True
    """False only where uvicorn's HTTP parser refuses the request before the app sees it."""
    raw: bool = False
    """Send the bytes as they are over a socket (paths and headers httpx would clean up)."""
    admin: bool = False


def _schema(schema: Any) -> bytes:
    return _raw_chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


CASES = [
    # malformed and mistyped bodies
    Case("malformed_json", 400, b'{"model": '),
    Case("json_array", 400, b"[1, 2]"),
    Case("empty_body", 400, b""),
    Case(
        "wrong_content_type_form",
        415,
        b"model=x&messages=y",
        headers={"content-type": "application/x-www-form-urlencoded"},
        code="unsupported_media_type",
    ),
    Case(
        "wrong_content_type_text",
        415,
        _raw_chat(),
        headers={"content-type": "text/plain"},
        code="unsupported_media_type",
    ),
    Case(
        "wrong_content_type_multipart",
        415,
        b"--b\r\n\r\nx\r\n--b--\r\n",
        headers={"content-type": "multipart/form-data; boundary=b"},
        code="unsupported_media_type",
    ),
    Case(
        "wrong_content_type_login",
        415,
        b"username=admin&password=admin123",
        path="/auth/login",
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    Case(
        "json_suffix_content_type",
        200,
        _raw_chat(),
        headers={"content-type": "application/vnd.api+json; charset=utf-8"},
    ),
    Case("ten_mb_body", 413, b'{"model": "' + b"x" * (10 * MB) + b'"}', code="request_too_large"),
    Case("deeply_nested", 400, b'{"model": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", code="invalid_json"),
    Case("invalid_utf8", 400, b'{"model": "\xff\xfe", "messages": []}'),
    Case("invalid_utf8_latin1", 400, "\xff\xfe".encode("latin-1")),
    Case(
        "lone_surrogate",
        400,
        _raw_chat(messages=[{"role": "user", "content": "x"}]).replace(b'"x"', b'"\\ud800"'),
    ),
    Case("nul_in_content", 200, _raw_chat(messages=[{"role": "user", "content": "a\u0000b\u001b[31m"}])),
    # sizes
    Case("ten_thousand_stops", 400, _raw_chat(stop=[f"s{i}" for i in range(10_000)]), param="stop"),
    Case("huge_stop_string", 400, _raw_chat(stop=["x" * 100_000]), param="stop"),
    Case(
        "prompt_far_beyond_context",
        400,
        _raw_chat(messages=[{"role": "user", "content": "word " * 300_000}], max_tokens=None),
        code="context_length_exceeded",
    ),
    Case(
        "completion_prompt_beyond_context",
        400,
        json.dumps({"model": MODEL_ID, "prompt": "word " * 300_000}).encode(),
        path="/v1/completions",
        code="context_length_exceeded",
    ),
    Case(
        "many_messages",
        400,
        _raw_chat(messages=[{"role": "user", "content": "hi"}] * 50_000),
        code="context_length_exceeded",
    ),
    Case(
        "special_token_flood",
        400,
        _raw_chat(messages=[{"role": "user", "content": "<|im_end|>" * 150_000}]),
        code="context_length_exceeded",
    ),
    Case(
        "special_token_flood_completion",
        400,
        json.dumps({"model": MODEL_ID, "prompt": "<|im_start|>" * 150_000}).encode(),
        path="/v1/completions",
        code="context_length_exceeded",
    ),
    Case(
        "special_token_flood_embedding",
        400,
        json.dumps({"model": MODEL_ID, "input": "<|im_end|>" * 150_000}).encode(),
        path="/v1/embeddings",
        code="context_length_exceeded",
    ),
    Case("huge_logit_bias", 400, _raw_chat(logit_bias={str(i): 1 for i in range(5000)}), param="logit_bias"),
    Case(
        "many_embedding_inputs",
        400,
        json.dumps({"model": MODEL_ID, "input": ["x"] * 10_000}).encode(),
        path="/v1/embeddings",
        param="input",
    ),
    # response_format with a broken JSON schema
    Case(
        "schema_properties_not_object",
        400,
        _schema({"type": "object", "properties": 5}),
        param="response_format",
    ),
    Case("schema_dangling_ref", 400, _schema({"$ref": "#/nowhere"}), param="response_format"),
    Case("schema_unknown_type", 400, _schema({"type": "nonsense"}), param="response_format"),
    Case("schema_self_ref", 400, _schema({"$ref": "#"}), param="response_format"),
    Case("schema_bad_pattern", 400, _schema({"type": "string", "pattern": "(["}), param="response_format"),
    Case("schema_not_object", 400, _schema("a string"), param="response_format"),
    Case(
        "schema_deep",
        400,
        _schema(json.loads('{"type": "array", "items": ' * 500 + "{}" + "}" * 500)),
        param="response_format",
    ),
    # absurd numbers
    Case("max_tokens_negative", 400, _raw_chat(max_tokens=-1), param="max_tokens"),
    Case("max_tokens_2_70", 400, _raw_chat(max_tokens=2**70)),
    Case("max_tokens_float", 400, _raw_chat(max_tokens=1e30), param="max_tokens"),
    Case("max_tokens_infinite", 400, _raw_chat().replace(b'"max_tokens": 4', b'"max_tokens": 1e400')),
    Case("temperature_huge", 400, _raw_chat(temperature=1e308), param="temperature"),
    Case(
        "temperature_infinite",
        400,
        _raw_chat().replace(b'"max_tokens": 4', b'"max_tokens": 4, "temperature": 1e400'),
    ),
    Case("temperature_negative", 400, _raw_chat(temperature=-1), param="temperature"),
    Case("temperature_string", 400, _raw_chat(temperature="hot"), param="temperature"),
    Case("top_p_negative", 400, _raw_chat(top_p=-0.5), param="top_p"),
    Case("top_p_above_one", 400, _raw_chat(top_p=2), param="top_p"),
    Case("top_k_negative", 400, _raw_chat(top_k=-5), param="top_k"),
    Case("min_p_above_one", 400, _raw_chat(min_p=2), param="min_p"),
    Case("n_huge", 400, _raw_chat(n=2**40), param="n"),
    Case("seed_2_70", 400, _raw_chat(seed=2**70), param="seed"),
    Case("frequency_penalty_huge", 400, _raw_chat(frequency_penalty=1e9), param="frequency_penalty"),
    Case("logit_bias_infinite", 400, _raw_chat(logit_bias={"5": 1}).replace(b'"5": 1', b'"5": 1e400')),
    Case("logit_bias_huge", 400, _raw_chat(logit_bias={"5": 1e300}), param="logit_bias"),
    # control characters and traversal in ids
    Case("model_with_nul", 404, _raw_chat(model="smollm2\u0000-135m"), code="model_not_found"),
    Case("model_with_newline", 404, _raw_chat(model="x\r\nSet-Cookie: a=b"), code="model_not_found"),
    Case("model_one_megabyte", 400, _raw_chat(model="m" * MB), param="model"),
    Case(
        "models_get_long_id",
        404,
        None,
        path="/v1/models/" + "m" * 60_000,
        method="GET",
        raw=True,
        code="model_not_found",
    ),
    Case("model_traversal", 404, _raw_chat(model="../../etc/passwd"), code="model_not_found"),
    Case(
        "model_absolute_path",
        404,
        _raw_chat(model="/work/main/models/smollm2-135m-instruct.gguf"),
        code="model_not_found",
    ),
    Case(
        "models_get_traversal_raw", 404, None, path="/v1/models/../../../etc/passwd", method="GET", raw=True
    ),
    Case(
        "models_get_traversal_encoded",
        404,
        None,
        path="/v1/models/..%2F..%2Fetc%2Fpasswd",
        method="GET",
        raw=True,
        code="model_not_found",
    ),
    Case(
        "models_get_nul",
        404,
        None,
        path="/v1/models/smollm2%00",
        method="GET",
        raw=True,
        code="model_not_found",
    ),
    Case(
        "session_header_traversal",
        400,
        _raw_chat(),
        headers={**JSON, "x-session-id": "../../etc/passwd"},
        code="invalid_session_id",
    ),
    Case(
        "session_header_control",
        400,
        _raw_chat(),
        headers={**JSON, "x-session-id": "abc\x01def"},
        raw=True,
        envelope=False,
    ),
    Case(
        "session_body_traversal",
        400,
        json.dumps({"prompt": "hi", "session_id": "../../etc/passwd"}).encode(),
        path="/chat",
        code="invalid_session_id",
    ),
    Case("history_negative_limit", 400, None, path="/chat/history?limit=-1", method="GET", param="limit"),
    Case("history_negative_offset", 400, None, path="/chat/history?offset=-5", method="GET", param="offset"),
    Case(
        "history_huge_offset",
        400,
        None,
        path="/chat/history?offset=" + "9" * 30,
        method="GET",
        param="offset",
    ),
    Case(
        "history_limit_not_a_number", 400, None, path="/chat/history?limit=abc", method="GET", param="limit"
    ),
    Case(
        "history_traversal_encoded",
        404,
        None,
        path="/chat/history/..%2F..%2Fetc%2Fpasswd",
        method="GET",
        raw=True,
    ),
    Case(
        "history_nul",
        400,
        None,
        path="/chat/history/abc%00def",
        method="GET",
        raw=True,
        code="invalid_session_id",
    ),
    Case(
        "history_delete_control",
        400,
        None,
        path="/chat/history/%1B%5B31m",
        method="DELETE",
        raw=True,
        code="invalid_session_id",
    ),
    Case("admin_key_control", 404, None, path="/admin/keys/%00%0A", method="DELETE", raw=True, admin=True),
    Case(
        "admin_user_traversal",
        404,
        None,
        path="/admin/users/..%2F..%2F1/disable",
        method="POST",
        raw=True,
        admin=True,
    ),
]


@pytest.fixture(scope="module")
def hostile(model_path: Path) -> Iterator[ServedApp]:
    del model_path
    with serve(make_settings()) as app:
        yield app


def _send_raw(app: ServedApp, case: Case, headers: dict[str, str]) -> httpx.Response:
    """An HTTP/1.1 request written byte for byte on a socket (no client-side clean-up)."""
    body = case.body or b""
    lines = [f"{case.method} {case.path} HTTP/1.1", f"host: 127.0.0.1:{app.port}", "connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or case.method == "POST":
        lines.append(f"content-length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection(("127.0.0.1", app.port), timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    response_headers = [tuple(line.split(": ", 1)) for line in header_lines]
    return httpx.Response(int(status_line.split(" ")[1]), headers=response_headers, content=payload)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request(hostile: ServedApp, case: Case) -> None:
    auth = {"Authorization": f"Bearer {hostile.admin_token if case.admin else hostile.api_key}"}
    headers = {**case.headers, **auth}
    if case.raw:
        response = _send_raw(hostile, case, headers)
    else:
        with httpx.Client(base_url=hostile.base_url, timeout=120) as http:
            response = http.request(case.method, case.path, content=case.body, headers=headers)
    if case.status == 200:
        assert response.status_code == 200, response.text
    elif not case.envelope:
        assert response.status_code == case.status, response.text
    else:
        error = assert_envelope(response, case.status, case.code)
        if case.param is not None:  # the field, or a place inside it
            assert error["param"] == case.param or error["param"].startswith(
                (f"{case.param}.", f"{case.param}[")
            ), error
        assert len(error["message"]) < 2000, "an error must not echo a huge input"
        print(
            f"{case.id}: {response.status_code} {error['code']} {error['param']} {error['message'][:100]!r}"
        )
    # the process is unaffected
    state = hostile.wait_idle(2.0)
    assert (state["state"], state["busy"], state["queued"]) == ("ready", 0, 0)


def test_chunked_ten_mb_body_is_413(hostile: ServedApp) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "'
        for _ in range(10):
            yield b"x" * MB
        yield b'"}'

    with httpx.Client(base_url=hostile.base_url, timeout=120, headers=hostile.headers) as http:
        response = http.post(CHAT, content=chunks(), headers=JSON)
    assert_envelope(response, 413, "request_too_large")


def test_later_requests_are_fine(hostile: ServedApp) -> None:
    with httpx.Client(base_url=hostile.base_url, timeout=120, headers=hostile.headers) as http:
        reply = http.post(CHAT, json=_chat())
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
        assert http.get("/health").json()["status"] == "ok"
