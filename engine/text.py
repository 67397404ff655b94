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
            self._buffer = ""
            return buffer[:first], True
        hold = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:length]):
                    hold = length
                    break
        self._buffer = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """Release held-back text at the end of a generation that did not stop on a string."""
        text, self._buffer = self._buffer, ""
        return text
