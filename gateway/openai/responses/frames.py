"""The Responses API's wire shape of an answer: typed SSE events while it streams, the ``response`` object
once it is finished.

The generated text goes through ``engine.tools.ToolCallParser`` (all of it reply text when no function may
be called); an upstream model's answer (``structured``) arrives with its calls already apart from its
text, as pieces' ``tool_calls``, and is taken as it is. Either way the deltas become output items: a
``message`` with one ``output_text`` part, or a ``function_call``. The same builder makes the stream's
events and the final object, so the ids a client saw streamed (item ids, ``call_id``) are the ones stored
and returned by ``GET``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.base import TokenEvent
from engine.tools import ArgumentsDelta as CallArgumentsDelta
from engine.tools import ContentDelta, ToolCallParser, ToolCallStart, ToolDelta
from gateway.cache.entry import CachedCompletion
from gateway.errors import GatewayError
from gateway.openai.frames import Frames, Piece, chat_token_logprobs
from gateway.openai.generation import Shape
from gateway.openai.protocol.chat import ChoiceLogprobs
from gateway.openai.protocol.common import Usage
from gateway.openai.responses.convert import new_id
from gateway.openai.responses.protocol import (
    ArgumentsDelta,
    ArgumentsDone,
    ContentPartAdded,
    ContentPartDone,
    ErrorEvent,
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    MessageItem,
    OutputItem,
    OutputItemAdded,
    OutputItemDone,
    OutputText,
    OutputTextDelta,
    OutputTextDone,
    OutputTokensDetails,
    ResponseCompleted,
    ResponseCreated,
    ResponseError,
    ResponseEvent,
    ResponseFailed,
    ResponseIncomplete,
    ResponseInProgress,
    ResponseObject,
    ResponseUsage,
)

_encoder = msgspec.json.Encoder()


def event_frame(event: ResponseEvent) -> bytes:
    """One SSE frame: ``event: <type>`` and the event as ``data``."""
    kind = type(event).__struct_config__.tag
    return b"event: " + str(kind).encode() + b"\ndata: " + _encoder.encode(event) + b"\n\n"


@dataclass(slots=True)
class _Open:
    """The output item being written: a message's text or a call's arguments so far."""

    id: str
    index: int
    call_id: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)

    @property
    def is_call(self) -> bool:
        return bool(self.call_id)


class ResponseFrames(Frames):
    """``response`` objects and their stream events for one request.

    Args:
        shape: the answer's shape (one choice, no logprobs).
        template: the response object as the request makes it (status ``in_progress``, no output);
            its ``id`` and ``created_at`` are replaced by this object's own.
        calls_allowed: whether the model may call functions (its output is then parsed for calls).
        structured: the answer's calls come as ``Piece.tool_calls`` and ``CachedChoice.tool_calls`` (an
            upstream model), not as text to parse.
    """

    id_prefix = "resp_"
    done = None  # the Responses API's stream ends with its last event, no ``[DONE]``

    def __init__(
        self, shape: Shape, template: ResponseObject, calls_allowed: bool, *, structured: bool = False
    ) -> None:
        super().__init__(shape, template.model)
        self.template = msgspec.structs.replace(template, id=self.id, created_at=self.created)
        self.final: ResponseObject | None = None
        """The finished response (set by ``finish``)."""
        self._parser = ToolCallParser(calls_allowed=calls_allowed)
        self._fed = 0
        self._structured = structured
        self._calls_seen = 0
        """Structured: calls started by pieces (the rest of the answer's calls are added by ``finish``)."""
        self._open: _Open | None = None
        self._output: list[OutputItem] = []
        self._pending: list[ResponseEvent] = []
        self._sequence = 0
        self._started = False

    # -- Frames ---------------------------------------------------------------------------------------

    def token_logprobs(self, event: TokenEvent, offset: int) -> ChoiceLogprobs:
        """Unused: responses never ask for logprobs."""
        return chat_token_logprobs(event)

    def stored_logprobs(self, plain: dict[str, Any] | None) -> None:
        """None: responses never ask for logprobs."""
        return

    def head(self) -> Iterator[bytes]:
        """``response.created`` and ``response.in_progress``."""
        self._started = True
        yield self._frame(ResponseCreated(0, self.template))
        yield self._frame(ResponseInProgress(0, self.template))

    def chunk(self, piece: Piece) -> bytes | None:
        """The events of a piece of text; at the end, the items' ``done`` events and
        ``response.completed`` (or ``response.incomplete``)."""
        if piece.usage is not None:
            events, self._pending = self._pending, []
            return b"".join(self._frame(event) for event in events)
        if piece.finish_reason is not None or not (piece.text or piece.tool_calls):
            return None
        if self._structured:
            self._fed += len(piece.text)
            self._calls_seen += sum(isinstance(delta, ToolCallStart) for delta in piece.tool_calls)
            deltas: list[ToolDelta] = [ContentDelta(piece.text)] if piece.text else []
            events = self._apply([*deltas, *piece.tool_calls])
            return b"".join(self._frame(event) for event in events) or None
        self._fed += len(piece.text)
        events = self._apply(self._parser.feed(piece.text))
        return b"".join(self._frame(event) for event in events) or None

    def tail(self, usage: Usage) -> Iterator[bytes]:
        """Nothing: ``response.completed`` carries the usage."""
        return iter(())

    def body(self, answer: CachedCompletion, cached_tokens: int) -> ResponseObject:
        """The finished ``response`` object."""
        return self.final or self.finish(answer, cached_tokens)

    def error(self, error: GatewayError) -> bytes:
        """``response.failed`` once the response was announced, else an ``error`` event."""
        if not self._started:
            return self._frame(ErrorEvent(0, error.code or error.error_type, error.message, error.param))
        code = "rate_limit_exceeded" if error.status_code == 429 else "server_error"
        failed = msgspec.structs.replace(
            self.template, status="failed", error=ResponseError(code, error.message)
        )
        return self._frame(ResponseFailed(0, failed))

    # -- building -------------------------------------------------------------------------------------

    def finish(self, answer: CachedCompletion, cached_tokens: int) -> ResponseObject:
        """Close the output with the whole answer and make the final response (its closing events are
        sent with the last piece). The text not seen as pieces (a JSON response sees none) is parsed
        first."""
        choice = answer.choices[0]
        if self._structured:
            unseen = choice.text[self._fed :]
            rest: list[ToolDelta] = [ContentDelta(unseen)] if unseen else []
            for number, call in enumerate(choice.tool_calls or ()):
                if number >= self._calls_seen:
                    function = call["function"]
                    rest += [ToolCallStart(number, call["id"], function["name"])]
                    rest += [CallArgumentsDelta(number, function["arguments"])]
            events = self._apply(rest)
        else:
            events = self._apply(self._parser.feed(choice.text[self._fed :]))
            deltas, _ = self._parser.finish("length" if choice.finish_reason == "length" else "stop")
            events += self._apply(deltas)
        self._fed = len(choice.text)
        incomplete = choice.finish_reason == "length"
        if self._open is None and not self._output:  # nothing generated: an empty message
            events += self._apply([ContentDelta("")])
        events += self._close("incomplete" if incomplete else "completed")
        usage = ResponseUsage(
            answer.prompt_tokens,
            InputTokensDetails(cached_tokens),
            answer.completion_tokens,
            OutputTokensDetails(),
            answer.total_tokens,
        )
        self.final = msgspec.structs.replace(
            self.template,
            status="incomplete" if incomplete else "completed",
            completed_at=int(time.time()),
            incomplete_details=IncompleteDetails("max_output_tokens") if incomplete else None,
            output=list(self._output),
            usage=usage,
        )
        done = ResponseIncomplete(0, self.final) if incomplete else ResponseCompleted(0, self.final)
        self._pending = [*events, done]
        return self.final

    def _frame(self, event: ResponseEvent) -> bytes:
        event.sequence_number = self._sequence
        self._sequence += 1
        return event_frame(event)

    def _apply(self, deltas: list[ToolDelta]) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        for delta in deltas:
            if isinstance(delta, ContentDelta):
                if self._open is None or self._open.is_call:
                    events += self._close("completed")
                    events += self._start_message()
                assert self._open is not None
                self._open.parts.append(delta.text)
                if delta.text:
                    events.append(OutputTextDelta(0, self._open.id, self._open.index, 0, delta.text))
            elif isinstance(delta, ToolCallStart):
                events += self._close("completed")
                self._open = _Open(new_id("fc"), len(self._output), delta.id, delta.name)
                item = FunctionCallItem(
                    id=self._open.id, call_id=delta.id, name=delta.name, arguments="", status="in_progress"
                )
                events.append(OutputItemAdded(0, self._open.index, item))
            elif isinstance(delta, CallArgumentsDelta) and self._open is not None:
                self._open.parts.append(delta.text)
                events.append(ArgumentsDelta(0, self._open.id, self._open.index, delta.text))
        return events

    def _start_message(self) -> list[ResponseEvent]:
        self._open = _Open(new_id("msg"), len(self._output))
        item = MessageItem(id=self._open.id, role="assistant", content=[], status="in_progress")
        return [
            OutputItemAdded(0, self._open.index, item),
            ContentPartAdded(0, self._open.id, self._open.index, 0, OutputText(text="")),
        ]

    def _close(self, status: ItemStatus) -> list[ResponseEvent]:
        """The ``done`` events of the open item, which joins the output."""
        current, self._open = self._open, None
        if current is None:
            return []
        text = "".join(current.parts)
        if current.is_call:
            call = FunctionCallItem(
                id=current.id, call_id=current.call_id, name=current.name, arguments=text, status=status
            )
            self._output.append(call)
            return [
                ArgumentsDone(0, current.id, current.index, current.name, text),
                OutputItemDone(0, current.index, call),
            ]
        message = MessageItem(id=current.id, role="assistant", content=[OutputText(text=text)], status=status)
        self._output.append(message)
        return [
            OutputTextDone(0, current.id, current.index, 0, text),
            ContentPartDone(0, current.id, current.index, 0, OutputText(text=text)),
            OutputItemDone(0, current.index, message),
        ]
