"""Real ``llama-server`` replicas for the upstream tests, each on a network of its own.

``llama_servers(n, model_path)`` starts ``n`` llama.cpp ``llama-server`` processes (built from the llama.cpp
that llama-cpp-python vendors: ``bench/build_llama_server.py``, cached) on the SmolLM2 model. Each runs in a
network namespace of its own on one bridge to this process (``tests/replicas_support.py:Network``), so a
replica can be killed (its connections are reset, new ones refused), restarted on the same address, or
partitioned: its link goes down and packets to it are lost, as when a real host drops off the network (a
connect hangs until the caller's timeout). Where namespaces cannot be made (not root, no ``ip``), each
replica gets a loopback address of its own instead; there a partition freezes the process (SIGSTOP): a
connect still succeeds into the kernel's backlog but nothing answers, which a gateway sees at its
first-byte timeout rather than its connect timeout (``LlamaServers.partition_hits_connect``).

A test that needs llama-server is skipped, saying why, only when it cannot be built here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.build_llama_server import BuildError, binary_path, build, last_failure
from tests.conftest import free_port
from tests.replicas_support import Network

UPSTREAM_MODEL = "smollm2"
"""The model name the replicas answer to (``--alias``): what a gateway's ``upstream.model`` names."""


def llama_server_binary() -> Path:
    """The cached ``llama-server``, built on first use (unless ``POCKETLLM_BUILD_LLAMA_SERVER=0``: CI builds
    it before pytest); skips the calling test, saying why, when there is none and it cannot be built."""
    try:
        if os.environ.get("POCKETLLM_BUILD_LLAMA_SERVER", "1") == "0" and not binary_path().exists():
            reason = last_failure() or "it was not built (python bench/build_llama_server.py)"
            raise BuildError(reason)
        return build()
    except BuildError as exc:
        pytest.skip(f"no llama-server here: {str(exc).splitlines()[0]}")


