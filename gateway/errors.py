"""The GatewayError tree and its one renderer (JSON bodies and SSE error frames).

Every error a client can see is OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``.
Engine errors are mapped to API errors in one table (``from_engine_error``).
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from engine.base import (
    ContextOverflowError,
    EngineCrashedError,
    EngineError,
    GrammarError,
    ModelLoadError,
    TemplateError,
)
from engine.pool import QueueFullError, QueueTimeoutError, ShuttingDownError
from gateway.protocol.common import ErrorBody, ErrorEnvelope
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


class AuthenticationError(GatewayError):
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


class PayloadTooLargeError(GatewayError):
    """413: request body over the limit."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimitError(GatewayError):
    """429: a rate limit was hit."""

    status_code = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"


class ServiceUnavailableError(GatewayError):
    """503: the model cannot take the request now (queue full, waited too long, loading, draining)."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, retry_after))})


class InternalError(GatewayError):
    """500: something failed inside the gateway; details go to the log only."""

    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"


def from_engine_error(exc: EngineError, retry_after: int = 1) -> GatewayError:
    """The one table from engine errors to API errors (each is counted in the metrics here)."""
    if isinstance(exc, QueueFullError | QueueTimeoutError):
        current_request().queue_rejected("full" if isinstance(exc, QueueFullError) else "timeout")
    else:
        current_request().engine_error(type(exc).__name__)
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
    return InternalError("the engine failed")


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


def handle_gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    """Litestar exception handler for ``GatewayError``."""
    current_request().failed(exc.code or exc.error_type)
    return render(exc)


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
    error_type = "invalid_request_error" if status < 500 else "server_error"
    code = _HTTP_CODES.get(status, "server_error" if status >= 500 else "invalid_request")
    message = exc.detail if status < 500 else "internal server error"
    if status == 413:
        message = "Request body too large"
    body = ErrorEnvelope(ErrorBody(message, error_type, None, code))
    return Response(
        content=_encoder.encode(body),
        status_code=status,
        media_type="application/json",
        headers=dict(exc.headers or {}),
    )


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
