"""KV reuse through the API: a returning chat session reports its reused tokens, another user's does not;
``prompt_cache_key`` keeps its prefix in a slot that other traffic would otherwise take."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.conftest import MODEL_ID, make_settings, serve

SYSTEM = "You are the archivist of a small harbour town. Answer briefly and kindly. " * 6


def _opening(topic: str) -> str:
    return f"Tell me about {topic}. " + f"Some background on {topic}: it is old, quiet and well kept. " * 25


def _chat(
    base_url: str,
    token: str,
    messages: list[dict[str, str]],
    session: str | None = None,
    prompt_cache_key: str | None = None,
) -> tuple[str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    if session:
        headers["X-Session-Id"] = session
    body: dict[str, Any] = {"model": MODEL_ID, "messages": messages, "max_tokens": 12, "temperature": 0}
    if prompt_cache_key:
        body["prompt_cache_key"] = prompt_cache_key
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        json=body,
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


MANUAL = "From the lighthouse keeper's manual: trim the wick, wind the clockwork, log the weather. " * 8


def test_prompt_cache_key_keeps_its_prefix_in_the_slot_other_traffic_would_take() -> None:
    """Two requests with one ``prompt_cache_key`` and a long shared prefix, two other requests between them
    (two slots): the second reuses the prefix. The same four requests without the key lose it, because the
    least recently used slot, the one holding the prefix, goes to the other traffic. The host KV cache is
    off: with it, a prefix pushed out of its slot is restored into any slot, key or no key."""
    with serve(make_settings(cache={"enabled": False}, model={"kv_cache_mib": 0})) as served:
        url, key = served.base_url, served.api_key
        reused = {}
        for cache_key in (None, "lighthouse-manual"):  # without the key first: no slot holds the prefix yet
            first = [{"role": "user", "content": MANUAL + "What comes first?"}]
            _, opened = _chat(url, key, first, prompt_cache_key=cache_key)
            for topic in ("the market", "the bakery"):  # unrelated: they take the least recently used slot
                _chat(url, key, [{"role": "user", "content": _opening(topic)}])
            second = [{"role": "user", "content": MANUAL + "What comes last?"}]
            _, returning = _chat(url, key, second, prompt_cache_key=cache_key)
            reused[cache_key] = returning["prompt_tokens_details"]["cached_tokens"]
            shared = opened["prompt_tokens"] - 16  # the manual and the template's opening, not the question
            if cache_key is None:
                assert reused[cache_key] < shared // 2, reused  # at most the template's opening
            else:
                assert reused[cache_key] >= shared, (reused, opened["prompt_tokens"])
