"""Three ``pocketllm serve`` replicas on one PostgreSQL database and one Redis, each on its own network.

The replicas run in network namespaces of their own on one bridge (or, where namespaces cannot be made,
on loopback addresses of their own: ``tests/replicas_support.py``) and reach PostgreSQL and Redis through relays
that the test can cut. They share nothing else: each has its own data directory and process memory.

The tests run in file order on one cluster; the last two change it (replica A is killed; the database is
cut and restored). Measured delays are printed (``pytest -s``) and bounded by the README's numbers.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.api.cache_support import drop_prefix
from tests.conftest import MODEL_ID, NO_EOS, free_port
from tests.postgres_support import SHARED_ADMIN_URL, temporary_database, unreachable_reason
from tests.replicas_support import Network, Relay
from tests.serve_support import server_env, start_server, wait_healthy

pytestmark = pytest.mark.e2e

SECRET = "a-secret-shared-by-the-three-replicas-of-this-test"
REVOCATION_BOUND_S = 1.0
"""Revocations arrive by NOTIFY; without it they would take the 2 s key cache TTL (warmed just before)."""
LEASE_TTL_S = 6.0
"""``ratelimit.lease_ttl_s``, the default."""
LEASE_BOUND_S = 10.0


@dataclass
class Cluster:
    network: Network
    urls: list[str]
    processes: list[subprocess.Popen[str]]
    store: Relay
    admin: dict[str, str] = field(default_factory=dict)
    """Authorization header of the admin (a JWT from replica A, valid on every replica)."""

    def client(self, replica: int) -> httpx.Client:
        return httpx.Client(base_url=self.urls[replica], timeout=60, trust_env=False)

    def call(self, replica: int, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self.client(replica) as client:
            return client.request(method, path, **kwargs)

    def new_key(self, replica: int, username: str = "user1") -> tuple[str, str]:
        response = self.call(replica, "POST", "/admin/keys", json={"username": username}, headers=self.admin)
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["key"]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", "Cache-Control": "no-store"}


def completion(cluster: Cluster, replica: int, key: str, **extra: Any) -> httpx.Response:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, **extra}
    return cluster.call(replica, "POST", "/v1/chat/completions", json=body, headers=bearer(key))


def until(condition: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> float:
    """Seconds until ``condition()`` held (polled); fails after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(step_s)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def cluster(model_path: Path) -> Iterator[Cluster]:
    del model_path
    reason = unreachable_reason()
    if reason:
        pytest.skip(reason)
    server = urlsplit(SHARED_ADMIN_URL)
    prefix = f"pocketllm-test:{uuid.uuid4().hex}:"
    with temporary_database() as database_url, Network.create(3) as network:
        store = Relay(network.host, (server.hostname or "127.0.0.1", server.port or 5432))
        redis = Relay(network.host, ("127.0.0.1", 6379))
        database = database_url.rsplit("/", 1)[1]
        user = server.username or "postgres"
        processes: list[subprocess.Popen[str]] = []
        urls = []
        try:
            for i, address in enumerate(network.addresses):
                port = free_port()
                env = server_env(
                    MODEL_SLOTS="1",
                    MODEL_N_CTX="4096",  # room for a stream that outlives a lease TTL on a fast CPU
                    MODEL_N_THREADS="1",
                    SECRET_KEY=SECRET,
                    DATABASE_URL=f"postgresql://{user}@{network.host}:{store.port}/{database}",
                    REDIS_HOST=network.host,
                    POCKETLLM_REDIS__PORT=str(redis.port),
                    POCKETLLM_REDIS__KEY_PREFIX=prefix,
                    POCKETLLM_REDIS__TIMEOUT_S="2",  # three servers on two cores: no fallback by slowness
                    POCKETLLM_SERVER__REPLICAS="3",
                    POCKETLLM_AUTH__SCRYPT_N="16384",
                    POCKETLLM_AUTH__LOGIN_BASE_DELAY_S="30",  # a slow machine's next attempt still waits
                )
                processes.append(
                    start_server(
                        port, env, "--host", address, wrap=lambda argv, i=i: network.command(i, argv)
                    )
                )
                urls.append(f"http://{address}:{port}")
                if i == 0:  # A creates the schema and the development users; B and C start together
                    wait_healthy(processes[0], urls[0])
            for process, url in zip(processes[1:], urls[1:], strict=True):
                wait_healthy(process, url)
            cluster = Cluster(network, urls, processes, store)
            with cluster.client(0) as client:
                login = client.post("/auth/login", json={"username": "admin", "password": "admin123"})
            assert login.status_code == 200, login.text
            cluster.admin = {"Authorization": f"Bearer {login.json()['access_token']}"}
            print(f"\nreplicas on {network.kind}: {', '.join(urls)}")
            yield cluster
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                process.communicate(timeout=30)
            store.close()
            redis.close()
            drop_prefix(prefix)


