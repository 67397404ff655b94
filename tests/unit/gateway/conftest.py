"""Redis for the service tests: the shared one (a unique key prefix per test, cleaned up after),
private ``redis-server`` processes on spare ports that a test may stop and start again, and a
``MONITOR`` of the commands that reach Redis under a key prefix."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import subprocess
import threading
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


_MONITOR_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_MONITOR_SOURCE = re.compile(rb"^\+[0-9.]+ \[\d+ ([^\]]+)\]")


class RedisMonitor:
    """Redis's ``MONITOR`` on a connection of its own, read by a thread: the commands that name a key
    prefix, in the order Redis ran them (commands a Lua script runs are marked ``lua``).

    Other clients' traffic on the shared Redis streams by too; only lines naming the prefix are kept.
    """

    def __init__(self, prefix: str, port: int = SHARED_PORT) -> None:
        self.prefix = prefix
        self.port = port
        self._needle = prefix.encode()
        self._lines: list[bytes] = []
        self._seen = threading.Condition()
        self._marks = 0
        self._sock = socket.create_connection((SHARED_HOST, port), timeout=5)
        self._sock.sendall(b"MONITOR\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += self._sock.recv(1)
        assert reply == b"+OK\r\n", reply
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read, name="redis-monitor", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            pending += data
            *lines, pending = pending.split(b"\r\n")
            kept = [line for line in lines if self._needle in line]
            if kept:
                with self._seen:
                    self._lines += kept
                    self._seen.notify_all()

    def commands(self, *, lua: bool = False) -> list[list[str]]:
        """Every command naming the prefix that Redis ran before this call, as ``[name, *args]`` with the
        name in lower case; those run by Lua scripts only when ``lua``. Taken out: the next call returns
        only what ran after this one."""
        self._marks += 1
        mark = f"{self.prefix}monitor-mark:{self._marks}"
        with socket.create_connection((SHARED_HOST, self.port), timeout=5) as sock:  # a command of its own
            sock.sendall(f"EXISTS {mark}\r\n".encode())
            assert sock.recv(64).startswith(b":")
        deadline = time.monotonic() + 10
        with self._seen:
            while not any(mark.encode() in line for line in self._lines):
                assert self._seen.wait(deadline - time.monotonic()), "MONITOR did not show the mark"
            at = next(i for i, line in enumerate(self._lines) if mark.encode() in line)
            lines, self._lines = self._lines[:at], self._lines[at + 1 :]
        found = []
        for line in lines:
            source = _MONITOR_SOURCE.match(line)
            if source is None or (source.group(1) == b"lua" and not lua):
                continue
            args = [m.group(1).decode("unicode_escape") for m in _MONITOR_ARG.finditer(line, source.end())]
            found.append([args[0].lower(), *args[1:]])
        return found

    def close(self) -> None:
        """Stop reading and close the connection."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)
        self._sock.close()


@pytest.fixture
def monitor(prefix: str) -> Iterator[RedisMonitor]:
    """``MONITOR`` of the commands naming this test's key prefix on the shared Redis."""
    watcher = RedisMonitor(prefix)
    try:
        yield watcher
    finally:
        watcher.close()
