"""Upstream models against a real ``llama-server`` on loopback (and a second ``pocketllm serve`` process):
the openai SDK through the gateway, usage and TPM corrected by the upstream's usage, per-key model lists,
the cache, retries before the first byte, the error envelope when every replica is down, a client that
leaves closing the upstream request, /chat, a gateway in front of a gateway, /v1/responses, tools (passed
to llama-server; real calls from a gateway upstream), pings while waiting for room on a replica, an upstream
429 with Retry-After, traceparent reaching the upstream, and embeddings from llama-server ``--embeddings``.

``llama-server`` is built by ``bench/build_llama_server.py`` (cached under ~/.cache/pocketllm); these tests
are skipped, saying so, only when it cannot be built.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests import upstream_support
from tests.api.cache_support import new_key
from tests.conftest import MODEL_ID, NO_EOS, ServedApp, create_key, free_port, login, serve
from tests.serve_support import server_env, start_server, wait_healthy

pytestmark = pytest.mark.slow

REMOTE = "remote-smol"
RETRY = "retry-smol"
DOWN = "down-smol"
BUSY = "busy-smol"
EMBED = "embed-smol"
TOOLS = "tools-smol"


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused


@pytest.fixture(scope="module")
def llama_server_binary() -> Path:
    """The ``llama-server`` binary for the installed llama-cpp-python (built once and cached); the tests are
    skipped, saying why, when there is none and it cannot be built (see ``tests.upstream_support``)."""
    return upstream_support.llama_server_binary()


@contextlib.contextmanager
def run_llama_server(binary: Path, model: Path, *extra: str) -> Iterator[str]:
    """``llama-server`` with the SmolLM2 model on a free loopback port (``--jinja``: the model's own chat
    template renders messages and tools); yields its base URL (no /v1). Its output goes to a log file (a
    pipe nobody reads would block it once full), whose tail is shown if it exits early."""
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="pocketllm-llama-server-")) / "llama-server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)),
                *("-np", "2", "-c", "2048", "-t", "1", "--slots", "--no-webui", "--jinja", *extra),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise AssertionError(f"llama-server exited ({process.returncode}); log {log_path}:\n{tail}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"llama-server never became healthy (log {log_path})"
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def llama(llama_server_binary: Path, model_path: Path) -> Iterator[str]:
    """A running llama-server (base URL without /v1)."""
    with run_llama_server(llama_server_binary, model_path) as base:
        yield base


@pytest.fixture(scope="module")
def llama_embed(llama_server_binary: Path, model_path: Path) -> Iterator[str]:
    """A llama-server serving embeddings only (``--embeddings``; mean pooling of SmolLM2)."""
    with run_llama_server(llama_server_binary, model_path, "--embeddings", "--pooling", "mean") as base:
        yield base


@pytest.fixture(scope="module")
def llama_tools(llama_server_binary: Path, model_path: Path) -> Iterator[str]:
    """A llama-server whose chat template renders tools (Qwen2.5's: the same ChatML tokens as SmolLM2's,
    whose own template leaves tools out of the prompt)."""
    template = llama_server_binary.parents[2] / "llama.cpp/models/templates/Qwen-Qwen2.5-7B-Instruct.jinja"
    if not template.exists():  # pragma: no cover - depends on the cached build
        pytest.skip(f"no tool-calling chat template in the llama.cpp checkout ({template})")
    with run_llama_server(llama_server_binary, model_path, "--chat-template-file", str(template)) as base:
        yield base


def upstream_settings(models: list[dict[str, Any]]) -> Any:
    from gateway.settings import settings_from_mapping  # noqa: PLC0415

    return settings_from_mapping(
        {
            "models": models,
            "queue": {"ping_interval_s": 0.5},
            "data_dir": tempfile.mkdtemp(prefix="pocketllm-up-"),
        }
    )


@pytest.fixture(scope="module")
def app(llama: str, llama_embed: str, llama_tools: str) -> Iterator[ServedApp]:
    """The gateway with upstream models: one on llama-server, one whose first replica refuses connections,
    one whose every replica does, one limited to a request at a time, one serving embeddings, one whose template renders tools."""
    settings = upstream_settings(
        [
            {"id": REMOTE, "upstream": {"urls": [f"{llama}/v1"], "model": "smollm2"}},
            {
                "id": RETRY,
                "upstream": {"urls": [_closed_port_url(), f"{llama}/v1"], "health_interval_s": 60.0},
            },
            {"id": BUSY, "upstream": {"urls": [f"{llama}/v1"], "max_concurrency": 1}},
            {"id": EMBED, "upstream": {"urls": [f"{llama_embed}/v1"]}},
            {"id": TOOLS, "upstream": {"urls": [f"{llama_tools}/v1"]}},
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


# --- the Responses API, tools, pings, 429, traceparent and embeddings through upstreams ---------------
WEATHER_CHAT = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_RESPONSES = {"type": "function", **WEATHER_CHAT["function"]}  # type: ignore[dict-item]
NO_STORE = {"Cache-Control": "no-store"}


def _direct_chat(llama: str, **body: Any) -> dict[str, Any]:
    reply = httpx.post(f"{llama}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    message: dict[str, Any] = reply.json()["choices"][0]
    return message


def test_responses_json_stream_and_chain_on_an_upstream_model(app: ServedApp, llama: str) -> None:
    direct = _direct_chat(llama, messages=MESSAGES, max_tokens=12, temperature=0)
    with sdk(app) as client:
        created = client.responses.create(
            model=REMOTE,
            input=MESSAGES[0]["content"],
            max_output_tokens=12,
            temperature=0,
            extra_headers=NO_STORE,
        )
        assert created.model == REMOTE and created.id.startswith("resp_")
        assert created.output_text == direct["message"]["content"]
        assert created.status == ("incomplete" if direct["finish_reason"] == "length" else "completed")
        assert created.usage is not None and created.usage.output_tokens == 12
        assert client.responses.retrieve(created.id) == created  # stored

        events = list(
            client.responses.create(
                model=REMOTE,
                input=MESSAGES[0]["content"],
                max_output_tokens=12,
                temperature=0,
                stream=True,
                extra_headers=NO_STORE,
            )
        )
        kinds = [event.type for event in events]
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert kinds.count("response.output_text.delta") >= 3  # one per upstream chunk
        assert kinds[-1] in ("response.completed", "response.incomplete")
        streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        final = events[-1].response  # type: ignore[union-attr]
        assert streamed == final.output_text == direct["message"]["content"]
        assert client.responses.retrieve(final.id) == final

        # a chain: the upstream gets the first turn (input and answer) before the new input
        second = client.responses.create(
            model=REMOTE,
            previous_response_id=created.id,
            input="And one more?",
            max_output_tokens=8,
            temperature=0,
        )
    again = _direct_chat(
        llama,
        messages=[
            *MESSAGES,
            {"role": "assistant", "content": created.output_text},
            {"role": "user", "content": "And one more?"},
        ],
        max_tokens=8,
        temperature=0,
    )
    assert second.output_text == again["message"]["content"]
    assert second.previous_response_id == created.id


def test_responses_function_call_items_reach_the_upstream_as_chat_messages(
    app: ServedApp, llama: str
) -> None:
    items: list[Any] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
    ]
    with sdk(app) as client:
        answered = client.responses.create(
            model=REMOTE,
            input=items,
            tools=[WEATHER_RESPONSES],  # type: ignore[list-item]
            tool_choice="none",
            max_output_tokens=16,
            temperature=0,
        )
    direct = _direct_chat(
        llama,
        messages=[
            items[0],
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
        ],
        tools=[WEATHER_CHAT],
        tool_choice="none",
        max_tokens=16,
        temperature=0,
    )
    assert [item.type for item in answered.output] == ["message"]
    assert answered.output_text == direct["message"]["content"]


def test_tools_are_passed_to_llama_server(app: ServedApp, llama_tools: str) -> None:
    """SmolLM2-135M on llama-server (``--jinja``) does not call a function, even with ``tool_choice``
    required (llama-server's grammar lets free text come first, and this model never gets to the call;
    llama-server also ignores a named ``tool_choice`` object), so what is tested here is that the request,
    tools included, reaches it: a template that renders tools (Qwen2.5's, same ChatML tokens) makes the
    prompt longer by the tools, as the upstream's own usage shows, and the answer is well-formed text."""
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = httpx.post(
        f"{llama_tools}/v1/chat/completions", json={"messages": question, "max_tokens": 1}, timeout=60
    ).json()
    with sdk(app) as client:
        for choice in ("auto", "required", "none"):
            body: dict[str, Any] = {"tools": [WEATHER_CHAT], "tool_choice": choice, "max_tokens": 16}
            direct = httpx.post(
                f"{llama_tools}/v1/chat/completions",
                json={"messages": question, **body, "temperature": 0},
                timeout=60,
            ).json()
            answer = client.chat.completions.create(
                model=TOOLS, messages=question, **body, temperature=0, extra_headers=NO_STORE
            )
            assert answer.usage is not None
            assert answer.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
            assert answer.usage.prompt_tokens > plain["usage"]["prompt_tokens"] + 50  # the tools are in it
            # (not the same text: greedy decoding over llama-server's reused prompt cache is not bit-exact)
            assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
            assert not answer.choices[0].message.tool_calls and not direct["choices"][0]["message"].get(
                "tool_calls"
            )


def test_a_stream_waiting_for_room_on_a_replica_gets_pings(app: ServedApp) -> None:
    hold = {"model": BUSY, "messages": MESSAGES, "max_tokens": 1000, "stream": True, "logit_bias": NO_EOS}
    wait = {"model": BUSY, "messages": MESSAGES, "max_tokens": 4, "stream": True, **{"temperature": 0.5}}
    with (
        httpx.Client(base_url=app.base_url, headers=app.headers, timeout=60) as first_http,
        httpx.Client(base_url=app.base_url, headers={**app.headers, **NO_STORE}, timeout=60) as second_http,
    ):
        with contextlib.ExitStack() as holding:
            held = holding.enter_context(first_http.stream("POST", "/v1/chat/completions", json=hold))
            assert held.status_code == 200
            held_lines = held.iter_lines()  # kept: a dropped iterator closes the connection
            next(line for line in held_lines if line.startswith("data: "))  # the only room is taken
            started = time.monotonic()
            with second_http.stream("POST", "/v1/chat/completions", json=wait) as waiting:
                assert waiting.status_code == 200
                lines = waiting.iter_lines()
                seen: list[str] = []
                for line in lines:
                    if not line:
                        continue
                    seen.append(line)
                    if seen.count(": ping") == 2:
                        break
                assert all(line == ": ping" for line in seen), seen
                assert time.monotonic() - started < 5  # every ping_interval_s (0.5 s here)
                holding.close()  # the first client leaves: the replica has room again
                rest = [line for line in lines if line]
        assert rest and rest[-1] == "data: [DONE]"
        assert rest[0].startswith("data: ") or rest[0] == ": ping"
        assert any('"content"' in line for line in rest)


# --- a second `pocketllm serve` as the upstream: tool calls, 429 with Retry-After, traceparent ---------
VIA = "via-gateway"
LIMITED = "via-gateway-limited"


class Inner:
    """A `pocketllm serve` process; its output is read as it comes (``lines``)."""

    def __init__(self) -> None:
        import threading  # noqa: PLC0415

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = start_server(
            self.port,
            server_env(
                POCKETLLM_MODEL__N_THREADS="1", POCKETLLM_MODEL__SLOTS="2", POCKETLLM_MODEL__N_CTX="2048"
            ),
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture(scope="module")
def outer(model_path: Path) -> Iterator[tuple[ServedApp, Inner]]:
    """A gateway whose models are served by another gateway: one with an ordinary key, one with a key
    limited to 1 request a minute there."""
    del model_path  # pulled: the inner gateway serves it
    inner = Inner()
    try:
        deadline = time.monotonic() + 90
        while True:
            assert inner.process.poll() is None, "".join(inner.lines)
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{inner.url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the inner gateway never became healthy"
            time.sleep(0.2)
        admin = login(inner.url, "admin", "admin123")
        os.environ["POCKETLLM_TEST_VIA_KEY"] = create_key(inner.url, admin, "user1")["key"]
        limited = create_key(inner.url, admin, "user1")
        put = httpx.put(
            f"{inner.url}/admin/keys/{limited['id']}/limits",
            json={"rpm": 1},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        )
        assert put.status_code == 200, put.text
        os.environ["POCKETLLM_TEST_LIMITED_KEY"] = limited["key"]
        upstream = {"urls": [f"{inner.url}/v1"], "model": MODEL_ID}
        settings = upstream_settings(
            [
                {"id": VIA, "upstream": {**upstream, "api_key_env": "POCKETLLM_TEST_VIA_KEY"}},
                {"id": LIMITED, "upstream": {**upstream, "api_key_env": "POCKETLLM_TEST_LIMITED_KEY"}},
            ]
        )
        with serve(settings) as served:
            yield served, inner
    finally:
        os.environ.pop("POCKETLLM_TEST_VIA_KEY", None)
        os.environ.pop("POCKETLLM_TEST_LIMITED_KEY", None)
        inner.stop()


def test_tool_calls_through_an_upstream_json_and_streamed(outer: tuple[ServedApp, Inner]) -> None:
    """The inner gateway holds its model to the call syntax (tool_choice required or named), so its
    calls are real; the outer must re-emit them in its own shape."""
    app, _ = outer
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    with sdk(app) as client:
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            answer = client.chat.completions.create(
                model=VIA,
                messages=question,  # type: ignore[arg-type]
                tools=[WEATHER_CHAT],  # type: ignore[list-item]
                tool_choice=choice,  # type: ignore[arg-type]
                parallel_tool_calls=False,
                max_tokens=48,
                temperature=0,
                extra_headers=NO_STORE,
            )
            assert answer.model == VIA and answer.choices[0].finish_reason == "tool_calls"
            calls = answer.choices[0].message.tool_calls
            assert calls is not None and len(calls) == 1
            call = calls[0]
            assert call.type == "function" and call.function.name == "get_weather" and call.id
            assert set(json.loads(call.function.arguments)) == {"city"}
            with client.chat.completions.stream(
                model=VIA,
                messages=question,  # type: ignore[arg-type]
                tools=[WEATHER_CHAT],  # type: ignore[list-item]
                tool_choice=choice,  # type: ignore[arg-type]
                parallel_tool_calls=False,
                max_tokens=48,
                temperature=0,
                extra_headers=NO_STORE,
            ) as stream:
                chunks = [event.chunk for event in stream if event.type == "chunk"]
                merged = stream.get_final_completion()
            assert len({c.id for c in chunks}) == 1 and all(c.model == VIA for c in chunks)
            streamed = merged.choices[0].message.tool_calls
            assert (
                merged.choices[0].finish_reason == "tool_calls"
                and streamed is not None
                and len(streamed) == 1
            )
            assert streamed[0].function.name == "get_weather"
            assert streamed[0].function.arguments == call.function.arguments  # greedy: the same call


def test_responses_function_call_through_an_upstream(outer: tuple[ServedApp, Inner]) -> None:
    app, _ = outer
    with sdk(app) as client:
        asked = client.responses.create(
            model=VIA,
            input="What is the weather in Paris?",
            tools=[WEATHER_RESPONSES],  # type: ignore[list-item]
            tool_choice="required",
            parallel_tool_calls=False,
            max_output_tokens=48,
            temperature=0,
            extra_headers=NO_STORE,
        )
        assert [item.type for item in asked.output] == ["function_call"]
        call = asked.output[0]
        assert call.type == "function_call" and call.name == "get_weather" and call.call_id
        assert set(json.loads(call.arguments)) == {"city"}
        assert client.responses.retrieve(asked.id) == asked
        events = list(
            client.responses.create(
                model=VIA,
                input="What is the weather in Paris?",
                tools=[WEATHER_RESPONSES],  # type: ignore[list-item]
                tool_choice="required",
                parallel_tool_calls=False,
                max_output_tokens=48,
                temperature=0,
                stream=True,
                extra_headers=NO_STORE,
            )
        )
        kinds = [event.type for event in events]
        assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
        assert "response.function_call_arguments.delta" in kinds
        assert kinds[-3:] == [
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
        final = events[-1].response  # type: ignore[union-attr]
        streamed_call = final.output[0]
        arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert (
            streamed_call.type == "function_call" and streamed_call.arguments == arguments == call.arguments
        )
        assert client.responses.retrieve(final.id) == final
        answered = client.responses.create(
            model=VIA,
            previous_response_id=asked.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
            tools=[WEATHER_RESPONSES],  # type: ignore[list-item]
            tool_choice="none",
            max_output_tokens=16,
            temperature=0,
        )
    assert [item.type for item in answered.output] == ["message"] and answered.output_text


def test_an_upstream_429_is_passed_on_with_retry_after(outer: tuple[ServedApp, Inner]) -> None:
    app, _ = outer
    body = {"model": LIMITED, "messages": MESSAGES, "max_tokens": 2}
    with httpx.Client(base_url=app.base_url, headers={**app.headers, **NO_STORE}, timeout=60) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200  # its one request a minute
        for stream in (False, True):
            refused = http.post("/v1/chat/completions", json={**body, "stream": stream})
            assert refused.status_code == 429, refused.text
            assert 1 <= int(refused.headers["retry-after"]) <= 60
            error = refused.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "upstream_rate_limited" and error["type"] == "requests"
            assert "Bearer" not in error["message"] and "127.0.0.1" not in error["message"]
    with sdk(app) as client, pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=LIMITED, messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert caught.value.response.headers["retry-after"]


def test_traceparent_reaches_the_upstream(outer: tuple[ServedApp, Inner]) -> None:
    app, inner = outer
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    request_id = f"trace-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=app.base_url, headers={**app.headers, **NO_STORE}, timeout=60) as http:
        reply = http.post(
            "/v1/chat/completions",
            json={"model": VIA, "messages": MESSAGES, "max_tokens": 2},
            headers={"traceparent": f"00-{trace_id}-{parent}-01", "x-request-id": request_id},
        )
    assert reply.status_code == 200, reply.text
    deadline = time.monotonic() + 10
    while not any(f"request_id={request_id}" in line for line in inner.lines):
        assert time.monotonic() < deadline, "the inner gateway logged no such request"
        time.sleep(0.1)
    line = next(line for line in inner.lines if f"request_id={request_id}" in line)
    assert f"trace_id={trace_id}" in line  # the inner gateway's span continues the client's trace


def test_embeddings_through_an_upstream(app: ServedApp, llama_embed: str) -> None:
    inputs = ["The cat sat on the mat.", "A quick brown fox."]
    direct = httpx.post(
        f"{llama_embed}/v1/embeddings", json={"input": inputs, "encoding_format": "float"}, timeout=60
    ).json()
    with sdk(app) as client:
        via = client.embeddings.create(model=EMBED, input=inputs)  # the SDK asks for base64
        floats = client.embeddings.create(model=EMBED, input=inputs[0], encoding_format="float")
    assert via.model == EMBED and [d.index for d in via.data] == [0, 1]
    expected = [item["embedding"] for item in sorted(direct["data"], key=lambda item: item["index"])]
    assert len(expected[0]) == 576  # SmolLM2-135M's embedding size
    for got, want in zip(via.data, expected, strict=True):
        assert len(got.embedding) == len(want)
        assert max(abs(a - b) for a, b in zip(got.embedding, want, strict=True)) < 1e-5
    single = httpx.post(
        f"{llama_embed}/v1/embeddings", json={"input": inputs[0], "encoding_format": "float"}, timeout=60
    ).json()
    assert floats.data[0].embedding == pytest.approx(single["data"][0]["embedding"], abs=1e-5)
    assert via.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
