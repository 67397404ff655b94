"""The response cache on the request path, on the shared Redis (a key prefix of this module's own):
tenant scope, x-cache, Cache-Control and the body extension, SSE replay read by the openai SDK, admin
routes, and invalidation when a model is loaded again."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine.models import ModelManager
from gateway.cache.backend import MemoryCacheBackend
from gateway.cache.entry import CachedChoice, CachedCompletion
from gateway.cache.key import CachePolicy
from gateway.cache.service import CacheOutcome, ResponseCache
from tests.api.cache_support import admin, chat, chat_body, new_key, new_user, serve_on_shared_redis
from tests.conftest import MODEL_ID, NO_EOS, ServedApp, make_settings, serve


@pytest.fixture(scope="module")
def app(model_path: Path) -> Iterator[ServedApp]:
    """The gateway on the shared Redis."""
    del model_path
    with serve_on_shared_redis() as served:
        yield served


def _prompt() -> str:
    return f"Say hello to {uuid.uuid4().hex[:8]}."


def test_two_users_never_share_entries(app: ServedApp) -> None:
    user_b = new_user(app)
    _, headers_b = new_key(app, user_b["username"])
    body = chat_body(_prompt())
    first = chat(app, app.headers, body)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    other = chat(app, headers_b, body)  # user B: a miss, not user A's answer
    assert other.status_code == 200 and other.headers["x-cache"] == "miss"
    again = chat(app, app.headers, body)
    assert again.headers["x-cache"] == "hit"
    assert again.json()["choices"] == first.json()["choices"]
    assert again.json()["usage"]["completion_tokens"] == first.json()["usage"]["completion_tokens"]
    assert again.json()["id"] != first.json()["id"]
    assert chat(app, headers_b, body).headers["x-cache"] == "hit"
    # field order and an integral float do not change the key
    reordered = {"temperature": 0.0, "max_tokens": 4, "messages": body["messages"], "model": MODEL_ID}
    assert chat(app, app.headers, reordered).headers["x-cache"] == "hit"


def _stream(client: openai.OpenAI, content: str, **fields: Any) -> tuple[str, list[str], str, Any, int]:
    """(x-cache, content pieces, finish_reason, usage, role chunks) of a streamed chat."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": content}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **fields,
    )
    pieces, finish, usage, roles = [], "", None, 0
    for chunk in raw.parse():
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles += choice.delta.role == "assistant"
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    return raw.headers["x-cache"], pieces, finish, usage, roles