def refused_everywhere(cluster: Cluster, replicas: list[int], headers: dict[str, str]) -> list[float]:
    """Seconds until each replica answers 401 to ``headers`` (polled in parallel)."""

    def wait(replica: int) -> float:
        with cluster.client(replica) as client:
            return until(lambda: client.get("/v1/models", headers=headers).status_code == 401, 10)

    with ThreadPoolExecutor(len(replicas)) as pool:
        return list(pool.map(wait, replicas))


def test_serve_refuses_several_replicas_on_a_sqlite_store() -> None:
    command = [sys.executable, "-m", "gateway.cli", "serve"]
    env = server_env(POCKETLLM_SERVER__REPLICAS="3", REDIS_HOST="127.0.0.1", SECRET_KEY=SECRET)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "`server.replicas` is 3" in result.stderr and "`store.url` (DATABASE_URL)" in result.stderr


def test_a_key_made_on_a_works_on_b_and_c_at_once(cluster: Cluster) -> None:
    _, key = cluster.new_key(0)
    for replica in (1, 2):  # no wait: the store is one
        response = cluster.call(replica, "GET", "/v1/models", headers=bearer(key))
        assert response.status_code == 200, response.text


def test_a_key_revoked_on_b_is_refused_on_a_and_c_at_once(cluster: Cluster) -> None:
    key_id, key = cluster.new_key(0)
    for replica in (0, 2):  # both have the key in their in-memory cache now
        assert cluster.call(replica, "GET", "/v1/models", headers=bearer(key)).status_code == 200
    revoked = cluster.call(1, "DELETE", f"/admin/keys/{key_id}", headers=cluster.admin)
    assert revoked.status_code == 204
    delays = refused_everywhere(cluster, [0, 2], bearer(key))
    print(f"revocation seen on A, C after {delays[0] * 1000:.0f} ms, {delays[1] * 1000:.0f} ms")
    assert max(delays) < REVOCATION_BOUND_S


def test_a_user_disabled_on_b_is_refused_on_a_and_c_at_once(cluster: Cluster) -> None:
    created = cluster.call(
        0,
        "POST",
        "/admin/users",
        json={"username": "leaving", "password": "leaving-pw-1"},
        headers=cluster.admin,
    )
    assert created.status_code == 201, created.text
    _, key = cluster.new_key(0, "leaving")
    with cluster.client(2) as client:
        token = client.post("/auth/login", json={"username": "leaving", "password": "leaving-pw-1"})
    jwt = bearer(token.json()["access_token"])
    for replica in (0, 2):
        assert cluster.call(replica, "GET", "/v1/models", headers=bearer(key)).status_code == 200
        assert cluster.call(replica, "GET", "/v1/models", headers=jwt).status_code == 200
    disabled = cluster.call(1, "POST", f"/admin/users/{created.json()['id']}/disable", headers=cluster.admin)
    assert disabled.status_code == 200
    delays = refused_everywhere(cluster, [0, 2], bearer(key))
    print(f"disabled user seen on A, C after {delays[0] * 1000:.0f} ms, {delays[1] * 1000:.0f} ms")
    assert max(delays) < REVOCATION_BOUND_S
    for replica in (0, 2):
        assert cluster.call(replica, "GET", "/v1/models", headers=jwt).status_code == 401


def test_a_chat_session_started_on_a_continues_on_c(cluster: Cluster) -> None:
    _, key = cluster.new_key(0)
    first = cluster.call(
        0, "POST", "/chat", json={"prompt": "My name is Ada.", "max_tokens": 4}, headers=bearer(key)
    )
    assert first.status_code == 200, first.text
    session = first.json()["session_id"]
    second = cluster.call(
        2,
        "POST",
        "/chat",
        json={"prompt": "What is my name?", "session_id": session, "max_tokens": 4},
        headers=bearer(key),
    )
    assert second.status_code == 200, second.text
    assert second.json()["session_id"] == session
    assert second.json()["usage"]["prompt_tokens"] > first.json()["usage"]["prompt_tokens"] + 5  # history
    history = cluster.call(1, "GET", f"/chat/history/{session}", headers=bearer(key))
    assert history.status_code == 200
    messages = [(m["role"], m["content"]) for m in history.json()["messages"]]
    assert messages == [
        ("user", "My name is Ada."),
        ("assistant", first.json()["response"]),
        ("user", "What is my name?"),
        ("assistant", second.json()["response"]),
    ]


