"""Server-Sent Events as the ``openai`` SDK parses them: ``data: {json}\\n\\n`` frames, pings, ``[DONE]``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar.response import Stream
from litestar.response.base import ASGIResponse

from gateway.errors import InternalError, as_gateway_error, sse_frame
from telemetry.requests import current_request

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}

_encoder = msgspec.json.Encoder()
logger = logging.getLogger("pocketllm.api")


class EventStream(Stream):
    """A ``text/event-stream`` response, whatever media type the route declares for its JSON answers.

    (Litestar lets a handler's declared media type win over a ``Stream``'s own; SSE must not be JSON.)
    """

    def __init__(self, frames: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> None:
        super().__init__(frames, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        """Build the ASGI response with the event-stream media type."""
        kwargs["media_type"] = "text/event-stream"
        return super().to_asgi_response(*args, **kwargs)


def frame(payload: Any) -> bytes:
    """One ``data:`` frame with ``payload`` encoded as JSON."""
    return b"data: " + _encoder.encode(payload) + b"\n\n"


async def guarded(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``frames``, then ``[DONE]``; a failure becomes a ``data: {"error": ...}`` frame that ends the stream.

    Engine and identity errors are mapped by the one table in ``gateway.errors``; anything else is a bug:
    logged with its traceback, and the client gets an ``internal_error`` frame, never the traceback.
    """
    try:
        async for chunk in frames:
            yield chunk
        yield DONE
    except Exception as exc:
        error = as_gateway_error(exc)
        if error is None:
            logger.exception("a stream failed")
            error = InternalError("internal server error")
        current_request().failed(error.code or error.error_type)
        yield sse_frame(error)
