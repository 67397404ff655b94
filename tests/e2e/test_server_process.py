"""``pocketllm serve`` as a real process, driven by real clients: the openai SDK and ``curl -N``."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.conftest import MODEL_ID, NO_EOS, free_port
from tests.serve_support import server_env, start_server, wait_healthy

pytestmark = pytest.mark.e2e


def test_openai_sync_client(server: tuple[str, str]) -> None:
    base_url, key = server
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens <= 8


def test_openai_async_streaming_with_usage(server: tuple[str, str]) -> None:
    base_url, key = server

    async def main() -> tuple[str, int]:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=MODEL_ID,
                messages=[{"role": "user", "content": "Count to five."}],
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
                logit_bias=NO_EOS,
            )
            text, tokens = "", 0
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return text, tokens

    text, tokens = asyncio.run(main())
    assert text and tokens == 12


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_sse(server: tuple[str, str]) -> None:
    base_url, key = server
    body = json.dumps(
        {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 6,
            "stream": True,
            "logit_bias": NO_EOS,
        }
    )
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-N",
            "-H",
            "Content-Type: application/json",
            "-H",
            f"Authorization: Bearer {key}",
            "-D",
            "-",
            "--data",
            body,
            f"{base_url}/v1/chat/completions",
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    head, _, stream = result.stdout.decode().partition("\r\n\r\n")
    assert "text/event-stream" in head.lower()
    assert "x-request-id" in head.lower()
    frames = [f for f in stream.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_sigterm_stops_cleanly(model_path: Path) -> None:
    del model_path
    port = free_port()
    process = start_server(port, server_env(MODEL_SLOTS="1", MODEL_N_CTX="2048"))
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, base_url)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert f"listening on http://127.0.0.1:{port}" in output
        assert f"model {MODEL_ID} loaded" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)


def _run_serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bad_setting_stops_startup_naming_it() -> None:
    result = _run_serve(server_env(MODEL_SLOTS="many"))
    assert result.returncode == 2
    assert "models[0].slots" in result.stderr
    result = _run_serve(server_env(POCKETLLM_SERVER__PORTS="1"))
    assert result.returncode == 2
    assert "ports" in result.stderr


def test_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    result = _run_serve(server_env(MODEL_PATH=str(missing)))
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert "does not exist" in result.stderr


def test_corrupt_model_file_is_a_clear_error(tmp_path: Path) -> None:
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    result = _run_serve(server_env(MODEL_PATH=str(not_gguf)))
    assert result.returncode == 1
    assert str(not_gguf) in result.stderr and "not a GGUF file" in result.stderr
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    result = _run_serve(server_env(MODEL_PATH=str(truncated)))
    assert result.returncode == 1
    assert str(truncated) in result.stdout + result.stderr
