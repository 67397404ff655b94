"""Several models at once: ids, aliases and a chat-template override."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.settings import settings_from_mapping
from tests.conftest import ServedApp, serve

# Renders only the last message's text, with no role markers: a visibly different prompt.
PLAIN_TEMPLATE = "{{ messages[-1]['content'] }}"


@pytest.fixture(scope="module")
def two_models(model_path: Path) -> Iterator[ServedApp]:
    settings = settings_from_mapping(
        {
            "data_dir": tempfile.mkdtemp(prefix="pocketllm-test-"),
            "models": [
                {
                    "id": "chat-a",
                    "path": str(model_path),
                    "n_ctx": 1024,
                    "slots": 1,
                    "n_threads": 2,
                    "aliases": ["gpt-3.5-turbo"],
                    "embeddings": False,
                },
                {
                    "id": "plain-b",
                    "path": str(model_path),
                    "n_ctx": 1024,
                    "slots": 1,
                    "n_threads": 2,
                    "chat_template": PLAIN_TEMPLATE,
                },
            ],
        }
    )
    with serve(settings) as app:
        yield app


def test_both_models_and_the_alias_are_listed_and_served(two_models: ServedApp) -> None:
    with httpx.Client(base_url=two_models.base_url, timeout=60, headers=two_models.headers) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [
            "chat-a",
            "gpt-3.5-turbo",
            "plain-b",
        ]
        health = http.get("/health").json()["models"]
        assert set(health) == {"chat-a", "plain-b"}
        messages = [{"role": "user", "content": "Hello there"}]
        usage = {}
        for name in ("chat-a", "gpt-3.5-turbo", "plain-b"):
            reply = http.post(
                "/v1/chat/completions", json={"model": name, "messages": messages, "max_tokens": 3}
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["model"] == name
            usage[name] = reply.json()["usage"]["prompt_tokens"]
        assert usage["chat-a"] == usage["gpt-3.5-turbo"]
        # the override renders no system prompt or role markers: far fewer prompt tokens
        assert usage["plain-b"] < usage["chat-a"] - 10


def test_embeddings_can_be_turned_off_per_model(two_models: ServedApp) -> None:
    with httpx.Client(base_url=two_models.base_url, timeout=60, headers=two_models.headers) as http:
        refused = http.post("/v1/embeddings", json={"model": "chat-a", "input": "x"})
        assert refused.status_code == 404
        assert http.post("/v1/embeddings", json={"model": "plain-b", "input": "x"}).status_code == 200
