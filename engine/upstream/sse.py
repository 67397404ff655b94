"""Server-sent events as an upstream sends them, parsed incrementally (no buffering beyond one event)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MAX_EVENT_BYTES = 4 * 1024 * 1024
"""An event larger than this is not an OpenAI stream chunk (a broken or hostile upstream)."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: its ``event`` name (``message`` unless set) and its joined ``data`` lines."""

    data: str
    event: str = "message"


class SSEParser:
    """Feed bytes as they arrive; get each complete event as soon as its blank line arrives.

    Follows the WHATWG rules the OpenAI streams need: ``\\n``, ``\\r\\n`` and ``\\r`` line ends, ``:``
    comments (pings) ignored, several ``data:`` lines joined by ``\\n``, one optional space after the colon.
    llama-server's ``error: {...}`` lines (a field that is not in the standard) come out as an event named
    ``error``.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._size = 0

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        """The events that ``chunk`` completes."""
        self._buffer += chunk
        while True:
            line, ending = self._next_line()
            if ending is None:
                break
            event = self._line(line)
            if event is not None:
                yield event
        if len(self._buffer) + self._size > MAX_EVENT_BYTES:
            raise ValueError("an upstream stream event is larger than 4 MiB")

    def close(self) -> SSEEvent | None:
        """The stream ended: an event still open without its blank line is dispatched (as browsers don't,
        but an upstream that closes right after its last ``data:`` line did send it)."""
        if self._buffer:
            event = self._line(self._buffer)
            self._buffer = b""
            if event is not None:
                return event
        return self._dispatch()

    def _next_line(self) -> tuple[bytes, bytes | None]:
        buffer = self._buffer
        newline, carriage = buffer.find(b"\n"), buffer.find(b"\r")
        if carriage == -1 or (newline != -1 and newline < carriage):
            if newline == -1:
                return b"", None
            self._buffer = buffer[newline + 1 :]
            return buffer[:newline], b"\n"
        if carriage + 1 == len(buffer):
            return b"", None  # wait: a \n may follow in the next chunk
        skip = 2 if buffer[carriage + 1] == 0x0A else 1
        self._buffer = buffer[carriage + skip :]
        return buffer[:carriage], b"\r"

    def _line(self, raw: bytes) -> SSEEvent | None:
        if not raw:
            return self._dispatch()
        line = raw.decode("utf-8", errors="replace")
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
            self._size += len(value)
        elif name == "event":
            self._event = value
        elif name == "error":  # llama-server: `error: {...}` then a blank line
            self._event = "error"
            self._data.append(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent("\n".join(self._data), self._event or "message")
        self._data, self._event, self._size = [], "", 0
        return event
