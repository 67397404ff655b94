"""One request's telemetry: its server span and child spans, its timings and tokens, its access log line.

The HTTP middleware (``telemetry.http``) opens a ``RequestRecord`` per request and makes it current
(a context variable, as OpenTelemetry's own context is), as the gateway does for each turn on a
WebSocket; the stages of the request report to ``current_request()``: authentication, the cache, the
queue, prompt processing, generation. Outside a request (a WebSocket between turns, a unit test)
``current_request()`` is an inert record whose hooks do nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from telemetry.metrics import (
    ATTR_OPERATION,
    ATTR_PROVIDER,
    ATTR_REQUEST_MODEL,
    ATTR_RESPONSE_MODEL,
    PROVIDER_NAME,
    CacheOutcome,
    RequestOutcome,
)
from telemetry.summary import PROBE_ROUTES

if TYPE_CHECKING:
    from telemetry.setup import Telemetry

access_logger = logging.getLogger("pocketllm.access")

SPAN_AUTH = "auth"
SPAN_CACHE = "cache"
SPAN_QUEUE = "queue wait"
SPAN_PROMPT = "prompt processing"
SPAN_GENERATION = "generation"


class RequestRecord:
    """What one HTTP request did, gathered as it runs and reported once when its response ends."""

    def __init__(
        self,
        telemetry: Telemetry | None,
        *,
        request_id: str = "",
        method: str = "",
        route: str = "",
        operation: str | None = None,
        span: Span | None = None,
    ) -> None:
        self._telemetry = telemetry
        self.request_id = request_id
        self.method = method
        self.route = route
        self.operation = operation
        self.span: Span = span or trace.INVALID_SPAN
        self.started = time.perf_counter()
        self.status = 0
        self.user_id: str | None = None
        self.username: str | None = None
        self.request_model: str | None = None
        self.model: str | None = None
        self.provider = PROVIDER_NAME
        """``gen_ai.provider.name``: ``llama.cpp`` for a local model, ``openai`` for an upstream one."""
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.first_token_at: float | None = None
        self.generation_ended_at: float | None = None
        self.error_type: str | None = None
        self.disconnected = False
        self.complete = False
        self.prompt_text: str | None = None
        self._completion: list[str] = []
        self._stages: dict[str, Span] = {}
        self._finished = False

    @property
    def active(self) -> bool:
        """Whether anything is recorded (``False`` for the inert record outside a request)."""
        return self._telemetry is not None

    @property
    def log_content(self) -> bool:
        """Whether prompts and completions go into the access log (off unless configured)."""
        return self._telemetry is not None and self._telemetry.config.log_content

    # --- what the request is -----------------------------------------------------------------------
    def identify(self, request_model: str, model: str, provider: str = PROVIDER_NAME) -> None:
        """The model the client named (a configured id or alias), the served model's id, and what serves
        it (``gen_ai.provider.name``)."""
        if not self.active:
            return
        self.request_model, self.model, self.provider = request_model, model, provider
        self.span.set_attributes(
            {ATTR_REQUEST_MODEL: request_model, ATTR_RESPONSE_MODEL: model, ATTR_PROVIDER: provider}
        )

    def authenticated(self, user_id: str, username: str) -> None:
        """Who is calling (logs and traces only, never a metric attribute)."""
        if not self.active:
            return
        self.user_id, self.username = user_id, username
        self.span.set_attribute("enduser.id", user_id)

    # --- stages ------------------------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str, **attributes: str | int | float | bool) -> Iterator[Span]:
        """A child span around a stage (``auth``, ``cache``, ...); an exception marks it failed."""
        span = self._child(name, attributes)
        try:
            yield span
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()

    def cache(self, outcome: CacheOutcome, tier: str | None = None) -> None:
        """A response-cache lookup's outcome, and on a hit its tier (counted, and set on the request's
        span)."""
        if self._telemetry is None:
            return
        self._telemetry.metrics.cache_outcome(outcome, tier)
        self.span.set_attribute("pocketllm.cache", outcome)
        if tier is not None:
            self.span.set_attribute("pocketllm.cache.tier", tier)

    def rate_limited(self, kind: str) -> None:
        """A rate limit refused the request (``kind``: ``requests``, ``tokens`` or ``concurrency``)."""
        if self._telemetry is None:
            return
        self._telemetry.metrics.rate_limited(kind)
        self.span.set_attribute("pocketllm.rate_limited", kind)

    def queued(self, model: str) -> None:
        """The request asked ``model``'s pool for a slot: the queue wait starts."""
        if not self.active:
            return
        self.model = self.model or model
        self._open(SPAN_QUEUE)

    def slot_acquired(self, prompt_tokens: int) -> None:
        """The request holds a slot: the queue wait ends, prompt processing starts."""
        if not self.active:
            return
        self._close(SPAN_QUEUE)
        self.input_tokens = prompt_tokens
        self._open(SPAN_PROMPT, {"gen_ai.usage.input_tokens": prompt_tokens})

    def first_token(self) -> None:
        """The first output token: prompt processing ends, generation starts."""
        if not self.active or self.first_token_at is not None:
            return
        self.first_token_at = time.perf_counter()
        self._close(SPAN_PROMPT)
        self._open(SPAN_GENERATION)

    def add_completion_text(self, text: str) -> None:
        """Completion text of the first choice (kept only when content logging is on)."""
        if self.log_content:
            self._completion.append(text)

    def generated(self, input_tokens: int, output_tokens: int) -> None:
        """Generation ended (finished, failed or cancelled) with these token counts."""
        if not self.active:
            return
        self.generation_ended_at = time.perf_counter()
        self.input_tokens, self.output_tokens = input_tokens, output_tokens
        self._close(SPAN_QUEUE)
        self._close(SPAN_PROMPT)
        generation = self._stages.get(SPAN_GENERATION)
        if generation is not None:
            generation.set_attribute("gen_ai.usage.output_tokens", output_tokens)
        self._close(SPAN_GENERATION)

    def failed(self, error_type: str) -> None:
        """The request failed with ``error_type`` (an error code; also for failures inside a stream)."""
        if self.active and self.error_type is None:
            self.error_type = error_type

    def engine_error(self, error_type: str) -> None:
        """The engine failed (``error_type``: the engine error's class name)."""
        if self._telemetry is None:
            return
        self._telemetry.metrics.engine_error(self.model, error_type)
        self.failed(error_type)

    def queue_rejected(self, reason: str) -> None:
        """No slot: the queue was full (``full``) or the wait too long (``timeout``)."""
        if self._telemetry is None:
            return
        self._telemetry.metrics.queue_rejected(self.model, "full" if reason == "full" else "timeout")
        self.failed(f"queue_{reason}")

    # --- the end -----------------------------------------------------------------------------------
    def finish(self) -> None:
        """Record the request once: metrics, the span's end, the access log line."""
        if self._telemetry is None or self._finished:
            return
        self._finished = True
        ended = time.perf_counter()
        cancelled = not self.complete and self.disconnected
        status = self.status or (499 if cancelled else 500)
        for name in list(self._stages):
            self._close(name, error="cancelled" if cancelled else None)
        outcome = RequestOutcome(
            route=self.route,
            method=self.method,
            status=status,
            duration_s=ended - self.started,
            operation=self.operation,
            request_model=self.request_model,
            model=self.model,
            provider=self.provider,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            ttft_s=self.first_token_at - self.started if self.first_token_at is not None else None,
            tpot_s=self._time_per_output_token(),
            error_type=self.error_type,
            cancelled=cancelled,
        )
        self._telemetry.metrics.request_finished(outcome)
        self._end_span(outcome)
        self._log(outcome)

    def _time_per_output_token(self) -> float | None:
        if self.first_token_at is None or self.generation_ended_at is None or not self.output_tokens:
            return None
        if self.output_tokens < 2:
            return None
        return (self.generation_ended_at - self.first_token_at) / (self.output_tokens - 1)

    def _end_span(self, outcome: RequestOutcome) -> None:
        span = self.span
        attributes: dict[str, Any] = {"http.response.status_code": outcome.status}
        if self.operation is not None and self.model is not None:
            attributes[ATTR_OPERATION] = self.operation
            attributes[ATTR_PROVIDER] = self.provider
        if outcome.input_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = outcome.input_tokens
        if outcome.output_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = outcome.output_tokens
        if outcome.cancelled:
            attributes["pocketllm.cancelled"] = True
        error = outcome.error_type or ("cancelled" if outcome.cancelled else None)
        if error is not None:
            attributes["error.type"] = error
        span.set_attributes(attributes)
        if outcome.status >= 500 or outcome.error_type is not None:
            span.set_status(Status(StatusCode.ERROR, error or str(outcome.status)))
        span.end()

    def _log(self, outcome: RequestOutcome) -> None:
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "status": outcome.status,
            "duration_ms": round(outcome.duration_s * 1000, 1),
            "user_id": self.user_id,
            "user": self.username,
            "model": self.model,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "ttft_ms": round(outcome.ttft_s * 1000, 1) if outcome.ttft_s is not None else None,
            "cancelled": outcome.cancelled,
            "error_type": outcome.error_type,
        }
        context = self.span.get_span_context()
        if context.is_valid:
            fields["trace_id"] = format(context.trace_id, "032x")
        if self.log_content:
            fields["prompt"] = self.prompt_text
            fields["completion"] = "".join(self._completion)
        present = {k: v for k, v in fields.items() if v is not None and v is not False}
        text = " ".join(
            f"{k}={v}" for k, v in present.items() if k not in {"method", "route", "status", "duration_ms"}
        )
        access_logger.log(
            logging.DEBUG if self.route in PROBE_ROUTES else logging.INFO,  # health checks, scrapes
            "%s %s %s %.1fms %s",
            self.method,
            self.route,
            outcome.status,
            outcome.duration_s * 1000,
            text,
            extra={"access": fields},
        )

    # --- spans ---------------------------------------------------------------------------------------
    def _child(self, name: str, attributes: dict[str, Any] | None = None) -> Span:
        if self._telemetry is None:
            return trace.INVALID_SPAN
        return self._telemetry.tracer.start_span(
            name,
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.INTERNAL,
            attributes={"pocketllm.request_id": self.request_id, **(attributes or {})},
        )

    def _open(self, name: str, attributes: dict[str, Any] | None = None) -> None:
        if name not in self._stages:
            self._stages[name] = self._child(name, attributes)

    def _close(self, name: str, error: str | None = None) -> None:
        span = self._stages.pop(name, None)
        if span is None:
            return
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


INERT = RequestRecord(None)
"""The record outside any request: every hook is a no-op."""

_current: ContextVar[RequestRecord] = ContextVar("pocketllm_request", default=INERT)


def current_request() -> RequestRecord:
    """The record of the request being served (an inert one outside a request)."""
    return _current.get()


def set_current_request(record: RequestRecord) -> Token[RequestRecord]:
    """Make ``record`` current; returns a token for ``reset_current_request``."""
    return _current.set(record)


def reset_current_request(token: Token[RequestRecord]) -> None:
    """Undo ``set_current_request``."""
    _current.reset(token)
