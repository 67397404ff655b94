"""Rate limits on the request path, on the shared Redis (a key prefix of this module's own): 429 in
OpenAI's envelope with Retry-After and x-ratelimit headers (JSON and streaming), concurrency refusals
that use no RPM, a cancelled stream giving its slot back, per-user limits, and the admin routes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.api.cache_support import admin, chat, chat_body, new_key, new_user, serve_on_shared_redis
from tests.conftest import MODEL_ID, NO_EOS, ServedApp, create_key, make_settings, serve


@pytest.fixture(scope="module")
def app(model_path: Path) -> Iterator[ServedApp]:
    """The gateway on the shared Redis; no default limits (each test sets a key's or user's own)."""
    del model_path
    with serve_on_shared_redis() as served:
        yield served


def _body(**fields: Any) -> dict[str, Any]:
    # sampled, so every request reaches the engine (the limits apply to cache hits too)
    return chat_body(f"Hi {uuid.uuid4().hex[:6]}", **{"max_tokens": 2, "temperature": 0.7, **fields})


def _assert_refused(response: httpx.Response, kind: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == kind
    assert kind in error["message"] or (kind == "concurrency" and "concurrent" in error["message"])
    assert int(response.headers["retry-after"]) >= 1 and int(response.headers["retry-after-ms"]) >= 1
    assert response.headers["content-type"].startswith("application/json")
    return error


def test_requests_per_minute_on_json_and_streaming(app: ServedApp) -> None:
    _, headers = new_key(app, "user1", rpm=2)
    first = chat(app, headers, _body())
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    with httpx.stream(
        "POST", f"{app.base_url}/v1/chat/completions", json=_body(stream=True), headers=headers, timeout=60
    ) as stream:  # admitted stream: the headers come before the first byte
        assert stream.status_code == 200 and stream.headers["x-ratelimit-remaining-requests"] == "0"
        assert [line for line in stream.iter_lines() if line][-1] == "data: [DONE]"
    refused = chat(app, headers, _body())
    _assert_refused(refused, "requests")
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert 0 < int(refused.headers["retry-after"]) <= 60
    refused_stream = chat(app, headers, _body(stream=True))
    _assert_refused(refused_stream, "requests")
    assert refused_stream.headers["x-ratelimit-remaining-requests"] == "0"
    # the SDK sees a RateLimitError for a streaming request too
    client = openai.OpenAI(base_url=f"{app.base_url}/v1", api_key=headers["Authorization"][7:], max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**_body(stream=True))
    assert caught.value.status_code == 429 and caught.value.code == "rate_limit_exceeded"
    # a refused request with a new X-Session-Id leaves no empty session behind
    session = f"refused-{uuid.uuid4().hex[:8]}"
    _assert_refused(chat(app, headers, _body(), **{"X-Session-Id": session}), "requests")
    history = httpx.get(f"{app.base_url}/chat/history/{session}", headers=headers, timeout=30)
    assert history.status_code == 404, history.text


def test_tokens_per_minute_reserve_prompt_and_max_tokens(app: ServedApp) -> None:
    _, headers = new_key(app, "user1", tpm=200)
    first = chat(app, headers, _body(max_tokens=4))  # reserves prompt (~30) + 4
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "200"
    remaining = int(first.headers["x-ratelimit-remaining-tokens"])
    assert 200 - 60 < remaining < 200 - 4
    refused = chat(app, headers, _body(max_tokens=190))  # prompt + 190 does not fit any more
    _assert_refused(refused, "tokens")
    assert refused.headers["x-ratelimit-limit-tokens"] == "200"
    # reconciled to real usage when done: what the next request sees left equals 200 - used so far
    used = first.json()["usage"]["total_tokens"]
    second = chat(app, headers, _body(max_tokens=1))
    assert second.status_code == 200
    prompt = second.json()["usage"]["prompt_tokens"]
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 200 - used - (prompt + 1)


def test_concurrency_refusals_use_no_rpm_and_a_cancelled_stream_frees_its_slot(app: ServedApp) -> None:
    _, headers = new_key(app, "user1", rpm=2, concurrency=1)
    long_stream = _body(stream=True, max_tokens=400, logit_bias=NO_EOS)
    with (
        httpx.Client(base_url=app.base_url, timeout=60, headers=headers) as http,
        http.stream("POST", "/v1/chat/completions", json=long_stream) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()  # kept open: leaving a loop over it would close the connection
        assert next(line for line in lines if line.startswith("data: "))
        for _ in range(4):  # the slot is taken: refused for concurrency, not counted
            _assert_refused(chat(app, headers, _body()), "concurrency")
    # the stream was dropped mid-way: its slot comes back (the server notices the disconnect)
    deadline = time.monotonic() + 30
    while (response := chat(app, headers, _body())).status_code == 429:
        assert response.json()["error"]["type"] == "concurrency", response.text
        assert time.monotonic() < deadline, "the cancelled stream never released its slot"
        time.sleep(0.1)
    assert response.status_code == 200 and response.headers["x-ratelimit-remaining-requests"] == "0"
    _assert_refused(chat(app, headers, _body()), "requests")  # 2 requests used: the stream and this one


def test_user_limits_apply_across_that_users_keys(app: ServedApp) -> None:
    user = new_user(app)
    _, key_a = new_key(app, user["username"])
    _, key_b = new_key(app, user["username"])
    put = httpx.put(
        f"{app.base_url}/admin/users/{user['id']}/limits", json={"rpm": 1}, headers=admin(app), timeout=30
    )
    assert put.status_code == 200 and put.json()["effective"] == {"rpm": 1, "tpm": None, "concurrency": None}
    assert chat(app, key_a, _body()).status_code == 200
    _assert_refused(chat(app, key_b, _body()), "requests")
    # a JWT of that user counts against the same user limit
    token = httpx.post(
        f"{app.base_url}/auth/login",
        json={"username": user["username"], "password": "password-" + user["username"]},
        timeout=30,
    ).json()["access_token"]
    _assert_refused(chat(app, {"Authorization": f"Bearer {token}"}, _body()), "requests")
    # -1 lifts the limit for the user
    lifted = httpx.put(
        f"{app.base_url}/admin/users/{user['id']}/limits", json={"rpm": -1}, headers=admin(app), timeout=30
    )
    assert lifted.json()["effective"]["rpm"] is None
    assert chat(app, key_b, _body()).status_code == 200


def test_pocket_chat_is_limited_too(app: ServedApp) -> None:
    _, headers = new_key(app, "user1", rpm=1)
    body = {"prompt": "Hi", "max_tokens": 2}
    first = httpx.post(f"{app.base_url}/chat", json=body, headers=headers, timeout=60)
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-requests"] == "0"
    sessions_before = httpx.get(f"{app.base_url}/chat/history", headers=headers, timeout=30).json()["total"]
    refused = httpx.post(f"{app.base_url}/chat", json=body, headers=headers, timeout=60)
    _assert_refused(refused, "requests")
    sessions_after = httpx.get(f"{app.base_url}/chat/history", headers=headers, timeout=30).json()["total"]
    assert sessions_after == sessions_before  # a refused turn creates no session


def test_responses_are_limited_too(app: ServedApp) -> None:
    """/v1/responses goes through the same admission: over its RPM a key gets a 429 in OpenAI's envelope,
    JSON or stream (a status, not an error event), and the SDK raises RateLimitError."""
    _, headers = new_key(app, "user1", rpm=2)
    url = f"{app.base_url}/v1/responses"

    def body(**fields: Any) -> dict[str, Any]:
        return {
            "model": MODEL_ID,
            "input": f"Hi {uuid.uuid4().hex[:6]}",
            "max_output_tokens": 2,
            "temperature": 0.7,
            **fields,
        }

    first = httpx.post(url, json=body(), headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    with httpx.stream("POST", url, json=body(stream=True), headers=headers, timeout=60) as stream:
        assert stream.status_code == 200 and stream.headers["x-ratelimit-remaining-requests"] == "0"
        events = [line for line in stream.iter_lines() if line.startswith("event: ")]
    assert events[-1] in ("event: response.completed", "event: response.incomplete")
    refused = httpx.post(url, json=body(), headers=headers, timeout=60)
    _assert_refused(refused, "requests")
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    refused_stream = httpx.post(url, json=body(stream=True), headers=headers, timeout=60)
    _assert_refused(refused_stream, "requests")
    with openai.OpenAI(
        base_url=f"{app.base_url}/v1", api_key=headers["Authorization"][7:], max_retries=0
    ) as client:
        for stream_it in (False, True):
            with pytest.raises(openai.RateLimitError) as caught:
                client.responses.create(**body(stream=stream_it))
            assert caught.value.status_code == 429 and caught.value.code == "rate_limit_exceeded"


def test_admin_limit_routes(app: ServedApp) -> None:
    key = create_key(app.base_url, app.admin_token, "user1")
    url = f"{app.base_url}/admin/keys/{key['id']}/limits"
    assert httpx.get(url, headers=admin(app), timeout=30).json() == {
        "subject": f"key:{key['id']}",
        "override": {"rpm": None, "tpm": None, "concurrency": None},
        "effective": {"rpm": None, "tpm": None, "concurrency": None},
    }
    put = httpx.put(url, json={"rpm": 5, "concurrency": 2}, headers=admin(app), timeout=30)
    assert put.status_code == 200 and put.json()["override"] == {"rpm": 5, "tpm": None, "concurrency": 2}
    assert httpx.get(url, headers=admin(app), timeout=30).json()["effective"]["rpm"] == 5
    cleared = httpx.put(url, json={"rpm": None}, headers=admin(app), timeout=30)
    assert cleared.json()["override"] == {"rpm": None, "tpm": None, "concurrency": None}
    bad = httpx.put(url, json={"rpm": -2}, headers=admin(app), timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"
    unknown = httpx.put(url, json={"rps": 1}, headers=admin(app), timeout=30)
    assert unknown.status_code == 400
    missing = httpx.put(
        f"{app.base_url}/admin/keys/{'0' * 32}/limits", json={"rpm": 1}, headers=admin(app), timeout=30
    )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "key_not_found"
    no_user = httpx.get(f"{app.base_url}/admin/users/{'0' * 32}/limits", headers=admin(app), timeout=30)
    assert no_user.status_code == 404 and no_user.json()["error"]["code"] == "user_not_found"
    for method in ("GET", "PUT"):
        denied = httpx.request(method, url, json={"rpm": 1000}, headers=app.headers, timeout=30)
        assert denied.status_code == 403
    assert httpx.get(url, headers=admin(app), timeout=30).json()["override"]["rpm"] is None


def test_default_limits_come_from_settings(model_path: Path) -> None:
    del model_path
    settings = make_settings(ratelimit={"key_rpm": 1})  # no Redis: the in-process limiter
    with serve(settings) as served:
        assert chat(served, served.headers, _body()).status_code == 200
        _assert_refused(chat(served, served.headers, _body()), "requests")
        assert chat(served, served.headers, _body(model=MODEL_ID)).headers["retry-after"]


def test_a_dropped_non_streaming_request_frees_its_slot(app: ServedApp) -> None:
    _, headers = new_key(app, "user1", concurrency=1)
    with pytest.raises(httpx.ReadTimeout):  # 400 tokens take longer than the client waits
        httpx.post(
            f"{app.base_url}/v1/chat/completions",
            json=_body(max_tokens=400, logit_bias=NO_EOS),
            headers=headers,
            timeout=1.0,
        )
    deadline = time.monotonic() + 30
    while (response := chat(app, headers, _body())).status_code == 429:
        assert response.json()["error"]["type"] == "concurrency", response.text
        assert time.monotonic() < deadline, "the dropped request never released its slot"
        time.sleep(0.1)
    assert response.status_code == 200