def test_a_streaming_hit_replays_a_real_multi_chunk_stream(app: ServedApp) -> None:
    client = openai.OpenAI(base_url=f"{app.base_url}/v1", api_key=app.api_key, max_retries=0)
    content = _prompt() + " Then count to ten."
    state, pieces, finish, usage, roles = _stream(client, content, logit_bias=NO_EOS)
    assert state == "miss" and finish == "length" and usage.completion_tokens == 12 and roles == 1
    state2, pieces2, finish2, usage2, roles2 = _stream(client, content, logit_bias=NO_EOS)
    assert state2 == "hit" and roles2 == 1
    assert "".join(pieces2) == "".join(pieces) and finish2 == finish
    # several content chunks, not one blob (a greedy answer to a random name is sometimes two words long)
    assert len(pieces2) >= min(3, len("".join(pieces).split()))
    assert len(pieces2) >= 2
    assert (usage2.prompt_tokens, usage2.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    # the entry a stream stored answers a JSON request too, and the raw SSE ends with [DONE]
    json_hit = client.chat.completions.with_raw_response.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": content}],
        max_tokens=12,
        temperature=0,
        logit_bias=NO_EOS,
    )
    assert json_hit.headers["x-cache"] == "hit"
    assert json_hit.parse().choices[0].message.content == "".join(pieces)
    body = {**chat_body(content, max_tokens=12, logit_bias=NO_EOS), "stream": True}
    with httpx.stream(
        "POST", f"{app.base_url}/v1/chat/completions", json=body, headers=app.headers, timeout=60
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-cache"] == "hit"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_cache_control_headers_and_body_extension(app: ServedApp) -> None:
    body = chat_body(_prompt())
    assert chat(app, app.headers, body, **{"Cache-Control": "no-store"}).headers["x-cache"] == "miss"
    assert chat(app, app.headers, body).headers["x-cache"] == "miss"  # the no-store answer was not kept
    assert chat(app, app.headers, body).headers["x-cache"] == "hit"
    assert chat(app, app.headers, body, **{"Cache-Control": "no-cache"}).headers["x-cache"] == "bypass"
    both = chat(app, app.headers, body, **{"Cache-Control": "no-cache, no-store"})
    assert both.status_code == 200 and both.headers["x-cache"] == "bypass"

    no_store = chat_body(_prompt(), cache={"no-store": True})
    assert chat(app, app.headers, no_store).headers["x-cache"] == "miss"
    assert chat(app, app.headers, no_store).headers["x-cache"] == "miss"

    sampled = chat_body(_prompt(), temperature=1)
    assert chat(app, app.headers, sampled).headers["x-cache"] == "bypass"
    assert chat(app, app.headers, sampled).headers["x-cache"] == "bypass"
    seeded = chat_body(_prompt(), temperature=1, seed=7)
    assert [chat(app, app.headers, seeded).headers["x-cache"] for _ in range(2)] == ["miss", "hit"]
    opted_in = chat_body(_prompt(), temperature=1, cache={"ttl": 600})
    assert [chat(app, app.headers, opted_in).headers["x-cache"] for _ in range(2)] == ["miss", "hit"]
    refused = chat(app, app.headers, chat_body(_prompt(), cache={"ttl": -1}))
    assert refused.status_code == 400 and refused.json()["error"]["param"].startswith("cache")


def test_text_completions_are_cached_and_replayed(app: ServedApp) -> None:
    body = {
        "model": MODEL_ID,
        "prompt": f"The {uuid.uuid4().hex[:6]} sky is",
        "max_tokens": 8,
        "temperature": 0,
    }
    url = f"{app.base_url}/v1/completions"
    first = httpx.post(url, json=body, headers=app.headers, timeout=60)
    second = httpx.post(url, json=body, headers=app.headers, timeout=60)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    client = openai.OpenAI(base_url=f"{app.base_url}/v1", api_key=app.api_key, max_retries=0)
    raw = client.completions.with_raw_response.create(**body, stream=True)
    assert raw.headers["x-cache"] == "hit"
    chunks = list(raw.parse())
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == first.json()["choices"][0]["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == first.json()["choices"][0][
        "finish_reason"
    ]


def test_admin_cache_stats_and_flush(app: ServedApp) -> None:
    body = chat_body(_prompt())
    chat(app, app.headers, body)
    assert chat(app, app.headers, body).headers["x-cache"] == "hit"
    stats = httpx.get(f"{app.base_url}/admin/cache/stats", headers=admin(app), timeout=30).json()
    assert stats["backend"] == "redis" and stats["available"] is True
    assert stats["entries"] >= 1 and stats["bytes"] > 0 and stats["hits"] >= 1 and stats["misses"] >= 1
    assert 0 < stats["hit_ratio"] < 1
    for method, path in (("GET", "/admin/cache/stats"), ("POST", "/admin/cache/flush")):
        denied = httpx.request(method, f"{app.base_url}{path}", headers=app.headers, timeout=30)
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
    flushed = httpx.post(f"{app.base_url}/admin/cache/flush", headers=admin(app), timeout=30)
    assert flushed.status_code == 200 and flushed.json()["flushed"] >= 1
    after = httpx.get(f"{app.base_url}/admin/cache/stats", headers=admin(app), timeout=30).json()
    assert after["entries"] == 0 and after["bytes"] == 0
    assert chat(app, app.headers, body).headers["x-cache"] == "miss"


def test_cache_disabled_answers_bypass(model_path: Path) -> None:
    del model_path
    with serve(make_settings(cache={"enabled": False})) as served:
        body = chat_body(_prompt())
        states = [chat(served, served.headers, body).headers["x-cache"] for _ in range(2)]
        assert states == ["bypass", "bypass"]
        stats = httpx.get(f"{served.base_url}/admin/cache/stats", headers=admin(served), timeout=30).json()
        assert stats["backend"] == "memory" and stats["enabled"] is False and stats["entries"] == 0


def test_loading_a_model_again_drops_its_entries(model_path: Path) -> None:
    del model_path
    cache = ResponseCache(MemoryCacheBackend())
    settings = make_settings(model={"slots": 1})
    models = ModelManager(settings.served_models(), settings.queue, on_reload=cache.invalidate_model)
    request = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    answer = CachedCompletion(
        choices=[CachedChoice(index=0, text="Hello", finish_reason="stop")],
        prompt_tokens=3,
        completion_tokens=1,
    )

    async def lookup() -> CacheOutcome:
        runtime = models.resolve(MODEL_ID)
        found = await cache.lookup(
            user="u", model_id=runtime.id, model_digest=runtime.digest, request=request, policy=CachePolicy()
        )
        if found.outcome is CacheOutcome.MISS:
            assert await cache.store(found, answer)
        return found.outcome

    async def main() -> list[CacheOutcome]:
        try:
            assert await models.load(MODEL_ID)
            outcomes = [await lookup(), await lookup()]
            await models.unload(MODEL_ID)
            assert await models.load(MODEL_ID)
            return [*outcomes, await lookup()]
        finally:
            await models.close()

    assert asyncio.run(main()) == [CacheOutcome.MISS, CacheOutcome.HIT, CacheOutcome.MISS]


def test_logprobs_are_cached_and_replayed_token_by_token(app: ServedApp) -> None:
    body = chat_body(_prompt(), logprobs=True, top_logprobs=2, max_tokens=6, logit_bias=NO_EOS)
    first = chat(app, app.headers, body)
    hit = chat(app, app.headers, body)
    assert (first.headers["x-cache"], hit.headers["x-cache"]) == ("miss", "hit")
    assert hit.json()["choices"][0]["logprobs"] == first.json()["choices"][0]["logprobs"]
    entries = first.json()["choices"][0]["logprobs"]["content"]
    assert len(entries) == 6 and all(len(e["top_logprobs"]) == 2 for e in entries)
    with httpx.stream(
        "POST",
        f"{app.base_url}/v1/chat/completions",
        json={**body, "stream": True},
        headers=app.headers,
        timeout=60,
    ) as response:
        assert response.headers["x-cache"] == "hit"
        payloads = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    streamed = [
        entry
        for p in payloads
        for c in p["choices"]
        if c.get("logprobs")
        for entry in c["logprobs"]["content"]
    ]
    assert streamed == entries
    text = "".join(c["delta"].get("content", "") for p in payloads for c in p["choices"])
    assert text == first.json()["choices"][0]["message"]["content"]
