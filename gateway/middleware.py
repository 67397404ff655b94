"""ASGI middleware: request ids; JSON bodies only."""

from __future__ import annotations

import re
import uuid

from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import UnsupportedMediaTypeError, send_error

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestIdMiddleware:
    """Gives every HTTP response an ``x-request-id``: the client's (when well-formed) or a new one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if incoming and _VALID_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableScopeHeaders.from_message(message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


def _is_json(content_type: bytes) -> bool:
    media_type = content_type.split(b";", 1)[0].strip().lower()
    return media_type == b"application/json" or (
        media_type.startswith(b"application/") and media_type.endswith(b"+json")
    )


class JsonBodyMiddleware:
    """Refuses a request body declared as anything but JSON with 415, before any route reads it.

    Every route that takes a body takes JSON; without this a ``text/plain`` body was parsed as JSON
    anyway and a form or multipart body got a misleading "JSON is malformed". A body sent without a
    ``Content-Type`` is still read as JSON.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        content_type = None
        has_body = False
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif (name == b"content-length" and value.strip() not in (b"", b"0")) or (
                name == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                has_body = True
        if not has_body or content_type is None or _is_json(content_type):
            await self.app(scope, receive, send)
            return
        error = UnsupportedMediaTypeError(
            f"Content-Type {content_type.decode('latin-1')[:100]!r} is not supported: send the body as "
            "application/json",
            param="Content-Type",
        )
        await send_error(send, error)
