"""Server-Sent Events as the ``openai`` SDK parses them: ``data: {json}\\n\\n`` frames, pings, ``[DONE]``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar.response import Stream
from litestar.response.base import ASGIResponse

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}

_encoder = msgspec.json.Encoder()


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
