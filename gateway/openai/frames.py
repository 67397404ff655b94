"""The wire shape of an answer: SSE chunks while it streams, the JSON body once it is finished.

One ``Frames`` object per response. The pipeline hands it ``Piece``s (a choice's text with its logprobs,
or its finish) and, for a JSON response, the finished ``CachedCompletion`` (the same type the response
cache stores, so a fresh answer and a cached one become the same body). ``ChatFrames`` and
``CompletionFrames`` differ only in the types they build; ``gateway.pocket`` adds its own.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import msgspec

from engine.base import TokenEvent
from engine.tools import ArgumentsDelta, ToolCallStart
from gateway.cache.entry import CachedChoice, CachedCompletion
from gateway.errors import GatewayError, sse_frame
from gateway.openai.generation import Shape
from gateway.openai.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    LogprobEntry,
    MessageToolCall,
    ToolCallDelta,
    ToolCallFunctionDelta,
    TopLogprobEntry,
)
from gateway.openai.protocol.common import PromptTokensDetails, Usage
from gateway.openai.protocol.completions import Completion, CompletionChoice, CompletionLogprobs
from gateway.sse import DONE, frame

Logprobs = ChoiceLogprobs | CompletionLogprobs


@dataclass(frozen=True, slots=True)
class Piece:
    """What one step of an answer adds to choice ``index``: text (with the logprobs of exactly its tokens
    when they were asked for), or the choice's end."""

    index: int
    text: str = ""
    logprobs: Logprobs | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    """Set on the piece that finishes the last choice: the whole answer's usage."""
    tool_calls: tuple[ToolCallStart | ArgumentsDelta, ...] = ()
    """Chat with tools: calls starting and their argument fragments (sent after ``text``)."""


def usage_of(prompt: int, completion: int, cached: int) -> Usage:
    """OpenAI's ``usage`` object."""
    return Usage(prompt, completion, prompt + completion, PromptTokensDetails(cached))


def chat_token_logprobs(event: TokenEvent) -> ChoiceLogprobs:
    """The chat API's logprobs of one sampled token: ``{"content": [one entry]}``."""
    return ChoiceLogprobs(
        [
            LogprobEntry(
                token=event.piece.decode("utf-8", errors="replace"),
                logprob=event.logprob if event.logprob is not None else 0.0,
                bytes=list(event.piece),
                top_logprobs=[TopLogprobEntry(t.token, t.logprob, t.bytes) for t in event.top_logprobs],
            )
        ]
    )


class Frames:
    """The response's identity (id, created, model name as asked, fingerprint) and its wire types."""

    object: ClassVar[Literal["chat.completion", "text_completion"]]
    id_prefix: ClassVar[str]
    done: ClassVar[bytes | None] = DONE
    """The frame that ends a stream that did not fail (``None``: none)."""

    def __init__(self, shape: Shape, model: str, include_usage: bool = False) -> None:
        self.shape = shape
        self.model = model
        self.include_usage = include_usage
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.fingerprint = f"fp_{shape.runtime.digest[:10]}"

    def echo(self, index: int) -> str:
        """The prompt echoed before choice ``index`` (``echo`` of text completions), else ``""``."""
        return self.shape.echo_texts[index // self.shape.n] if self.shape.echo_texts else ""

    def token_logprobs(self, event: TokenEvent, offset: int) -> Logprobs:
        """The wire logprobs of one sampled token; ``offset`` is its place in the choice's text."""
        raise NotImplementedError

    def stored_logprobs(self, plain: dict[str, Any] | None) -> Logprobs | None:
        """Logprobs kept as plain data (by the cache) as the wire type, when the request asks for them."""
        raise NotImplementedError

    def head(self) -> Iterator[bytes]:
        """Chunks sent once a slot is taken (or a cached answer is found), before any token."""
        return iter(())

    def chunk(self, piece: Piece) -> bytes | None:
        """The SSE chunk of ``piece`` (``None`` when it carries nothing to send)."""
        raise NotImplementedError

    def tail(self, usage: Usage) -> Iterator[bytes]:
        """Chunks after every choice finished (the usage chunk of ``stream_options.include_usage``)."""
        raise NotImplementedError

    def body(self, answer: CachedCompletion, cached_tokens: int) -> Any:
        """The JSON body of a finished answer."""
        raise NotImplementedError

    def error(self, error: GatewayError) -> bytes:
        """The frame that ends a stream with ``error`` (``data: {"error": ...}``)."""
        return sse_frame(error)


class ChatFrames(Frames):
    """``chat.completion`` bodies and ``chat.completion.chunk`` frames."""

    object = "chat.completion"
    id_prefix = "chatcmpl-"

    def token_logprobs(self, event: TokenEvent, offset: int) -> ChoiceLogprobs:
        """``{"content": [one entry]}``."""
        return chat_token_logprobs(event)

    def stored_logprobs(self, plain: dict[str, Any] | None) -> ChoiceLogprobs | None:
        """The chat shape."""
        if not self.shape.logprobs or not plain:
            return None
        return msgspec.convert(plain, ChoiceLogprobs)

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        return frame(ChatCompletionChunk(self.id, self.created, self.model, self.fingerprint, choices, usage))

    def head(self) -> Iterator[bytes]:
        """The role of every choice (with ``content: ""``, unless the answer may be calls only: then the
        content stays absent, as OpenAI's, until there is reply text)."""
        delta = ChoiceDelta(role="assistant") if self.shape.tool_calls else ChoiceDelta("assistant", "")
        for index in range(self.shape.choices):
            yield self._chunk([ChunkChoice(index, delta)])

    def chunk(self, piece: Piece) -> bytes | None:
        """A content delta, tool-call deltas (one chunk each, as OpenAI sends them), and the choice's
        ``finish_reason`` in a chunk of its own; ``None`` when the piece carries nothing."""
        logprobs = piece.logprobs if isinstance(piece.logprobs, ChoiceLogprobs) else None
        deltas = [ChoiceDelta(content=piece.text)] if piece.text or logprobs is not None else []
        deltas += [self._call_delta(delta) for delta in piece.tool_calls]
        chunks = [ChunkChoice(piece.index, delta) for delta in deltas]
        if chunks:
            chunks[0].logprobs = logprobs
        if piece.finish_reason is not None:
            chunks.append(ChunkChoice(piece.index, ChoiceDelta(), None, piece.finish_reason))  # type: ignore[arg-type]
        return b"".join(self._chunk([choice]) for choice in chunks) or None

    def _call_delta(self, delta: ToolCallStart | ArgumentsDelta) -> ChoiceDelta:
        """``delta.tool_calls`` (or the legacy ``delta.function_call``) of one call delta."""
        if isinstance(delta, ToolCallStart):
            function = ToolCallFunctionDelta("", delta.name)
            call = ToolCallDelta(delta.index, function, delta.id, "function")
        else:
            function = ToolCallFunctionDelta(delta.text)
            call = ToolCallDelta(delta.index, function)
        if self.shape.legacy_functions:
            return ChoiceDelta(function_call=function)
        return ChoiceDelta(tool_calls=[call])

    def tail(self, usage: Usage) -> Iterator[bytes]:
        """The usage chunk, when asked for."""
        if self.include_usage:
            yield self._chunk([], usage)

    def body(self, answer: CachedCompletion, cached_tokens: int) -> ChatCompletion:
        """The ``chat.completion`` object."""
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            system_fingerprint=self.fingerprint,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=_message(c, legacy=self.shape.legacy_functions),
                    logprobs=self.stored_logprobs(c.logprobs),
                    finish_reason=c.finish_reason,  # type: ignore[arg-type]
                )
                for c in answer.choices
            ],
            usage=usage_of(answer.prompt_tokens, answer.completion_tokens, cached_tokens),
        )


