"""A cached completion: enough to replay it as a JSON body or as a real multi-chunk SSE stream."""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec
from msgspec import Struct

_BOUNDARY = re.compile(r"(?<=\s)(?=\S)")
"""Between a run of whitespace and the next word: streamed pieces look like ``"Hello "``, ``"world."``."""


class CachedChoice(Struct, kw_only=True, omit_defaults=True):
    """One finished choice."""

    index: int
    text: str
    """The message content (chat) or the completion text."""
    finish_reason: str
    logprobs: dict[str, Any] | None = None
    """As sent on the wire: chat ``{"content": [...]}`` or legacy ``{"tokens": [...], ...}``."""
    tool_calls: list[dict[str, Any]] | None = None
    """Chat tool calls as sent on the wire (``{"id", "type", "function": {"name", "arguments"}}``);
    ``text`` is then the reply text beside them (often empty). Absent in entries made before tools."""


class ReplayChunk(Struct, frozen=True):
    """One piece of a replayed stream; the SSE layer turns it into a ``chunk`` payload."""

    index: int
    """The choice index."""
    text: str
    logprobs: dict[str, Any] | None = None
    """The logprobs of exactly the tokens in ``text`` (same shape as ``CachedChoice.logprobs``)."""
    finish_reason: str | None = None
    """Set on the last chunk of its choice only."""
    tool_calls: list[dict[str, Any]] | None = None
    """The choice's tool calls, on its last chunk (after its text)."""


class CachedCompletion(Struct, kw_only=True, omit_defaults=True):
    """A finished answer: what is stored, and what a JSON body is built from (fresh or cached).

    Only finished generations (``stop``, ``length``, ``tool_calls``) are ever stored. The response's id,
    model name and ``created`` are the new request's own, so they are not kept.
    """

    choices: list[CachedChoice]
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def chunks(self, max_chunks: int = 16) -> list[ReplayChunk]:
        """The content split into stream pieces, choice by choice.

        Text splits at word boundaries into at most ``max_chunks`` pieces per choice (a single long
        word splits by characters); with logprobs the pieces follow token boundaries and carry their
        tokens' logprobs. Joining a choice's ``text`` pieces gives its content back exactly.

        Args:
            max_chunks: upper bound of pieces per choice (at least 1).
        """
        out: list[ReplayChunk] = []
        for choice in sorted(self.choices, key=lambda c: c.index):
            pieces: list[tuple[str, dict[str, Any] | None]] = []
            pieces += _split_with_logprobs(choice, max_chunks) or []
            pieces = pieces or [(text, None) for text in _split_text(choice.text, max_chunks)]
            last = len(pieces) - 1
            out.extend(
                ReplayChunk(choice.index, text, logprobs, None, None)
                if i < last
                else ReplayChunk(choice.index, text, logprobs, choice.finish_reason, choice.tool_calls)
                for i, (text, logprobs) in enumerate(pieces)
            )
        return out


def _groups(count: int, max_groups: int) -> list[range]:
    size = max(1, math.ceil(count / max(1, max_groups)))
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _split_text(text: str, max_chunks: int) -> list[str]:
    if not text:
        return [""]
    words = _BOUNDARY.split(text)
    if len(words) == 1:
        words = list(text)
    return ["".join(words[i] for i in group) for group in _groups(len(words), max_chunks)]


def _split_with_logprobs(choice: CachedChoice, max_chunks: int) -> list[tuple[str, dict[str, Any]]] | None:
    """Pieces along token boundaries; ``None`` without logprobs or when the tokens do not spell the text."""
    logprobs = choice.logprobs
    if not logprobs:
        return None
    if isinstance(logprobs.get("content"), list):  # chat shape
        entries: list[dict[str, Any]] = logprobs["content"]
        tokens = [str(e.get("token", "")) for e in entries]
        if not entries or "".join(tokens) != choice.text:
            return None
        return [
            ("".join(tokens[i] for i in g), {"content": [entries[i] for i in g]})
            for g in _groups(len(entries), max_chunks)
        ]
    if isinstance(logprobs.get("tokens"), list):  # legacy completions shape
        names = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        columns = [logprobs.get(name) or [] for name in names]
        count = len(columns[0])
        if not count or any(len(c) != count for c in columns) or "".join(columns[0]) != choice.text:
            return None
        return [
            (
                "".join(columns[0][i] for i in g),
                {n: [c[i] for i in g] for n, c in zip(names, columns, strict=True)},
            )
            for g in _groups(count, max_chunks)
        ]
    return None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CachedCompletion)


def encode_completion(completion: CachedCompletion) -> bytes:
    """The stored form (msgpack)."""
    return _encoder.encode(completion)


def decode_completion(data: bytes) -> CachedCompletion:
    """Inverse of ``encode_completion``; raises ``msgspec.DecodeError`` (incl. validation) on bad data."""
    return _decoder.decode(data)
