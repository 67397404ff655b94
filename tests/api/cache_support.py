"""Helpers of the cache and rate-limit API tests: users, keys, limit overrides, shared-Redis prefixes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import httpx

from tests.conftest import MODEL_ID, ServedApp, create_key, make_settings, serve
from tests.unit.gateway.conftest import _delete_prefix


def unique_prefix() -> str:
    """A key prefix of the test module's own on the shared Redis."""
    return f"pocketllm-test:{uuid.uuid4().hex}:"


def drop_prefix(prefix: str) -> None:
    """Delete every key under ``prefix`` on the shared Redis."""
    asyncio.run(_delete_prefix(prefix))


def admin(app: ServedApp) -> dict[str, str]:
    """The admin's bearer header."""
    return {"Authorization": f"Bearer {app.admin_token}"}


def new_user(app: ServedApp) -> dict[str, Any]:
    """A fresh user (its record from the admin route)."""
    name = f"u{uuid.uuid4().hex[:12]}"
    response = httpx.post(
        f"{app.base_url}/admin/users",
        json={"username": name, "password": "password-" + name},
        headers=admin(app),
        timeout=30,
    )
    assert response.status_code == 201, response.text
    user: dict[str, Any] = response.json()
    return user


def new_key(app: ServedApp, username: str, **limits: int | None) -> tuple[str, dict[str, str]]:
    """A key of ``username`` (id, auth header), with a limit override when ``limits`` are given."""
    created = create_key(app.base_url, app.admin_token, username)
    if limits:
        response = httpx.put(
            f"{app.base_url}/admin/keys/{created['id']}/limits", json=limits, headers=admin(app), timeout=30
        )
        assert response.status_code == 200, response.text
    return created["id"], {"Authorization": f"Bearer {created['key']}"}


def chat_body(content: str, **fields: Any) -> dict[str, Any]:
    """A short greedy chat request (cacheable unless ``fields`` say otherwise)."""
    return {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "temperature": 0,
        **fields,
    }


def chat(app: ServedApp, headers: dict[str, str], body: dict[str, Any], **extra: str) -> httpx.Response:
    """POST /v1/chat/completions."""
    return httpx.post(
        f"{app.base_url}/v1/chat/completions", json=body, headers={**headers, **extra}, timeout=120
    )


@contextlib.contextmanager
def serve_on_shared_redis(prefix: str | None = None, **cache: Any) -> Iterator[ServedApp]:
    """The gateway on the shared Redis under a key prefix of its own (``prefix``, or a new one), dropped
    afterwards; ``cache`` are ``[cache]`` settings."""
    prefix = prefix or unique_prefix()
    settings = make_settings(redis={"host": "127.0.0.1", "key_prefix": prefix, "timeout_s": 2.0}, cache=cache)
    try:
        with serve(settings) as served:
            yield served
    finally:
        drop_prefix(prefix)
