"""What can go wrong talking to an upstream. Each is an ``EngineError``, mapped to an API error in the
gateway's one table (``gateway.errors.from_engine_error``). Messages never hold an upstream's URL or key:
a replica is named by its index only."""

from __future__ import annotations

import re

from engine.base import EngineError

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
MAX_MESSAGE = 500


def scrub(message: str) -> str:
    """An upstream's own message made safe to show a client: no URLs, bounded length."""
    cleaned = _URL.sub("[url]", message).strip()
    return cleaned[:MAX_MESSAGE]


class UpstreamError(EngineError):
    """Base of the upstream failures."""


class UpstreamUnavailableError(UpstreamError):
    """No replica could take the request: every one refused the connection, answered 502/503, or is
    ejected (502 ``upstream_unavailable``)."""

    retry_after = 2


class UpstreamTimeoutError(UpstreamError):
    """No replica answered within the first-byte timeout (504 ``upstream_timeout``)."""

    retry_after = 2


class UpstreamBusyError(UpstreamError):
    """Every healthy replica is at its concurrency limit and none freed up in time (503)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamRateLimitedError(UpstreamError):
    """The upstream answered 429; its ``Retry-After`` is passed on (429)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamRequestError(UpstreamError):
    """The upstream refused the request itself (400/413/422): the client's to fix (400, the upstream's
    message scrubbed)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class UpstreamResponseError(UpstreamError):
    """The upstream failed in a way retrying elsewhere does not fix, or spoke something that is not the
    OpenAI API (502 ``upstream_error``)."""


class UpstreamStreamError(UpstreamError):
    """A stream that had started broke: the replica died, went silent past the idle timeout, or sent an
    error (an error frame ends the stream; never retried: the client already has part of the answer)."""
