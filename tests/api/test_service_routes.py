"""``/``, ``/health``, the docs and the OpenAPI document."""

from __future__ import annotations

import httpx

from tests.conftest import MODEL_ID


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
