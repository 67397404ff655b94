"""The access log (one structured line per request, content only when configured) and a guarded /metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from telemetry.logs import JsonFormatter, RequestIdFilter
from tests.conftest import MODEL_ID, NO_EOS, ServedApp, make_settings, serve

SECRET_PROMPT = "the-prompt-marker-9f3a"


def _chat(app: ServedApp, request_id: str) -> dict[str, Any]:
    with httpx.Client(base_url=app.base_url, headers=app.headers, timeout=120) as http:
        reply = http.post(
            "/v1/chat/completions",
            json={
                "model": MODEL_ID,
                "messages": [{"role": "user", "content": SECRET_PROMPT}],
                "max_tokens": 3,
                "logit_bias": NO_EOS,
            },
            headers={"x-request-id": request_id},
        )
    assert reply.status_code == 200
    body: dict[str, Any] = reply.json()
    return body


def _access(caplog: pytest.LogCaptureFixture, request_id: str) -> logging.LogRecord:
    records = [
        r
        for r in caplog.records
        if r.name == "pocketllm.access" and r.__dict__["access"]["request_id"] == request_id
    ]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    return records[0]


@pytest.fixture(scope="module")
def content_app(model_path: Path) -> Iterator[ServedApp]:
    del model_path
    with serve(make_settings(telemetry={"log_content": True, "metrics_require_admin": True})) as app:
        yield app


def test_one_access_line_per_request_without_content(
    served: ServedApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pocketllm.access")
    body = _chat(served, "access-log-1")
    record = _access(caplog, "access-log-1")
    fields = record.__dict__["access"]
    assert fields["method"] == "POST" and fields["route"] == "/v1/chat/completions"
    assert fields["status"] == 200 and fields["user"] == "user1" and fields["user_id"]
    assert fields["model"] == MODEL_ID
    assert fields["input_tokens"] == body["usage"]["prompt_tokens"]
    assert fields["output_tokens"] == body["usage"]["completion_tokens"] == 3
    assert fields["duration_ms"] >= fields["ttft_ms"] > 0
    assert len(fields["trace_id"]) == 32
    assert "prompt" not in fields and "completion" not in fields
    text = record.getMessage()
    assert text.startswith("POST /v1/chat/completions 200 ") and "request_id=access-log-1" in text
    assert SECRET_PROMPT not in caplog.text
    assert served.api_key not in caplog.text
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "access" and line["request_id"] == "access-log-1" and line["status"] == 200


def test_content_is_logged_only_when_configured(
    content_app: ServedApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pocketllm.access")
    body = _chat(content_app, "access-log-2")
    fields = _access(caplog, "access-log-2").__dict__["access"]
    assert SECRET_PROMPT in fields["prompt"]  # the prompt as the model saw it (chat template applied)
    assert fields["completion"] == body["choices"][0]["message"]["content"]


def test_metrics_can_require_admin(content_app: ServedApp) -> None:
    assert httpx.get(f"{content_app.base_url}/metrics", timeout=30).status_code == 401
    user = httpx.get(f"{content_app.base_url}/metrics", headers=content_app.headers, timeout=30)
    assert user.status_code == 403
    admin = httpx.get(
        f"{content_app.base_url}/metrics",
        headers={"Authorization": f"Bearer {content_app.admin_token}"},
        timeout=30,
    )
    assert admin.status_code == 200 and "pocketllm_requests_total" in admin.text


def test_log_lines_carry_the_current_request_id() -> None:
    record = logging.makeLogRecord({"name": "pocketllm.test", "msg": "hello %s", "args": ("world",)})
    assert RequestIdFilter().filter(record)
    assert record.__dict__["request_id"] is None  # outside a request
    line = json.loads(JsonFormatter().format(record))
    assert (
        line["message"] == "hello world" and line["logger"] == "pocketllm.test" and "request_id" not in line
    )
