"""Graceful shutdown: refuse new requests with 503, let in-flight ones finish (bounded), abort the rest.

On SIGTERM the server keeps listening while it drains, so a new request gets a clear 503 in OpenAI's
envelope (with ``Retry-After`` and ``Connection: close``) instead of a refused connection, and a load
balancer polling ``/health`` sees 503 too. Requests already running or queued go on until
``server.drain_timeout_s``; whatever is still running then ends with an error frame (streams) or a 503
(JSON), and only then does the server stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from engine.models import ModelManager
from gateway.errors import ServiceUnavailableError, send_error

logger = logging.getLogger("pocketllm")

ABORT_GRACE_S = 2.0
"""After the drain timeout, how long aborted requests get to write their error frames."""
SHUTTING_DOWN = "the server is shutting down"


class Drainer:
    """The drain state of one app, shared by its middleware and the server that stops it."""

    def __init__(self, models: ModelManager, timeout_s: float) -> None:
        self._models = models
        self.timeout_s = timeout_s
        self.draining = False

    async def drain(self) -> bool:
        """Stop taking requests and wait for in-flight ones; ``True`` if they all finished in time."""
        self.draining = True
        logger.info("draining: refusing new requests, waiting up to %gs for running ones", self.timeout_s)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._models.drained()
        except TimeoutError:
            logger.warning("drain timeout: aborting the requests still running")
            self._models.abort(SHUTTING_DOWN)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ABORT_GRACE_S):
                    await self._models.drained()
            return False
        return True

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """ASGI middleware: while draining, 503 to every new HTTP request and close new WebSockets."""

        async def refuse_while_draining(scope: Scope, receive: Receive, send: Send) -> None:
            if not self.draining:
                await app(scope, receive, send)
                return
            if scope["type"] == ScopeType.WEBSOCKET:
                await send({"type": "websocket.close", "code": 1001, "reason": SHUTTING_DOWN})
                return
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            error = ServiceUnavailableError(SHUTTING_DOWN, code="shutting_down", retry_after=5)
            await send_error(send, error, {"connection": "close"})

        return refuse_while_draining