def _message(choice: CachedChoice, *, legacy: bool) -> AssistantMessage:
    """The answer's message: ``content`` is ``null`` when it holds only calls."""
    if not choice.tool_calls:
        return AssistantMessage("assistant", choice.text)
    calls = msgspec.convert(choice.tool_calls, list[MessageToolCall])
    content = choice.text or None
    if legacy:
        return AssistantMessage("assistant", content, function_call=calls[0].function)
    return AssistantMessage("assistant", content, tool_calls=calls)


class CompletionFrames(Frames):
    """``text_completion`` bodies and chunks (the legacy completions API)."""

    object = "text_completion"
    id_prefix = "cmpl-"

    def token_logprobs(self, event: TokenEvent, offset: int) -> CompletionLogprobs:
        """The legacy column shape for one token."""
        text = event.piece.decode("utf-8", errors="replace")
        top = {t.token: t.logprob for t in event.top_logprobs} if event.top_logprobs else None
        return CompletionLogprobs([text], [event.logprob], [top], [offset])

    def stored_logprobs(self, plain: dict[str, Any] | None) -> CompletionLogprobs | None:
        """The legacy shape."""
        if not self.shape.logprobs or not plain:
            return None
        return msgspec.convert(plain, CompletionLogprobs)

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return frame(Completion(self.id, self.created, self.model, choices, self.fingerprint, usage))

    def head(self) -> Iterator[bytes]:
        """The echoed prompts."""
        if self.shape.echo_texts:
            for index in range(self.shape.choices):
                yield self._chunk([CompletionChoice(index, self.echo(index))])

    def chunk(self, piece: Piece) -> bytes | None:
        """A text delta, or the choice's ``finish_reason``."""
        if piece.finish_reason is not None:
            return self._chunk([CompletionChoice(piece.index, "", None, piece.finish_reason)])  # type: ignore[arg-type]
        if not piece.text and piece.logprobs is None:
            return None
        logprobs = piece.logprobs if isinstance(piece.logprobs, CompletionLogprobs) else None
        return self._chunk([CompletionChoice(piece.index, piece.text, logprobs)])

    def tail(self, usage: Usage) -> Iterator[bytes]:
        """The usage chunk, when asked for."""
        if self.include_usage:
            yield self._chunk([], usage)

    def body(self, answer: CachedCompletion, cached_tokens: int) -> Completion:
        """The ``text_completion`` object (echoed prompts included)."""
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(
                    c.index,
                    self.echo(c.index) + c.text,
                    self.stored_logprobs(c.logprobs),
                    c.finish_reason,  # type: ignore[arg-type]
                )
                for c in answer.choices
            ],
            system_fingerprint=self.fingerprint,
            usage=usage_of(answer.prompt_tokens, answer.completion_tokens, cached_tokens),
        )
