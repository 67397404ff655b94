"""Tool calling without the HTTP layer: the call syntax, prompts for templates that know no tools,
and the parser that turns grammar-constrained output into OpenAI ``tool_calls`` (whole or streamed).

Both paths, template-native (Qwen 2.5 / Hermes templates) and generic (any other template), make the
model answer in the Hermes syntax, one block per call::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A grammar (``engine.llamacpp.grammar.tool_call_grammar``) holds the output to exactly this, with
``arguments`` valid under the function's schema; a plain reply (``tool_choice: auto``) is any text
that does not start with ``<tool_call>``. So the first few tokens decide text or call, and the
parser never meets anything it cannot read.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.base import EngineError, FinishReason

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
CALL_SEPARATOR = "\n"
_HEAD = '{"name": "'
_ARGUMENTS_KEY = ', "arguments": '
_TAIL = "}" + CALL_CLOSE
RESPONSE_OPEN = "<tool_response>\n"
RESPONSE_CLOSE = "\n</tool_response>"

Message = Mapping[str, Any]
"""A chat message as OpenAI sends it (``role``, ``content``, ``tool_calls``, ``tool_call_id``...)."""


class ToolSpecError(EngineError):
    """``tools`` / ``tool_choice`` do not make a valid request (a client error)."""


class ToolCallFormatError(EngineError):
    """Output that should have been grammar-constrained is not in the tool call syntax."""


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """One offered function (OpenAI ``tools[i].function``)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    strict: bool = False
    """Accepted; arguments always follow the schema, strict or not."""

    def openai(self) -> dict[str, Any]:
        """The tool in OpenAI's shape, as chat templates expect it in ``tools``."""
        function: dict[str, Any] = {"name": self.name, "description": self.description}
        function["parameters"] = self.parameters or {"type": "object", "properties": {}}
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class FunctionChoice:
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    name: str


