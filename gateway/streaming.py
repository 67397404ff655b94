"""Server-Sent Events as the ``openai`` SDK parses them: ``data: {json}\\n\\n`` frames, pings, ``[DONE]``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from litestar.response import Stream
from litestar.response.base import ASGIResponse

from engine.base import EngineError
from engine.pool import Reservation
from gateway.errors import GatewayError, InternalError, from_engine_error, sse_frame
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


async def event_stream(
    reservation: Reservation, ping_interval_s: float, produce: Callable[[int], AsyncIterator[bytes]]
) -> AsyncIterator[bytes]:
    """The whole SSE body: pings while waiting for a slot, the frames ``produce(slot)`` makes, ``[DONE]``.

    A failure becomes a ``data: {"error": ...}`` frame that ends the stream; the slot (or the place in
    the queue) is always given back, also when the client goes away.
    """
    waiter = asyncio.ensure_future(reservation.wait())
    try:
        while not (await asyncio.wait({waiter}, timeout=ping_interval_s))[0]:
            yield PING
        try:
            slot = waiter.result()
        except EngineError as exc:
            raise from_engine_error(exc, reservation.pool.retry_after()) from None
        async for chunk in produce(slot):
            yield chunk
        yield DONE
    except GatewayError as exc:
        current_request().failed(exc.code or exc.error_type)
        yield sse_frame(exc)
    except Exception:
        logger.exception("a stream failed")
        current_request().failed("internal_error")
        yield sse_frame(InternalError("internal server error"))
    finally:
        if not waiter.done():
            waiter.cancel()
        reservation.release()


async def replay_stream(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The SSE body of an answer that needs no slot (a cache hit): ``frames``, then ``[DONE]``."""
    try:
        async for chunk in frames:
            yield chunk
        yield DONE
    except GatewayError as exc:
        yield sse_frame(exc)
    except Exception:
        logger.exception("a replayed stream failed")
        yield sse_frame(InternalError("internal server error"))
