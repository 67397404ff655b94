"""The HTTP server ``pocketllm serve`` runs (and the tests serve on): uvicorn with its httptools protocol,
bounded in what a client may hold before a request exists.

uvicorn bounds neither the request line and headers under httptools (a 256 MiB header was read whole, and
answered 200) nor how long they may take to arrive (a client sending a byte every few seconds keeps its
connection forever: the keep-alive timer stops at the first byte). ``BoundedHttpProtocol`` adds both:

- more than ``server.max_header_bytes`` of request line and headers: 431 in the OpenAI envelope, and the
  connection is closed. Bytes are counted as they arrive, so at most one socket read (256 KiB) beyond the
  limit is ever held, whatever the client sends;
- headers not complete ``server.header_timeout_s`` after the connection opened (or after the previous
  response ended, on a kept-alive connection): 408 in the envelope (or a plain close when nothing was
  sent), and the connection is closed. A running response is never cut by it.
- a body not complete ``server.body_timeout_s`` after its headers, plus one second per
  ``server.body_min_rate`` bytes that came (a slowloris on the body: the header clock stops at the end of
  the headers, and every byte would stop uvicorn's keep-alive timer too): 408 in the envelope, or a plain
  close when the app has started its answer (a 401 sent before the body was read, say), and the
  connection is closed. Time while the server is not reading does not count: before the app asks for a
  body sent with ``Expect: 100-continue``, and while uvicorn's flow control has paused reading because
  the app has not consumed what came. A steady large body gets time in proportion to its size, and a
  response only starts streaming once the body is complete, so neither is cut.

Forwarded headers (``X-Forwarded-For``/``-Proto``) are trusted only from ``server.trusted_proxies``; with
none (the default) they are ignored, so a client cannot pose as another address (the login throttle keys
on it).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import GatewayError, HeadersTooLargeError, RequestTimeoutError, http_response_bytes
from gateway.settings import Settings

logger = logging.getLogger("pocketllm.server")


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on header size and on the time headers and body take."""

    max_header_bytes: ClassVar[int] = 64 * 1024
    header_timeout_s: ClassVar[float] = 10.0
    body_timeout_s: ClassVar[float] = 10.0
    body_min_rate: ClassVar[int] = 8 * 1024

    _header_bytes = 0
    """Bytes received while a request head was incomplete (catches one header that never ends)."""
    _head_bytes = 0
    """The current head's request target and headers as parsed (catches a head that came in one read)."""
    _head_too_large = False
    _awaiting_headers = True
    _header_timer: asyncio.TimerHandle | None = None
    _awaiting_body = False
    """The current request's headers are complete and its body is not."""
    _body_deadline = 0.0
    """Loop time by which the body must be complete (moves later with each byte that comes)."""
    _body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request's headers."""
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the header and body clocks."""
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse, counting the bytes of a request head still incomplete; refuse it over the limit. Start
        the body clock when a body is still to come (a request without one never arms it)."""
        if self._awaiting_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._awaiting_headers and self._header_bytes > self.max_header_bytes:
            self._refuse(self._too_large())
        elif self._awaiting_body and self._body_timer is None and not self.transport.is_closing():
            self._body_timer = self.loop.call_at(self._body_deadline, self._body_timeout)

    def on_message_begin(self) -> None:
        """A new request: its head is measured from here."""
        super().on_message_begin()
        self._head_bytes = 0
        self._head_too_large = False

    def on_url(self, url: bytes) -> None:
        """Measure the request target."""
        self._measure(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Measure one header (with its separators)."""
        self._measure(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _measure(self, size: int) -> None:
        # a head that arrived whole in one read is caught here, before any of the app sees it; raising
        # stops the parser, and uvicorn answers through ``send_400_response``, which says 431 instead
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            self._head_too_large = True
            raise ValueError("request head too large")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser refused; 431 when it was refused for its size."""
        if self._head_too_large:
            self._refuse(self._too_large())
        else:
            super().send_400_response(msg)

    def _too_large(self) -> HeadersTooLargeError:
        return HeadersTooLargeError(f"the request line and headers exceed {self.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        """The head has arrived: stop counting and stop its clock; the body's clock starts."""
        self._awaiting_headers = False
        self._header_bytes = 0
        self._cancel_header_timer()
        super().on_headers_complete()
        if not (self.parser.should_upgrade() and self._should_upgrade()):  # a WebSocket has no body
            self._awaiting_body = True
            self._body_deadline = self.loop.time() + self.body_timeout_s

    def on_body(self, body: bytes) -> None:
        """Each byte that comes gives the body ``1 / body_min_rate`` seconds more."""
        super().on_body(body)
        self._body_deadline += len(body) / self.body_min_rate

    def on_message_complete(self) -> None:
        """The body is complete: stop its clock. Whatever arrives next is the head of the next request;
        its clock starts now when the answer went out before the body was read (uvicorn's keep-alive
        timer, armed then, was stopped by the body's bytes)."""
        super().on_message_complete()
        self._awaiting_body = False
        self._cancel_body_timer()
        self._awaiting_headers = True
        if self.cycle is not None and self.cycle.response_complete and not self.transport.is_closing():
            self._arm_header_timer()

    def on_response_complete(self) -> None:
        """Start the clock for the next request's headers (unless they came already)."""
        super().on_response_complete()
        if self._awaiting_headers and not self.transport.is_closing():
            self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # a response is running; the clock starts again when it ends
        if self._header_bytes:
            self._refuse(RequestTimeoutError(f"the request headers took over {self.header_timeout_s:g}s"))
        else:
            self.transport.close()

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timeout(self) -> None:
        self._body_timer = None
        if not self._awaiting_body or self.transport.is_closing():
            return
        now = self.loop.time()
        cycle = self.cycle
        server_waits = self.flow.read_paused or (
            cycle is not None and cycle.waiting_for_100_continue and not cycle.response_started
        )
        if server_waits:  # not the client's delay: it gets a fresh allowance once the server reads
            self._body_deadline = max(self._body_deadline, now + self.body_timeout_s)
        if now < self._body_deadline:
            self._body_timer = self.loop.call_at(self._body_deadline, self._body_timeout)
            return
        if cycle is not None and cycle.response_started:  # no 408 inside (or after) the app's answer
            logger.debug("closed a connection from %s: its request body was too slow", self.client)
            self.transport.close()
            return
        self._refuse(RequestTimeoutError(f"the request body took over {self.body_timeout_s:g}s"))

    def _refuse(self, error: GatewayError) -> None:
        if self.transport.is_closing():
            return
        logger.debug("refused a connection from %s: %s", self.client, error.message)
        self._cancel_header_timer()
        self._cancel_body_timer()
        self.transport.write(http_response_bytes(error))
        self.transport.close()


def protocol_for(settings: Settings) -> type[BoundedHttpProtocol]:
    """``BoundedHttpProtocol`` with the bounds of ``settings.server``."""
    bounds = {
        "max_header_bytes": settings.server.max_header_bytes,
        "header_timeout_s": settings.server.header_timeout_s,
        "body_timeout_s": settings.server.body_timeout_s,
        "body_min_rate": settings.server.body_min_rate,
    }
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), bounds)


def server_config(app: Any, settings: Settings, *, host: str, port: int, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration of the gateway's server.

    Args:
        app: the ASGI app (``create_app(settings)``).
        settings: the whole configuration (``server`` section).
        host: the address to bind.
        port: the port to bind.
        **options: any other ``uvicorn.Config`` argument (log level, graceful shutdown...).

    Returns:
        The configuration: the bounded protocol, the keep-alive timeout, WebSocket messages bounded by
        ``server.max_body_bytes``, forwarded headers trusted only from ``server.trusted_proxies``.
    """
    server = settings.server
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_for(settings),
        timeout_keep_alive=server.keep_alive_timeout_s,
        ws_max_size=server.max_body_bytes,
        proxy_headers=bool(server.trusted_proxies),
        forwarded_allow_ips=",".join(server.trusted_proxies) or None,
        **options,
    )
