"""Schema fuzzing: schemathesis generates requests for every operation of the app's own OpenAPI document.

Every operation gets valid (positive) and invalid (negative) examples, with credentials (a user's API
key; an admin token on ``/admin``) and without. What must hold:

- no 5xx, ever;
- protected operations refuse a call without credentials with 401 in OpenAI's envelope;
- every 4xx is OpenAI's envelope (``application/json``, ``{"error": {message, type, param, code}}``);
- a JSON 2xx conforms to the documented response schema and content type (schemathesis's checks);
- invalid data is rejected (schemathesis's ``negative_data_rejection``).

Narrow exclusions, on purpose:
- ``stream: true`` answers are ``text/event-stream`` while the document declares JSON for 200: the
  content-type and response-schema checks are skipped for SSE answers only (their frames are checked by
  tests/api/test_streaming.py);
- ``status_code_conformance`` is not run: the document lists only 200/201/204 and 400, while the API
  documents its 401/403/404/413/415/429/503 as OpenAI's envelope (README); the envelope check above
  stands in for it, on every error status;
- Litestar documents its own 400 body shape; ours is OpenAI's envelope, so the schema check is applied
  to 2xx answers only;
- the three operations that answer JSON or SSE are documented as ``oneOf: [<type>, {}]``, which a JSON
  body always matches twice: their JSON bodies are decoded strictly with the wire type instead.

The number of examples per operation, mode and credential is ``FUZZ_EXAMPLES`` (default 25).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from gateway.openai.protocol.chat import ChatCompletion
from gateway.openai.protocol.completions import Completion
from gateway.pocket.chat import ChatReply
from tests.conftest import MODEL_ID, ServedApp, make_settings, serve

pytestmark = pytest.mark.reliability

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
# /auth/test: PocketLLM's, public; /metrics: open by default for scrapers (telemetry.metrics_require_admin)
PUBLIC = {"GET /", "GET /health", "POST /auth/login", "GET /auth/test", "GET /metrics"}
# Operations answering JSON or SSE: Litestar documents their 200 as ``oneOf: [<type>, {}]`` (the stream
# is ``{}``), which no JSON body can satisfy (it matches both). Their JSON answers are checked against
# the wire type itself instead.
STREAMING_OPERATIONS: dict[str, type[Any]] = {
    "POST /v1/chat/completions": ChatCompletion,
    "POST /v1/completions": Completion,
    "POST /chat": ChatReply,
}
MAX_TOKENS = 4


@dataclass
class Tally:
    """What the fuzzer sent and got, per operation."""

    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def record(self, label: str, status: int) -> None:
        self.statuses.setdefault(label, Counter())[status] += 1


@pytest.fixture(scope="module")
def fuzzed(model_path: Path) -> Iterator[ServedApp]:
    """Small contexts and token budgets: fuzzed generation requests stay quick on the real model."""
    del model_path
    settings = make_settings(
        model={"slots": 2, "n_ctx": 2 * 512},
        limits={"max_tokens_default": MAX_TOKENS, "max_n": 2},
        queue={"max_queue": 64, "max_wait_s": 60.0},
    )
    with serve(settings) as app:
        yield app


def _shrink_generation(case: schemathesis.Case, mode: GenerationMode) -> None:
    """Keep generated token budgets small (the fuzzer picks huge valid values: slow, not interesting).

    Valid requests name the served model (a random name only ever meets the 404), so that they reach
    the engine.
    """
    body = case.body
    if isinstance(body, dict):
        if mode is GenerationMode.POSITIVE and isinstance(body.get("model"), str):
            body["model"] = MODEL_ID
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                body[key] = MAX_TOKENS


def _content_type(response: schemathesis.Response) -> str:
    for name, values in response.headers.items():
        if name.lower() == "content-type":
            return values[0] if isinstance(values, list) else str(values)
    return ""


def _check_envelope(response: schemathesis.Response) -> str | None:
    if not _content_type(response).startswith("application/json"):
        return f"{response.status_code} is not JSON: {_content_type(response)}"
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} body is not JSON: {response.text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if set(body) != {"error"} or not isinstance(error, dict):
        return f"{response.status_code} is not OpenAI's envelope: {response.text[:300]}"
    if set(error) != {"message", "type", "param", "code"} or not error["message"]:
        return f"{response.status_code} envelope fields: {error}"
    return None


def _calling(check: Any) -> Any:
    def run(case: schemathesis.Case) -> None:
        check(case)

    return run


def _fuzz(app: ServedApp, authenticated: bool, mode: GenerationMode, tally: Tally) -> None:
    schema = schemathesis.openapi.from_url(f"{app.base_url}/schema/openapi.json")
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        token = app.admin_token if operation.path.startswith("/admin") else app.api_key
        headers = {"Authorization": f"Bearer {token}"} if authenticated else {}
        where = f"{label} [{mode.value}, {'auth' if authenticated else 'no auth'}]"

        def check(
            case: schemathesis.Case, label: str = label, headers: dict[str, str] = headers, where: str = where
        ) -> None:
            _shrink_generation(case, mode)
            if not authenticated and case.headers:
                case.headers.pop("Authorization", None)
            response = case.call(base_url=app.base_url, session=session, headers=headers, timeout=120)
            tally.record(where, response.status_code)
            problems = []
            if response.status_code >= 500:
                problems.append(f"{response.status_code}: {response.text[:300]}")
            if not authenticated and label not in PUBLIC and response.status_code != 401:
                problems.append(f"unauthenticated call answered {response.status_code}")
            if 400 <= response.status_code < 500 and (problem := _check_envelope(response)):
                problems.append(problem)
            checks: list[Any] = [not_a_server_error]
            is_sse = _content_type(response).startswith("text/event-stream")
            if 200 <= response.status_code < 300 and not is_sse:
                checks.append(content_type_conformance)
                wire_type = STREAMING_OPERATIONS.get(label)
                if wire_type is None:
                    checks.append(response_schema_conformance)
                else:
                    try:
                        msgspec.json.decode(response.content, type=wire_type)
                    except msgspec.ValidationError as exc:
                        problems.append(f"200 body is not a {wire_type.__name__}: {exc}")
            if mode is GenerationMode.NEGATIVE and authenticated:
                checks.append(negative_data_rejection)
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except (Exception, BaseExceptionGroup) as exc:  # a FailureGroup with every failed check
                problems.append(str(exc)[:800])
            if problems:
                curl = case.as_curl_command(headers=dict.fromkeys(headers, "<redacted>"))
                tally.failures.append(f"{where}: {'; '.join(problems)}\n    {curl[:600]}")

        run = given(case=operation.as_strategy(generation_mode=mode))(_calling(check))
        try:
            hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                suppress_health_check=list(HealthCheck),
            )(run)()
        except hypothesis.errors.Unsatisfiable:
            # nothing invalid can be made (an operation without parameters or body, in negative mode)
            tally.record(where, 0)


@pytest.mark.parametrize("authenticated", [True, False], ids=["with-credentials", "without-credentials"])
def test_fuzz_every_operation(fuzzed: ServedApp, authenticated: bool) -> None:
    tally = Tally()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        _fuzz(fuzzed, authenticated, mode, tally)
    total = sum(sum(c.values()) for c in tally.statuses.values())
    print(f"\n== schema fuzzing, {'with' if authenticated else 'without'} credentials: {total} requests ==")
    for label, counter in sorted(tally.statuses.items()):
        print(f"  {label:70} {dict(sorted(counter.items()))}")
    print(f"  failures: {len(tally.failures)}")
    for failure in tally.failures[:20]:
        print(f"  - {failure}")
    state = fuzzed.wait_idle(5.0)
    assert (state["busy"], state["queued"]) == (0, 0)
    document = requests.get(f"{fuzzed.base_url}/schema/openapi.json", timeout=30).json()
    operations = sum(len(methods) for methods in document["paths"].values())
    assert operations >= 20
    assert len(tally.statuses) == 2 * operations, sorted(tally.statuses)  # every operation, both modes
    assert not tally.failures, "\n".join(tally.failures[:20])
    # the credentials used still work: the fuzzer did not lock itself out or break the app
    ok = requests.get(f"{fuzzed.base_url}/v1/models", headers=fuzzed.headers, timeout=30)
    assert ok.status_code == 200
