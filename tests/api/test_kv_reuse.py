"""KV reuse through the API: a returning chat session reports its reused tokens, another user's does not."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.conftest import MODEL_ID, make_settings, serve

SYSTEM = "You are the archivist of a small harbour town. Answer briefly and kindly. " * 6


def _opening(topic: str) -> str:
    return f"Tell me about {topic}. " + f"Some background on {topic}: it is old, quiet and well kept. " * 25


def _chat(
    base_url: str, token: str, messages: list[dict[str, str]], session: str | None = None
) -> tuple[str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    if session:
        headers["X-Session-Id"] = session
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": MODEL_ID, "messages": messages, "max_tokens": 12, "temperature": 0},
        headers=headers,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return body["choices"][0]["message"]["content"], body["usage"]


def test_a_session_back_after_others_took_the_slots_reports_cached_tokens_only_to_its_user() -> None:
    with serve(make_settings(cache={"enabled": False})) as served:
        url, key = served.base_url, served.api_key
        session = uuid.uuid4().hex
        history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _opening("the mill")}]
        reply, usage = _chat(url, key, history, session)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        for topic in ("the market", "the bakery", "the harbour"):  # three other sessions, two slots
            _chat(url, key, [{"role": "user", "content": _opening(topic)}], uuid.uuid4().hex)

        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Who lives there?"}]
        _, returning = _chat(url, key, history, session)
        assert returning["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"]

        # the admin is another user: the same conversation reuses at most the shared system prompt
        _, other = _chat(url, served.admin_token, history)
        assert 0 < other["prompt_tokens_details"]["cached_tokens"] < other["prompt_tokens"] // 2
