"""Text assembly shared by every engine: incremental UTF-8 decoding and stop-string matching."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class IncrementalDetokenizer:
    """Turns token byte pieces into text, holding back incomplete UTF-8 sequences."""

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now complete."""
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """Return whatever is left (an incomplete sequence becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings across token boundaries.

    Text that could still be the start of a stop string is held back, so a client never sees any
    part of a stop string, as in OpenAI's API.
    """

    __slots__ = ("_buffer", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return ``(text safe to emit, whether a stop string was hit)``."""
        if not self._stops:
            return text, False
        buffer = self._buffer + text
        first = -1
        for stop in self._stops:
            index = buffer.find(stop)
            if index >= 0 and (first < 0 or index < first):
                first = index
        if first >= 0:
            pending = self._pending_start(buffer, first)
            if pending is None:
                self._buffer = ""
                return buffer[:first], True
            # a longer stop that starts earlier may still complete: it would win, so wait for it
            self._buffer = buffer[pending:]
            return buffer[:pending], False
        hold = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:length]):
                    hold = length
                    break
        self._buffer = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def _pending_start(self, buffer: str, before: int) -> int | None:
        """The earliest position before ``before`` where a stop string has begun but not yet ended."""
        for start in range(before):
            rest = buffer[start:]
            if any(len(stop) > len(rest) and stop.startswith(rest) for stop in self._stops):
                return start
        return None

    def flush(self) -> tuple[str, bool]:
        """Release held-back text at the end of a generation: ``(text, whether it held a stop string)``
        (held text can hold a whole stop string while a longer one that began earlier was pending)."""
        text, self._buffer = self._buffer, ""
        cuts = [index for stop in self._stops if (index := text.find(stop)) >= 0]
        return (text[: min(cuts)], True) if cuts else (text, False)