ToolChoice = Literal["none", "auto", "required"] | FunctionChoice


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """What a chat request asks about tools.

    Raises:
        ToolSpecError: duplicate function names, a named choice that is not offered, or a choice
            that needs tools when none are offered.
    """

    tools: tuple[FunctionTool, ...]
    choice: ToolChoice = "auto"
    parallel: bool = True

    def __post_init__(self) -> None:
        names = [tool.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise ToolSpecError("function names in tools must be unique")
        if isinstance(self.choice, FunctionChoice) and self.choice.name not in names:
            raise ToolSpecError(f"tool_choice names function {self.choice.name!r}, which is not in tools")
        if self.choice == "required" and not self.tools:
            raise ToolSpecError("tool_choice 'required' needs at least one tool")

    @property
    def calls_allowed(self) -> bool:
        """Whether the answer may hold calls (every choice but ``none``, with tools offered)."""
        return self.choice != "none" and bool(self.tools)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A finished call, as OpenAI's ``message.tool_calls[i]`` (``arguments`` is JSON text)."""

    id: str
    name: str
    arguments: str

    def openai(self) -> dict[str, Any]:
        """The call in OpenAI's wire shape."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """Reply text (``delta.content``)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A call begins: ``delta.tool_calls[{index, id, type, function: {name, arguments: ""}}]``."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsDelta:
    """More of a call's arguments: ``delta.tool_calls[{index, function: {arguments}}]``."""

    index: int
    text: str


ToolDelta = ContentDelta | ToolCallStart | ArgumentsDelta


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """The whole answer: reply text and/or calls, and the finish reason for the response.

    ``finish_reason`` is ``tool_calls`` when the model finished its calls, else the engine's reason.
    ``truncated`` is the call that ``length`` (or a stop string) cut off: its arguments are not
    complete JSON, so it is not in ``calls`` (a stream has already sent its beginning).
    """

    content: str | None
    calls: tuple[ToolCall, ...]
    finish_reason: Literal["stop", "length", "tool_calls"]
    truncated: ToolCall | None = None


def new_call_id() -> str:
    """An id in OpenAI's style: ``call_`` and 24 random characters."""
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallParser:
    """Turns the text of a tool-constrained answer into deltas as it arrives, then into a ``ToolOutput``.

    Text that could still become ``<tool_call>`` is held back until it is decided (a few
    characters); after that, reply text passes through at once and arguments stream as the model
    writes them. With ``calls_allowed`` false (``tool_choice: none``) everything is reply text.
    """

    def __init__(self, *, calls_allowed: bool = True) -> None:
        self._text = ""
        self._pos = 0
        self._state: Literal["start", "content", "head", "name", "key", "arguments", "tail", "after"]
        self._state = "start" if calls_allowed else "content"
        self._content: list[str] = []
        self._calls: list[ToolCall] = []
        self._id = ""
        self._name = ""
        self._arguments: list[str] = []
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[ToolDelta]:
        """Add generated text; return the deltas it completes."""
        self._text += text
        deltas: list[ToolDelta] = []
        while self._step(deltas):
            pass
        return deltas

    def finish(self, finish_reason: FinishReason) -> tuple[list[ToolDelta], ToolOutput]:
        """End of generation: the deltas still held back and the whole answer."""
        deltas: list[ToolDelta] = []
        if self._state == "start":  # ended on a prefix of the call marker: it was reply text
            self._state = "content"
            self._step(deltas)
        content = "".join(self._content) if self._content else None
        truncated = None
        if self._state in ("key", "arguments", "tail"):  # its ToolCallStart went out
            truncated = ToolCall(self._id, self._name, "".join(self._arguments))
        reason: Literal["stop", "length", "tool_calls"] = finish_reason
        if self._state == "after" and finish_reason == "stop":
            reason = "tool_calls"
        return deltas, ToolOutput(content, tuple(self._calls), reason, truncated)

    def _expect(self, literal: str) -> bool | None:
        """Consume ``literal`` if the text has it; ``None`` while it might still come."""
        rest = self._text[self._pos :]
        if rest.startswith(literal):
            self._pos += len(literal)
            return True
        if literal.startswith(rest):
            return None
        return False

    def _fail(self, expected: str) -> bool:
        raise ToolCallFormatError(
            f"expected {expected!r} in a tool call, got {self._text[self._pos : self._pos + 40]!r}"
        )

    def _step(self, deltas: list[ToolDelta]) -> bool:
        """Advance through one state; return whether to try another."""
        state = self._state
        if state == "content":
            if self._pos < len(self._text):
                text = self._text[self._pos :]
                self._pos = len(self._text)
                self._content.append(text)
                deltas.append(ContentDelta(text))
            return False
        if state == "start":
            found = self._expect(CALL_OPEN)
            if found is None:
                return False
            self._state = "head" if found else "content"
            return True
        if state == "head":
            found = self._expect(_HEAD)
            if found is None:
                return False
            self._state = "name" if found else "head"
            return found or self._fail(_HEAD)
        if state == "name":
            return self._read_name(deltas)
        if state == "key":
            found = self._expect(_ARGUMENTS_KEY)
            if found is None:
                return False
            self._state = "arguments" if found else "key"
            return found or self._fail(_ARGUMENTS_KEY)
        if state == "arguments":
            return self._read_arguments(deltas)
        if state == "tail":
            # the schema grammar lets a value end in one optional space (llama.cpp's converter)
            while self._text.startswith(" ", self._pos):
                self._pos += 1
            found = self._expect(_TAIL)
            if found is None:
                return False
            if not found:
                return self._fail(_TAIL)
            self._calls.append(ToolCall(self._id, self._name, "".join(self._arguments)))
            self._state = "after"
            return True
        found = self._expect(CALL_SEPARATOR + CALL_OPEN)  # "after": another call, or the end
        if found is None:
            return False
        if not found:
            return self._fail(CALL_SEPARATOR + CALL_OPEN)
        self._state = "head"
        return True

    def _read_name(self, deltas: list[ToolDelta]) -> bool:
        end = self._text.find('"', self._pos)
        if end < 0:
            return False
        self._name = json.loads('"' + self._text[self._pos : end] + '"')
        self._pos = end + 1
        self._id = new_call_id()
        self._arguments = []
        self._depth, self._in_string, self._escaped = 0, False, False
        deltas.append(ToolCallStart(len(self._calls), self._id, self._name))
        self._state = "key"
        return True

    def _read_arguments(self, deltas: list[ToolDelta]) -> bool:
        """Pass the arguments object through until its closing brace (JSON strings are skipped)."""
        start = self._pos
        end = None
        for index in range(start, len(self._text)):
            char = self._text[index]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = index + 1
                    break
        stop = len(self._text) if end is None else end
        if stop > start:
            fragment = self._text[start:stop]
            self._arguments.append(fragment)
            deltas.append(ArgumentsDelta(len(self._calls), fragment))
        self._pos = stop
        if end is None:
            return False
        self._state = "tail"
        return True


def parse_tool_output(text: str, finish_reason: FinishReason, *, calls_allowed: bool = True) -> ToolOutput:
    """Parse a whole (non-streamed) answer."""
    parser = ToolCallParser(calls_allowed=calls_allowed)
    parser.feed(text)
    return parser.finish(finish_reason)[1]


# -- prompts ------------------------------------------------------------------------------------------


def format_call(name: str, arguments: Any) -> str:
    """One call in the syntax the model is asked to write (``arguments``: object or JSON text)."""
    if isinstance(arguments, str):
        arguments = _json_or_text(arguments)
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + CALL_CLOSE


def describe_tools(request: ToolRequest) -> str:
    """The system-turn text that offers the tools to a model whose template knows none."""
    lines = [
        "You can call functions. These are the functions, as JSON Schema:",
        *(json.dumps(tool.openai()["function"], ensure_ascii=False) for tool in request.tools),
        "",
        "To call a function, answer with its name and arguments as JSON inside tags:",
        format_call("function_name", {"argument": "value"}),
    ]
    if request.parallel:
        lines.append("To call several functions, write one such block after the other.")
    else:
        lines.append("Call at most one function.")
    if isinstance(request.choice, FunctionChoice):
        lines.append(f"You must call the function {request.choice.name}.")
    elif request.choice == "required":
        lines.append("You must call a function.")
    else:
        lines.append("If no function is needed, answer in plain text.")
    return "\n".join(lines)


def generic_messages(messages: Sequence[Message], request: ToolRequest | None) -> list[dict[str, str]]:
    """Messages for a template that knows no tools: plain ``role``/``content`` strings.

    The tools are described in the system turn (after the client's own system text); an
    assistant's ``tool_calls`` become the call blocks the model is asked to write; a run of ``tool``
    results becomes one user turn of ``<tool_response>`` blocks (as Hermes-style templates do).
    """
    rendered: list[dict[str, str]] = []
    for message in messages:
        role = str(message.get("role", "user"))
        content = content_text(message.get("content"))
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                format_call(call["function"]["name"], call["function"].get("arguments", "{}"))
                for call in message["tool_calls"]
            ]
            content = "\n".join(([content] if content else []) + calls)
        elif role == "tool":
            block = RESPONSE_OPEN + content + RESPONSE_CLOSE
            if rendered and rendered[-1].get("_tool") == "1":
                rendered[-1]["content"] += "\n" + block
                continue
            rendered.append({"role": "user", "content": block, "_tool": "1"})
            continue
        elif role == "developer":
            role = "system"
        rendered.append({"role": role, "content": content})
    for message in rendered:
        message.pop("_tool", None)
    if request is not None and request.calls_allowed:
        description = describe_tools(request)
        if rendered and rendered[0]["role"] == "system":
            rendered[0]["content"] = rendered[0]["content"] + "\n\n" + description
        else:
            rendered.insert(0, {"role": "system", "content": description})
    return rendered


def template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools itself: ``content`` as text (``""`` for ``null``),
    each call's ``arguments`` as an object (Qwen 2.5 and Hermes templates apply ``tojson`` to it)."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        copy = dict(message)
        copy["content"] = content_text(message.get("content"))
        if copy.get("role") == "developer":
            copy["role"] = "system"
        if message.get("tool_calls"):
            copy["tool_calls"] = [
                {
                    **call,
                    "function": {
                        **call["function"],
                        "arguments": _json_or_text(call["function"].get("arguments", "{}")),
                    },
                }
                for call in message["tool_calls"]
            ]
        rendered.append(copy)
    return rendered


def content_text(content: Any) -> str:
    """A message's ``content`` as text: ``null`` is empty; text parts are joined with no separator,
    as OpenAI concatenates them."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
