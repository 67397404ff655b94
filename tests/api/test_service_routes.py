"""``/``, ``/health``, the docs and the OpenAPI document."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from litestar.testing import TestClient

from gateway.app import create_app
from tests.conftest import MODEL_ID, make_settings


def test_index(client: httpx.Client) -> None:
    body = client.get("/").json()
    assert body["service"] == "PocketLLM Gateway"
    assert body["models"] == [MODEL_ID]
    assert body["version"]


def test_health_reports_models(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    state = response.json()["models"][MODEL_ID]
    assert state["state"] == "ready"
    assert state["slots"] == 2


def test_docs_and_openapi(client: httpx.Client) -> None:
    schema = client.get("/schema/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    assert "/v1/embeddings" in schema["paths"]
    docs = client.get("/docs", follow_redirects=True)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    redoc = client.get("/redoc", follow_redirects=True)
    assert redoc.status_code == 200 and "redoc" in redoc.text.lower()


def test_health_is_503_with_the_error_when_a_model_failed(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    app = create_app(make_settings(model={"path": str(broken)}))
    with TestClient(app) as http:
        deadline = time.monotonic() + 20
        body = http.get("/health").json()
        while body["models"][MODEL_ID]["state"] in {"loading", "unloaded"} and time.monotonic() < deadline:
            time.sleep(0.05)
            body = http.get("/health").json()
        response = http.get("/health")
        assert response.status_code == 503
        state = response.json()["models"][MODEL_ID]
        assert state["state"] == "failed"
        assert str(broken) in state["error"]
        # requests for it are refused with 503, not a traceback
        token = http.post("/auth/login", json={"username": "user1", "password": "password123"}).json()
        refused = http.post(
            "/v1/chat/completions",
            json={"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {token['access_token']}"},
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "model_not_ready"
