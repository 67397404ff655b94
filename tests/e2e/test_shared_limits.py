"""Two ``pocketllm serve`` processes on one Redis enforce one global rate limit."""

from __future__ import annotations

import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.cache_support import drop_prefix
from tests.conftest import MODEL_ID, create_key, free_port, login
from tests.serve_support import server_env, start_server, wait_healthy

pytestmark = pytest.mark.e2e

RPM = 20


@pytest.fixture
def two_gateways(model_path: Path) -> Iterator[list[str]]:
    """Two processes sharing one data directory (the same users and keys) and one Redis key prefix."""
    del model_path
    prefix = f"pocketllm-test:{uuid.uuid4().hex}:"
    env = server_env(
        MODEL_SLOTS="1",
        MODEL_N_CTX="1024",
        MODEL_N_THREADS="1",
        REDIS_HOST="127.0.0.1",
        POCKETLLM_REDIS__KEY_PREFIX=prefix,
        POCKETLLM_REDIS__TIMEOUT_S="2",
        POCKETLLM_RATELIMIT__KEY_RPM=str(RPM),
    )
    processes: list[subprocess.Popen[str]] = []
    urls = []
    try:
        for _ in range(2):  # one after the other: the first creates the database and default users
            port = free_port()
            processes.append(start_server(port, env))
            urls.append(f"http://127.0.0.1:{port}")
            wait_healthy(processes[-1], urls[-1])
        yield urls
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)
        drop_prefix(prefix)


def test_sixty_requests_over_two_processes_admit_exactly_rpm(two_gateways: list[str]) -> None:
    first, second = two_gateways
    key = create_key(first, login(first, "admin", "admin123"), "user1")["key"]
    headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-store"}

    def send(i: int) -> tuple[str, int]:
        url = two_gateways[i % 2]
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": f"Hi {i}"}],
            "max_tokens": 1,
            "temperature": 0,
        }
        response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
        return url, response.status_code

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, range(60)))
    statuses = Counter(status for _, status in results)
    assert statuses == {200: RPM, 429: 60 - RPM}
    admitted = Counter(url for url, status in results if status == 200)
    assert admitted[first] > 0 and admitted[second] > 0  # both processes admitted part of the 20
