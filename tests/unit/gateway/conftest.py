"""Redis for the service tests: the shared one (a unique key prefix per test, cleaned up after) and
private ``redis-server`` processes on spare ports that a test may stop and start again."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from gateway.redis_client import RedisClient, create_redis_client

SHARED_HOST, SHARED_PORT = "127.0.0.1", 6379


def client(port: int = SHARED_PORT, *, timeout_s: float = 0.1) -> RedisClient:
    """A client as the gateway builds it (create it inside the running event loop's test)."""
    return create_redis_client(SHARED_HOST, port, socket_timeout_s=timeout_s, connect_timeout_s=timeout_s)


async def _delete_prefix(prefix: str) -> None:
    redis = client(timeout_s=5.0)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await redis.unlink(*keys)
    finally:
        await redis.aclose()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared Redis; its keys are deleted afterwards."""
    value = f"pocketllm-test:{uuid.uuid4().hex}:"
    yield value
    asyncio.run(_delete_prefix(value))


def _ping(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((SHARED_HOST, port), timeout=0.2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")
    return False


def _spare_port() -> int:
    with socket.socket() as sock:
        sock.bind((SHARED_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A ``redis-server`` of the test's own (no persistence) on a spare port."""

    def __init__(self) -> None:
        self.port = _spare_port()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it and wait until it answers PING."""
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not on PATH"
        self._process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", SHARED_HOST, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _ping(self.port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open but nothing answers, as with a stuck Redis."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause``."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop it (the port refuses connections afterwards)."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private Redis, started; stopped at the end whatever the test did."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
