"""Upstream models against a real ``llama-server`` on loopback (and a second ``pocketllm serve`` process):
the openai SDK through the gateway, usage and TPM corrected by the upstream's usage, per-key model lists,
the cache, retries before the first byte, the error envelope when every replica is down, a client that
leaves closing the upstream request, /chat, and a gateway in front of a gateway.

``llama-server`` is built by ``bench/build_llama_server.py`` (cached under ~/.cache/pocketllm); these tests
are skipped, saying so, only when it cannot be built.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.api.cache_support import new_key
from tests.conftest import MODEL_ID, NO_EOS, ServedApp, create_key, free_port, login, serve
from tests.serve_support import server_env, start_server, wait_healthy

pytestmark = pytest.mark.slow

REMOTE = "remote-smol"
RETRY = "retry-smol"
DOWN = "down-smol"


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused


@pytest.fixture(scope="module")
def llama_server_binary() -> Path:
    """The ``llama-server`` binary (built once and cached)."""
    cached = sorted(Path.home().glob(".cache/pocketllm/llama-server-*/build/bin/llama-server"))
    if cached:
        return cached[-1]
    from bench.build_llama_server import DEFAULT_CACHE, build  # noqa: PLC0415

    try:
        return build(DEFAULT_CACHE, 2)
    except (OSError, subprocess.CalledProcessError) as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"llama-server could not be built: {exc}")


@contextlib.contextmanager
def run_llama_server(binary: Path, model: Path) -> Iterator[str]:
    """``llama-server`` with the SmolLM2 model on a free loopback port; yields its base URL (no /v1)."""
    port = free_port()
    process = subprocess.Popen(
        [
            *(str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)),
            *("-np", "2", "-c", "2048", "-t", "1", "--slots", "--no-webui"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"llama-server exited: {process.stderr.read() if process.stderr else ''}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "llama-server never became healthy"
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


@pytest.fixture(scope="module")
def llama(llama_server_binary: Path, model_path: Path) -> Iterator[str]:
    """A running llama-server (base URL without /v1)."""
    with run_llama_server(llama_server_binary, model_path) as base:
        yield base


def upstream_settings(models: list[dict[str, Any]]) -> Any:
    import tempfile  # noqa: PLC0415

    from gateway.settings import settings_from_mapping  # noqa: PLC0415

    return settings_from_mapping(
        {
            "models": models,
            "queue": {"ping_interval_s": 0.5},
            "data_dir": tempfile.mkdtemp(prefix="pocketllm-up-"),
        }
    )


@pytest.fixture(scope="module")
def app(llama: str) -> Iterator[ServedApp]:
    """The gateway with three upstream models: one on llama-server, one whose first replica refuses
    connections, one whose every replica does."""
    settings = upstream_settings(
        [
            {"id": REMOTE, "upstream": {"urls": [f"{llama}/v1"], "model": "smollm2"}},
            {
                "id": RETRY,
                "upstream": {"urls": [_closed_port_url(), f"{llama}/v1"], "health_interval_s": 60.0},
            },
            {
                "id": DOWN,
                "upstream": {"urls": [_closed_port_url(), _closed_port_url()], "connect_timeout_s": 1.0},
            },
        ]
    )
    with serve(settings) as served:
        yield served


def sdk(app: ServedApp, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.base_url}/v1", api_key=key or app.api_key, max_retries=0)


def _slots_idle(llama: str) -> bool:
    slots = httpx.get(f"{llama}/slots", timeout=5).json()
    return not any(slot.get("is_processing") for slot in slots)


MESSAGES = [{"role": "user", "content": "Name three colours."}]


def test_models_list_and_health_show_upstream(app: ServedApp) -> None:
    with sdk(app) as client:
        ids = {m.id for m in client.models.list()}
    assert {REMOTE, RETRY, DOWN} <= ids
    health = app.health()
    assert health["status"] == "ok"
    replicas = health["models"][REMOTE]["replicas"]
    assert replicas[0]["state"] == "healthy" and "url" not in replicas[0]


def test_sdk_json_and_stream_with_usage(app: ServedApp, llama: str) -> None:
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    direct = httpx.post(f"{llama}/v1/chat/completions", json=body, timeout=60).json()
    with sdk(app) as client:
        answer = client.chat.completions.create(
            model=REMOTE, **body, extra_headers={"Cache-Control": "no-store"}
        )
        assert answer.model == REMOTE and answer.id.startswith("chatcmpl-")
        assert answer.choices[0].message.content == direct["choices"][0]["message"]["content"]
        assert answer.usage is not None
        assert answer.usage.prompt_tokens == direct["usage"]["prompt_tokens"]  # the upstream's count
        assert answer.usage.completion_tokens == direct["usage"]["completion_tokens"]
        chunks = list(
            client.chat.completions.create(
                model=REMOTE,
                **body,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"Cache-Control": "no-store"},
            )
        )
    assert len({c.id for c in chunks}) == 1 and all(c.model == REMOTE for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct["choices"][0]["message"]["content"]
    assert (
        sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3
    )  # one chunk per upstream chunk
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [direct["choices"][0]["finish_reason"]]


def test_text_completions_and_n(app: ServedApp) -> None:
    with sdk(app) as client:
        answer = client.completions.create(
            model=REMOTE, prompt="The capital of France is", max_tokens=5, temperature=0, n=2, echo=True
        )
    assert len(answer.choices) == 2
    assert all(c.text.startswith("The capital of France is") for c in answer.choices)
    assert answer.usage is not None and answer.usage.completion_tokens == 10


def test_tpm_is_corrected_with_upstream_usage(app: ServedApp) -> None:
    _, headers = new_key(app, "user1", tpm=5000)
    body = {"model": REMOTE, "messages": MESSAGES, "max_tokens": 6, "temperature": 0.7}

    def call() -> httpx.Response:
        response = httpx.post(f"{app.base_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        return response

    call()
    second, third = call(), call()
    # identical requests reserve the same estimate: what the third sees less is what the second used,
    # as the upstream counted it
    used = second.json()["usage"]["total_tokens"]
    assert (
        int(second.headers["x-ratelimit-remaining-tokens"])
        - int(third.headers["x-ratelimit-remaining-tokens"])
        == used
    )


def test_per_key_model_list_and_cache(app: ServedApp) -> None:
    limited = create_key(app.base_url, app.admin_token, "user1", models=[MODEL_ID])["key"]
    with sdk(app, limited) as client, pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=REMOTE, messages=MESSAGES, max_tokens=4)
    body = {
        "model": REMOTE,
        "messages": [{"role": "user", "content": f"Say {uuid.uuid4().hex[:6]}"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with httpx.Client(base_url=app.base_url, headers=app.headers, timeout=60) as http:
        first = http.post("/v1/chat/completions", json=body)
        second = http.post("/v1/chat/completions", json=body)
        streamed = http.post("/v1/chat/completions", json={**body, "stream": True})
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert (
        second.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    )
    assert streamed.headers["x-cache"] == "hit"


def test_retry_before_first_byte_on_another_replica(app: ServedApp) -> None:
    with sdk(app) as client:
        for _ in range(3):
            answer = client.chat.completions.create(model=RETRY, messages=MESSAGES, max_tokens=4)
            assert answer.choices[0].message.content
    info = httpx.get(
        f"{app.base_url}/admin/model/info", headers={"Authorization": f"Bearer {app.admin_token}"}, timeout=30
    ).json()
    retry = next(m for m in info["models"] if m["id"] == RETRY)
    dead, live = retry["upstream"]["replicas"]
    assert dead["state"] == "ejected" and dead["last_error"] == "connect" and dead["requests"] == 1
    assert live["state"] == "healthy" and live["requests"] == 3
    assert retry["provider"] == "openai" and "key" not in str(retry["upstream"]["api_key_set"])


def test_every_replica_down_is_a_502_envelope(app: ServedApp) -> None:
    with httpx.Client(base_url=app.base_url, headers=app.headers, timeout=60) as http:
        for stream in (False, True):
            response = http.post(
                "/v1/chat/completions",
                json={"model": DOWN, "messages": MESSAGES, "max_tokens": 4, "stream": stream},
            )
            assert response.status_code == 502, response.text
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "upstream_unavailable" and error["type"] == "server_error"
            assert "127.0.0.1" not in error["message"] and "http" not in error["message"]
            assert "retry-after" in response.headers
    with sdk(app) as client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=DOWN, messages=MESSAGES, max_tokens=4)
    assert caught.value.status_code == 502


def test_client_that_leaves_frees_the_upstream_slot(app: ServedApp, llama: str) -> None:
    body = {"model": REMOTE, "messages": MESSAGES, "max_tokens": 1000, "stream": True, "logit_bias": NO_EOS}
    with (
        httpx.Client(base_url=app.base_url, headers=app.headers, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(5):
            next(line for line in lines if line.startswith("data: "))
        assert not _slots_idle(llama)
    left = time.monotonic()
    while not _slots_idle(llama):
        assert time.monotonic() - left < 1.0, "the upstream kept generating after the client left"
        time.sleep(0.05)


def test_pocket_chat_through_an_upstream_model(app: ServedApp) -> None:
    with httpx.Client(base_url=app.base_url, headers=app.headers, timeout=60) as http:
        reply = http.post("/chat", json={"prompt": "Hello!", "model": REMOTE, "max_tokens": 8})
        assert reply.status_code == 200, reply.text
        session = reply.json()["session_id"]
        assert reply.json()["response"] and reply.json()["model"] == REMOTE
        again = http.post(
            "/chat", json={"prompt": "And again?", "model": REMOTE, "max_tokens": 8, "session_id": session}
        )
        assert again.status_code == 200, again.text
        history = http.get(f"/chat/history/{session}")
        assert history.status_code == 200
        assert len(history.json()["messages"]) == 4


def test_gateway_in_front_of_a_gateway(model_path: Path) -> None:
    del model_path  # pulled: the inner gateway serves it
    port = free_port()
    inner = start_server(
        port,
        server_env(POCKETLLM_MODEL__N_THREADS="1", POCKETLLM_MODEL__SLOTS="2", POCKETLLM_MODEL__N_CTX="2048"),
    )
    inner_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(inner, inner_url)
        admin = login(inner_url, "admin", "admin123")
        os.environ["POCKETLLM_TEST_INNER_KEY"] = create_key(inner_url, admin, "user1")["key"]
        settings = upstream_settings(
            [
                {
                    "id": "outer",
                    "upstream": {
                        "urls": [f"{inner_url}/v1"],
                        "model": MODEL_ID,
                        "api_key_env": "POCKETLLM_TEST_INNER_KEY",
                    },
                }
            ]
        )
        with serve(settings) as outer:
            request_id = f"outer-{uuid.uuid4().hex[:8]}"
            with sdk(outer) as client:
                answer = client.chat.completions.create(
                    model="outer",
                    messages=MESSAGES,
                    max_tokens=6,
                    temperature=0,
                    extra_headers={"X-Request-Id": request_id},
                )
                chunks = list(
                    client.chat.completions.create(
                        model="outer",
                        messages=MESSAGES,
                        max_tokens=6,
                        stream=True,
                        stream_options={"include_usage": True},
                        extra_headers={"Cache-Control": "no-store"},
                    )
                )
            assert answer.model == "outer" and answer.choices[0].message.content
            assert answer.usage is not None and answer.usage.prompt_tokens > 5
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    finally:
        os.environ.pop("POCKETLLM_TEST_INNER_KEY", None)
        inner.terminate()
        output, _ = inner.communicate(timeout=30)
    assert f"request_id={request_id}" in output  # the request id went along
