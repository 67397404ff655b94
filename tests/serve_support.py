"""``pocketllm serve`` as a real child process: its environment, start-up and health wait."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import httpx


def server_env(**extra: str) -> dict[str, str]:
    """This environment without any POCKETLLM_/MODEL_ setting, a fresh data directory, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POCKETLLM_", "MODEL_"))}
    env["POCKETLLM_DATA_DIR"] = tempfile.mkdtemp(prefix="pocketllm-e2e-")
    env.update(extra)
    return env


def start_server(
    port: int, env: dict[str, str], *args: str, wrap: Callable[[list[str]], list[str]] = list
) -> subprocess.Popen[str]:
    """``python -m gateway.cli serve --port PORT ARGS`` with output captured (stdout and stderr);
    ``wrap`` may prefix the command (e.g. ``ip netns exec NAME``), keeping the process id the server's."""
    return subprocess.Popen(
        wrap([sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), *args]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_healthy(process: subprocess.Popen[str], base_url: str, timeout: float = 90) -> None:
    """Wait until ``/health`` is 200; fail with the server's output if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output, _ = process.communicate()
            raise AssertionError(f"server exited early:\n{output}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server never became healthy")
