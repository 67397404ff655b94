"""Every error a client can see: the GatewayError tree, the one table from engine and identity errors to
it, and the one place envelopes are rendered (JSON bodies, SSE error frames, raw ASGI responses).

Every error is OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import HTTPResponseBodyEvent, HTTPResponseStartEvent, Send

from auth.errors import (
    AuthenticationError,
    AuthError,
    InvalidCredentialsError,
    LastAdminError,
    LoginBusyError,
    LoginThrottledError,
    StoreUnavailableError,
)
from engine.base import (
    ContextOverflowError,
    EngineCrashedError,
    EngineError,
    GrammarError,
    ModelLoadError,
    TemplateError,
)
from engine.models import ModelNotReadyError, UnknownModelError
from engine.pool import QueueFullError, QueueTimeoutError, ShuttingDownError
from engine.upstream.errors import (
    UpstreamBusyError,
    UpstreamRateLimitedError,
    UpstreamRequestError,
    UpstreamResponseError,
    UpstreamStreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from gateway.openai.protocol.common import ErrorBody, ErrorEnvelope
from telemetry.requests import current_request

logger = logging.getLogger("pocketllm.errors")
_encoder = msgspec.json.Encoder()


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def body(self) -> ErrorEnvelope:
        """The envelope for this error."""
        return ErrorEnvelope(ErrorBody(self.message, self.error_type, self.param, self.code))


class InvalidRequestError(GatewayError):
    """400: the request is malformed or asks for something unsupported."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """400: prompt plus max_tokens exceed the model's context."""

    default_code = "context_length_exceeded"


class UnauthenticatedError(GatewayError):
    """401: missing or invalid credentials."""

    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    """403: the principal may not do this."""

    status_code = 403
    error_type = "invalid_request_error"
    default_code = "permission_denied"