def until(condition: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> float:
    """Seconds until ``condition()`` held (polled every ``step_s``); fails the test after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - start
        assert elapsed < timeout_s, f"not within {timeout_s} s"
        time.sleep(step_s)
    return time.monotonic() - start


class LlamaServers:
    """``llama-server`` replicas on ``network``: replica ``i`` listens at ``network.addresses[i]``."""

    def __init__(
        self,
        binary: Path,
        model: Path,
        network: Network,
        *,
        slots: int,
        ctx_per_slot: int,
        threads: int,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Describe the replicas; ``start`` runs them."""
        self.binary, self.model, self.network = binary, model, network
        self.slots_per_replica = slots
        self._argv_tail = [
            "-m",
            str(model),
            "--alias",
            UPSTREAM_MODEL,
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-np",
            str(slots),
            "-c",
            str(ctx_per_slot * slots),
            "--metrics",
            "--no-webui",
            "--no-repack",  # ggml's repacked (AMX) kernels crash on some CPUs; see engine/llamacpp/cpu.py
            *extra_args,
        ]
        count = len(network.addresses)
        self.ports = [free_port() for _ in range(count)]
        """Replica i's port, kept across restarts (a gateway's configuration names it)."""
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * count
        self._logdir = Path(tempfile.mkdtemp(prefix="pocketllm-llama-server-"))
        self._frozen: set[int] = set()
        self._http = httpx.Client(timeout=5, trust_env=False)

    def __len__(self) -> int:
        return len(self.ports)

    @property
    def partition_hits_connect(self) -> bool:
        """Whether a partition loses packets (namespaces) rather than freezing the process (loopback)."""
        return self.network.kind == "netns"

    def root_url(self, index: int) -> str:
        """``http://address:port`` of replica ``index`` (llama-server's own routes: /health, /slots)."""
        return f"http://{self.network.addresses[index]}:{self.ports[index]}"

    def base_url(self, index: int) -> str:
        """The OpenAI base URL of replica ``index`` (with ``/v1``), as a gateway's ``upstream.urls`` lists it."""
        return f"{self.root_url(index)}/v1"

    def log(self, index: int) -> str:
        """Replica ``index``'s output so far (all its runs)."""
        path = self._logdir / f"replica-{index}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pid(self, index: int) -> int | None:
        """Replica ``index``'s process id while it runs."""
        process = self._processes[index]
        return process.pid if process is not None and process.poll() is None else None

    def start(self, index: int, timeout: float = 90) -> None:
        """Run replica ``index`` and wait until its ``/health`` answers 200 (the model is loaded)."""
        self._launch(index)
        self.wait_ready(index, timeout)

    def _launch(self, index: int) -> None:
        assert self.pid(index) is None, f"replica {index} is running"
        argv = [
            str(self.binary),
            *self._argv_tail,
            "--host",
            self.network.addresses[index],
            "--port",
            str(self.ports[index]),
        ]
        with (self._logdir / f"replica-{index}.log").open("ab") as log:
            log.write(f"\n$ {' '.join(argv)}\n".encode())
            log.flush()
            self._processes[index] = subprocess.Popen(
                self.network.command(index, argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, index: int, timeout: float = 90) -> None:
        """Wait until replica ``index`` answers ``/health`` with 200; fail with its log if it exits."""
        process = self._processes[index]
        assert process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = "\n".join(self.log(index).splitlines()[-30:])
                raise AssertionError(f"llama-server replica {index} exited ({process.returncode}):\n{tail}")
            with contextlib.suppress(httpx.TransportError):
                if self._http.get(f"{self.root_url(index)}/health").status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"llama-server replica {index} not ready within {timeout} s")

    def kill(self, index: int) -> None:
        """SIGKILL replica ``index`` (a crash: its connections are reset, its port refuses)."""
        process = self._processes[index]
        if process is None:
            return
        self._frozen.discard(index)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        self._processes[index] = None

    def restart(self, index: int, timeout: float = 90) -> None:
        """Kill replica ``index`` if it runs, start it again on the same address and port, wait ready."""
        self.kill(index)
        self.start(index, timeout)

    def partition(self, index: int) -> None:
        """Make replica ``index`` unreachable while it keeps running (see the module's docstring)."""
        if self.partition_hits_connect:
            self.network.partition(index)
        else:
            pid = self.pid(index)
            assert pid is not None, f"replica {index} is not running"
            os.kill(pid, signal.SIGSTOP)
            self._frozen.add(index)

    def heal(self, index: int) -> None:
        """Undo ``partition(index)``."""
        if self.partition_hits_connect:
            self.network.heal(index)
        else:
            pid = self.pid(index)
            if pid is not None and index in self._frozen:
                os.kill(pid, signal.SIGCONT)
            self._frozen.discard(index)

    def slots(self, index: int) -> list[dict[str, Any]]:
        """llama-server's ``GET /slots`` of replica ``index``: one object per slot (``is_processing``...)."""
        response = self._http.get(f"{self.root_url(index)}/slots")
        response.raise_for_status()
        slots: list[dict[str, Any]] = response.json()
        return slots

    def busy_slots(self, index: int) -> int:
        """How many of replica ``index``'s slots are processing a request now."""
        return sum(bool(slot.get("is_processing")) for slot in self.slots(index))

    def decoding(self, index: int) -> list[int]:
        """Tokens decoded so far by each request replica ``index``'s busy slots are processing."""
        counts = []
        for slot in self.slots(index):
            if slot.get("is_processing"):
                following = slot.get("next_token") or {}
                # a list (one entry per sequence) in recent llama-server, an object before
                entries = following if isinstance(following, list) else [following]
                counts.append(max((int(e.get("n_decoded", 0)) for e in entries), default=0))
        return counts

    def decoded(self, index: int) -> int:
        """Tokens decoded so far by the requests replica ``index``'s busy slots are processing, summed."""
        return sum(self.decoding(index))

    def metrics(self, index: int) -> dict[str, float]:
        """Replica ``index``'s Prometheus counters (``llamacpp:prompt_tokens_total``...), by name."""
        response = self._http.get(f"{self.root_url(index)}/metrics")
        response.raise_for_status()
        values: dict[str, float] = {}
        for line in response.text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        return values

    def close(self) -> None:
        """Stop every replica (healing first, so nothing is left frozen) and release the client."""
        for index in range(len(self)):
            with contextlib.suppress(OSError, subprocess.SubprocessError, RuntimeError):
                if index in self._frozen:
                    self.heal(index)
            self.kill(index)
        self._http.close()


@contextlib.contextmanager
def llama_servers(
    count: int,
    model_path: Path,
    *,
    slots: int = 2,
    ctx_per_slot: int = 2048,
    threads: int = 1,
    extra_args: Sequence[str] = (),
) -> Iterator[LlamaServers]:
    """``count`` running llama-server replicas on ``model_path``, each on a network of its own; skips the
    test when llama-server cannot be built. Processes and namespaces are removed on the way out."""
    binary = llama_server_binary()
    with Network.create(count) as network:
        servers = LlamaServers(
            binary,
            model_path,
            network,
            slots=slots,
            ctx_per_slot=ctx_per_slot,
            threads=threads,
            extra_args=extra_args,
        )
        try:
            for index in range(count):  # load the models side by side
                servers._launch(index)
            for index in range(count):
                servers.wait_ready(index)
            yield servers
        finally:
            servers.close()
