"""Several ``pocketllm serve`` replicas on one machine, each on a network of its own.

``Network.create`` puts each replica in a network namespace of its own, joined to this process by one
bridge (a small LAN: this process is the client and the load balancer's side, at ``host``). Where
namespaces cannot be made (not root, no ``ip``), each replica gets a loopback address of its own
(127.0.0.2, 127.0.0.3, ...) instead. Either way the replicas reach PostgreSQL and Redis only through
``Relay``s listening at ``host``, which a test can cut (every connection dropped, new ones refused) to play
a database outage, and restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import threading
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class Relay:
    """A TCP relay from ``host``:``port`` (a spare port) to ``target``, run on a thread of its own."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        """Start listening at once."""
        self.host, self.target = host, target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._thread.start()
        self._writers: set[asyncio.StreamWriter] = set()
        self._cut = False
        self._server = self._call(asyncio.start_server(self._serve, host, 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}

    def cut(self) -> None:
        """Drop every relayed connection (reset) and refuse new ones until ``restore``."""

        async def cut() -> None:
            self._cut = True
            for writer in list(self._writers):
                writer.transport.abort()

        self._call(cut())

    def restore(self) -> None:
        """Relay new connections again."""
        self._cut = False

    def close(self) -> None:
        """Cut, stop listening, stop the thread."""
        self.cut()

        async def close() -> None:
            self._server.close()

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ConnectionError):
        pass
    finally:
        writer.close()


class Network:
    """Where the replicas run; ``host`` is this process's address on their network."""

    def __init__(self, kind: str, host: str, addresses: Sequence[str], namespaces: Sequence[str]) -> None:
        self.kind = kind
        """``"netns"`` or ``"loopback"``."""
        self.host = host
        self.addresses = list(addresses)
        """Replica i listens on ``addresses[i]``."""
        self._namespaces = list(namespaces)
        self._links: list[str] = []

    def command(self, index: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run on replica ``index``'s network (``ip netns exec`` replaces itself: the pid is
        the command's)."""
        if self._namespaces:
            return ["ip", "netns", "exec", self._namespaces[index], *argv]
        return list(argv)

    def partition(self, index: int) -> None:
        """Make replica ``index`` unreachable the way a host that drops off the network is: its link
        goes down, so packets to it are lost (no reset, no refusal) until ``heal``. Namespaces only."""
        self._link(index, "down")

    def heal(self, index: int) -> None:
        """Bring replica ``index``'s link back up (its address and route come back with it)."""
        self._link(index, "up")

    def _link(self, index: int, state: str) -> None:
        if not self._namespaces:
            raise RuntimeError("a loopback replica cannot be cut off the network (no namespace)")
        subprocess.run(
            ["ip", "-n", self._namespaces[index], "link", "set", "eth0", state],
            check=True,
            capture_output=True,
            timeout=10,
        )

    @classmethod
    @contextlib.contextmanager
    def create(cls, replicas: int) -> Iterator[Network]:
        """A namespace per replica on one bridge if possible, else a loopback address per replica
        (``POCKETLLM_TEST_NETWORK=loopback`` asks for loopback addresses)."""
        wanted = os.environ.get("POCKETLLM_TEST_NETWORK", "netns")
        network = cls._namespaced(replicas) if wanted == "netns" and shutil.which("ip") else None
        if network is None:
            network = cls("loopback", "127.0.0.1", [f"127.0.0.{i + 2}" for i in range(replicas)], [])
        try:
            yield network
        finally:
            network._remove()

    @classmethod
    def _namespaced(cls, replicas: int) -> Network | None:
        tag = uuid.uuid4().hex[:6]
        subnet = f"10.231.{random.randrange(1, 255)}"
        bridge = f"plbr{tag}"
        network = cls(
            "netns",
            f"{subnet}.1",
            [f"{subnet}.{i + 2}" for i in range(replicas)],
            [f"pocketllm-{tag}-{i}" for i in range(replicas)],
        )
        steps = [
            ["ip", "link", "add", bridge, "type", "bridge"],
            ["ip", "addr", "add", f"{network.host}/24", "dev", bridge],
            ["ip", "link", "set", bridge, "up"],
        ]
        for i, namespace in enumerate(network._namespaces):
            veth = f"plv{tag}{i}"
            steps += [
                ["ip", "netns", "add", namespace],
                ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace],
                ["ip", "link", "set", veth, "master", bridge, "up"],
                ["ip", "-n", namespace, "addr", "add", f"{network.addresses[i]}/24", "dev", "eth0"],
                ["ip", "-n", namespace, "link", "set", "eth0", "up"],
                ["ip", "-n", namespace, "link", "set", "lo", "up"],
            ]
        network._links = [bridge]
        try:
            for step in steps:
                subprocess.run(step, check=True, capture_output=True, timeout=10)
        except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired):
            network._remove()
            return None
        return network

    def _remove(self) -> None:
        for namespace in self._namespaces:  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10, check=False)
        for link in self._links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10, check=False)