class NotFoundError(GatewayError):
    """404: no such resource."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    """404: the model id is not served here."""

    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        shown = model if len(model) <= 256 else f"{model[:256]}..."  # never echo a huge input back
        super().__init__(
            f"The model `{shown}` does not exist or you do not have access to it.", param="model"
        )


class ConflictError(GatewayError):
    """409: the change conflicts with the current state (e.g. disabling the last enabled admin)."""

    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class UnsupportedMediaTypeError(InvalidRequestError):
    """415: a request body that is not JSON."""

    status_code = 415
    default_code = "unsupported_media_type"


class ClientDisconnectedError(GatewayError):
    """499 (nginx's "client closed request"): the answer has nobody to go to; nothing is logged."""

    status_code = 499
    error_type = "invalid_request_error"
    default_code = "client_closed_request"


class PayloadTooLargeError(GatewayError):
    """413: request body over the limit."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class HeadersTooLargeError(GatewayError):
    """431: the request line and headers exceed ``server.max_header_bytes`` (answered by the server
    protocol before any of the app runs)."""

    status_code = 431
    error_type = "invalid_request_error"
    default_code = "request_header_fields_too_large"


class RequestTimeoutError(GatewayError):
    """408: the request line and headers did not arrive within ``server.header_timeout_s``, or the body
    not within ``server.body_timeout_s`` (plus its allowance for size)."""

    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class RateLimitError(GatewayError):
    """429: a rate limit was hit."""

    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"


class RateLimitExceededError(RateLimitError):
    """429 ``rate_limit_exceeded``; the error ``type`` names the limit (``requests``, ``tokens`` or
    ``concurrency``), as OpenAI's does for requests and tokens."""

    def __init__(self, kind: str, message: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.kind = kind

    def body(self) -> ErrorEnvelope:
        """The envelope, with ``type`` set to the limit that refused."""
        return ErrorEnvelope(ErrorBody(self.message, self.kind, self.param, self.code))


class ServiceUnavailableError(GatewayError):
    """503: the model cannot take the request now (queue full, waited too long, loading, draining)."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, retry_after))})


class BadGatewayError(GatewayError):
    """502: the model's upstream could not answer (unreachable, every replica failed, a broken stream)."""

    status_code = 502
    error_type = "server_error"
    default_code = "upstream_unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None) -> None:
        headers = {"Retry-After": str(max(1, retry_after))} if retry_after is not None else None
        super().__init__(message, code=code, headers=headers)


class GatewayTimeoutError(GatewayError):
    """504: no replica of the model's upstream answered within its first-byte timeout."""

    status_code = 504
    error_type = "server_error"
    default_code = "upstream_timeout"


class InternalError(GatewayError):
    """500: something failed inside the gateway; details go to the log only."""

    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"


def from_engine_error(exc: EngineError) -> GatewayError:
    """The one table from engine errors to API errors (each is counted in the metrics here)."""
    if isinstance(exc, QueueFullError | QueueTimeoutError):
        current_request().queue_rejected("full" if isinstance(exc, QueueFullError) else "timeout")
    elif not isinstance(exc, UnknownModelError | ModelNotReadyError):
        current_request().engine_error(type(exc).__name__)
    retry_after = exc.retry_after
    if isinstance(exc, UnknownModelError):
        return ModelNotFoundError(exc.name)
    if isinstance(exc, ModelNotReadyError):
        return ServiceUnavailableError(str(exc), code="model_not_ready", retry_after=retry_after)
    if isinstance(exc, QueueFullError):
        return ServiceUnavailableError(str(exc), code="queue_full", retry_after=retry_after)
    if isinstance(exc, QueueTimeoutError):
        return ServiceUnavailableError(str(exc), code="queue_timeout", retry_after=retry_after)
    if isinstance(exc, ShuttingDownError):
        return ServiceUnavailableError(str(exc), code="shutting_down", retry_after=retry_after)
    if isinstance(exc, ContextOverflowError):
        return ContextLengthError(str(exc), param="messages")
    if isinstance(exc, GrammarError):
        return InvalidRequestError(f"response_format could not be compiled: {exc}", param="response_format")
    if isinstance(exc, TemplateError):
        return InvalidRequestError(f"the chat template failed on these messages: {exc}", param="messages")
    if isinstance(exc, ModelLoadError):
        return ServiceUnavailableError(f"the model is not available: {exc}", code="model_not_loaded")
    if isinstance(exc, EngineCrashedError):
        return InternalError("the engine failed while generating; the request was aborted")
    # upstream models: messages name the model and replica indexes, never a URL or a key
    if isinstance(exc, UpstreamUnavailableError):
        return BadGatewayError(str(exc), retry_after=retry_after)
    if isinstance(exc, UpstreamTimeoutError):
        return GatewayTimeoutError(str(exc))
    if isinstance(exc, UpstreamBusyError):
        return ServiceUnavailableError(str(exc), code="upstream_busy", retry_after=retry_after)
    if isinstance(exc, UpstreamRateLimitedError):
        return RateLimitError(
            f"the model's upstream is rate limiting: {exc}",
            code="upstream_rate_limited",
            headers={"Retry-After": str(retry_after)},
        )
    if isinstance(exc, UpstreamRequestError):
        return InvalidRequestError(
            f"the model's upstream refused the request: {exc}", code="upstream_invalid_request"
        )
    if isinstance(exc, UpstreamStreamError):
        return BadGatewayError(f"the model's upstream failed: {exc}", code="upstream_stream_error")
    if isinstance(exc, UpstreamResponseError):
        return BadGatewayError(f"the model's upstream failed: {exc}", code="upstream_error")
    return InternalError("the engine failed")


def from_auth_error(exc: AuthError) -> GatewayError:
    """The table from the identity layer's errors to API errors."""
    if isinstance(exc, LoginThrottledError):
        return RateLimitError(
            "too many failed logins; try again later",
            code="login_throttled",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, LoginBusyError):
        return ServiceUnavailableError(str(exc), code="login_busy", retry_after=exc.retry_after)
    if isinstance(exc, StoreUnavailableError):
        return ServiceUnavailableError(
            "the identity store is unavailable; try again shortly", code="store_unavailable"
        )
    if isinstance(exc, InvalidCredentialsError):
        return UnauthenticatedError(str(exc), code="invalid_credentials")
    if isinstance(exc, AuthenticationError):
        return UnauthenticatedError(str(exc))
    if isinstance(exc, LastAdminError):
        return ConflictError(str(exc), param="user_id", code="last_admin")
    return InvalidRequestError(str(exc))


def as_gateway_error(exc: BaseException) -> GatewayError | None:
    """``exc`` as the error a client sees, or ``None`` for an unexpected exception (a bug: log it)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, EngineError):
        return from_engine_error(exc)
    if isinstance(exc, AuthError):
        return from_auth_error(exc)
    return None


def render(error: GatewayError) -> Response[bytes]:
    """The HTTP response for an error."""
    return Response(
        content=_encoder.encode(error.body()),
        status_code=error.status_code,
        media_type="application/json",
        headers=error.headers,
    )


def sse_frame(error: GatewayError) -> bytes:
    """The SSE frame that ends a stream with an error."""
    return b"data: " + _encoder.encode(error.body()) + b"\n\n"


def error_dict(error: GatewayError) -> dict[str, Any]:
    """The ``error`` object of the envelope as plain data (for WebSocket messages)."""
    body: dict[str, Any] = msgspec.to_builtins(error.body().error)
    return body


async def send_error(send: Send, error: GatewayError, extra_headers: dict[str, str] | None = None) -> None:
    """Answer with ``error`` straight from ASGI middleware (before any route runs)."""
    body = _encoder.encode(error.body())
    headers = {**error.headers, **(extra_headers or {})}
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": error.status_code,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ],
    }
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(start)
    await send(end)


def http_response_bytes(error: GatewayError) -> bytes:
    """A whole HTTP/1.1 response for ``error`` that closes the connection (for the server protocol,
    which answers before there is any ASGI request to answer through)."""
    body = _encoder.encode(error.body())
    reason = _REASONS.get(error.status_code, "Error")
    head = (
        f"HTTP/1.1 {error.status_code} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}
_MSGSPEC_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(?P<name>[^`]+)`")


def validation_error(message: str) -> InvalidRequestError:
    """Turn a msgspec validation message into a 400 with ``param`` set to the offending field."""
    param = None
    match = _MSGSPEC_PATH.search(message)
    if match:
        param = match.group("path") or None
        message = message[: match.start()]
    unknown = _UNKNOWN_FIELD.search(message)
    if unknown:
        name = unknown.group("name")
        param = f"{param}.{name}" if param else name
        return InvalidRequestError(
            f"Unrecognized request argument supplied: {name}", param=param, code="unsupported_parameter"
        )
    where = f" (at `{param}`)" if param else ""
    return InvalidRequestError(f"Invalid request: {message}{where}", param=param)


def handle_gateway_error(
    request: Request[Any, Any, Any], exc: GatewayError | EngineError | AuthError
) -> Response[bytes]:
    """Litestar exception handler for ``GatewayError`` and the engine and identity errors it maps."""
    error = as_gateway_error(exc)
    if error is None:  # pragma: no cover - registered only for the mapped types
        return handle_unexpected(request, exc)
    current_request().failed(error.code or error.error_type)
    return render(error)


def handle_validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    """Litestar's own body/parameter validation failures, in OpenAI's envelope."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    if extra and isinstance(extra[0], dict):
        first = extra[0]
        key = first.get("key")
        if isinstance(key, str) and key.startswith("data."):
            key = key.removeprefix("data.")
        message = str(first.get("message", exc.detail))
        if key and " - at `" not in message:
            message = f"{message} - at `$.{key}`" if first.get("source") == "body" else message
        error = validation_error(message)
        if error.param and error.param.startswith("data."):
            error.param = error.param.removeprefix("data.")
        if error.param is None and key:
            error.param = str(key)
        return render(error)
    return render(InvalidRequestError(f"Invalid request: {exc.detail}"))


_HTTP_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limit_exceeded",
}


def handle_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Litestar's HTTP exceptions (404 route, 405, 413 body size, ...) in OpenAI's envelope."""
    status = exc.status_code
    if status == 413:
        error: GatewayError = PayloadTooLargeError("Request body too large")
    elif status >= 500:
        error = InternalError("internal server error")
    else:
        error = InvalidRequestError(exc.detail, code=_HTTP_CODES.get(status, "invalid_request"))
    error.headers = dict(exc.headers or {})
    response = render(error)
    response.status_code = status
    return response


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Anything else: a 500 envelope; the traceback goes to the log, never to the client.

    Two failures of body decoding surface here rather than as validation errors: JSON nested deeper
    than the decoder recurses, and bytes that are not UTF-8. Both are the client's: 400.
    """
    if isinstance(exc, RecursionError):
        return render(InvalidRequestError("the request body is nested too deeply", code="invalid_json"))
    if isinstance(exc, UnicodeDecodeError):
        return render(InvalidRequestError("the request body is not valid UTF-8", code="invalid_json"))
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return render(InternalError("internal server error"))
