"""The shared ``pocketllm serve`` process of the e2e tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import create_key, free_port, login
from tests.serve_support import server_env, start_server, wait_healthy


@pytest.fixture(scope="package")
def server(model_path: Path) -> Iterator[tuple[str, str]]:
    """A running ``pocketllm serve`` and an API key of the default user made through the admin route."""
    del model_path
    port = free_port()
    process = start_server(port, server_env(MODEL_SLOTS="2", MODEL_N_CTX="4096", MODEL_N_THREADS="2"))
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, base_url)
        key = create_key(base_url, login(base_url, "admin", "admin123"), "user1")["key"]
        yield base_url, key
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)
