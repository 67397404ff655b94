"""Server-Sent Events as the ``openai`` SDK parses them: ``data: {json}\\n\\n`` frames, pings, ``[DONE]``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar.response import Stream
from litestar.response.base import ASGIResponse

from engine.base import EngineError
from engine.pool import Reservation
from gateway.errors import from_engine_error

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

    def __init__(self, frames: AsyncIterator[bytes]) -> None:
        super().__init__(frames, media_type="text/event-stream", headers=SSE_HEADERS)

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:  # type: ignore[override]
        """Build the ASGI response with the event-stream media type."""
        kwargs["media_type"] = "text/event-stream"
        return super().to_asgi_response(*args, **kwargs)


def frame(payload: Any) -> bytes:
    """One ``data:`` frame with ``payload`` encoded as JSON."""
    return b"data: " + _encoder.encode(payload) + b"\n\n"


async def wait_for_slot(reservation: Reservation, ping_interval_s: float) -> AsyncIterator[bytes | int]:
    """Wait for the reservation's slot, yielding ``PING`` every ``ping_interval_s``; the slot comes last.

    Raises the mapped ``GatewayError`` when the wait times out; cancelling the iteration leaves the queue.
    """
    waiter = asyncio.ensure_future(reservation.wait())
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=ping_interval_s)
            if done:
                break
            yield PING
        try:
            slot = waiter.result()
        except EngineError as exc:
            raise from_engine_error(exc, reservation.pool.retry_after()) from None
        yield slot
    finally:
        if not waiter.done():
            waiter.cancel()