def test_per_key_rpm_is_exact_across_the_three(cluster: Cluster) -> None:
    key_id, key = cluster.new_key(0)
    limits = cluster.call(2, "PUT", f"/admin/keys/{key_id}/limits", json={"rpm": 9}, headers=cluster.admin)
    assert limits.status_code == 200, limits.text

    def send(i: int) -> int:
        response = completion(cluster, i % 3, key, messages=[{"role": "user", "content": f"Hi {i}"}])
        if response.status_code == 429:
            assert response.json()["error"]["type"] == "requests"
        return response.status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(send, range(27)))
    assert Counter(statuses) == {200: 9, 429: 18}


def test_failed_logins_on_a_count_on_b(cluster: Cluster) -> None:
    with cluster.client(0) as a:
        for _ in range(5):  # the free failures of one (address, user); the next attempt waits 30 s
            assert a.post("/auth/login", json={"username": "user1", "password": "wrong"}).status_code == 401
    with cluster.client(1) as b:
        throttled = b.post("/auth/login", json={"username": "user1", "password": "password123"})
        assert throttled.status_code == 429, throttled.text  # even the right password waits now
        assert throttled.json()["error"]["code"] == "login_throttled"
        assert 25 <= int(throttled.headers["Retry-After"]) <= 30
        assert b.post("/auth/login", json={"username": "admin", "password": "admin123"}).status_code == 200


def test_kill_9_of_a_returns_its_concurrency_lease_within_seconds(cluster: Cluster) -> None:
    key_id, key = cluster.new_key(0)
    limits = cluster.call(
        1, "PUT", f"/admin/keys/{key_id}/limits", json={"concurrency": 1}, headers=cluster.admin
    )
    assert limits.status_code == 200, limits.text
    streaming = threading.Event()

    def stream_on_a() -> None:
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 4000,
            "stream": True,
            "logit_bias": NO_EOS,
        }
        with (
            contextlib.suppress(httpx.TransportError),  # the stream ends when A is killed
            cluster.client(0) as client,
            client.stream("POST", "/v1/chat/completions", json=body, headers=bearer(key)) as response,
        ):
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    streaming.set()

    reader = threading.Thread(target=stream_on_a, daemon=True)
    reader.start()
    assert streaming.wait(60)
    time.sleep(LEASE_TTL_S + 1)  # the lease lives on only through A's renewals
    assert reader.is_alive(), "the stream ended too soon to show the renewal"
    refused = completion(cluster, 1, key)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "concurrency"
    assert reader.is_alive()  # the stream still runs when A dies
    cluster.processes[0].kill()  # SIGKILL: no release, no drain
    killed = time.monotonic()
    cluster.processes[0].wait(timeout=10)
    returned = until(lambda: completion(cluster, 1, key).status_code == 200, LEASE_BOUND_S, step_s=0.1)
    print(f"lease of the killed replica returned after {returned:.2f} s (measured from the kill)")
    assert time.monotonic() - killed < LEASE_BOUND_S
    reader.join(timeout=10)


def test_a_store_outage_is_a_503_envelope_and_the_replicas_recover(cluster: Cluster) -> None:
    _, key = cluster.new_key(1)
    _, fresh = cluster.new_key(1)  # cached by no replica: its next request must ask the store
    body = {"prompt": "Count slowly to fifty.", "max_tokens": 200, "stream": True}
    frames: list[str] = []
    with (
        cluster.client(1) as client,
        client.stream("POST", "/chat", json=body, headers=bearer(key)) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                if not frames:
                    cluster.store.cut()  # mid-request: the turn cannot be recorded at its end
                frames.append(line)
    try:
        assert '"store_unavailable"' in frames[-1], frames[-3:]  # the stream ends with the envelope
        for replica in (1, 2):
            for response in (
                completion(cluster, replica, fresh),
                cluster.call(
                    replica, "POST", "/chat", json={"prompt": "Hi", "max_tokens": 1}, headers=bearer(key)
                ),
                cluster.call(replica, "GET", "/chat/history", headers=bearer(key)),
            ):
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "store_unavailable"
    finally:
        cluster.store.restore()
    recovered = until(lambda: completion(cluster, 2, fresh).status_code == 200, 15, step_s=0.2)
    print(f"replica C answered again {recovered:.2f} s after the store came back")
    assert cluster.call(1, "GET", "/chat/history", headers=bearer(key)).status_code == 200
