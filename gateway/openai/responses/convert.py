"""From a Responses request to what the chat path runs: checks of what is supported, input items in
their stored form, the tools as ``engine.tools`` knows them, and the conversation as chat messages."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import msgspec

from engine.tools import FunctionChoice, FunctionTool, ToolChoice, ToolRequest, ToolSpecError
from gateway.errors import InvalidRequestError
from gateway.openai.responses.protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolSpec,
    InputText,
    Item,
    MessageItem,
    OutputText,
    ResponseRequest,
)

BUILT_IN_TOOLS = {
    "web_search": "web search",
    "web_search_preview": "web search",
    "file_search": "file search",
    "code_interpreter": "the code interpreter",
    "computer_use_preview": "computer use",
    "computer": "computer use",
    "image_generation": "image generation",
    "mcp": "remote MCP servers",
    "local_shell": "the local shell",
    "shell": "the shell",
    "apply_patch": "apply_patch",
    "custom": "custom (free-form) tools",
}
METADATA_MAX = 16


def new_id(prefix: str) -> str:
    """An id in OpenAI's style: ``prefix_`` and 32 hex characters."""
    return f"{prefix}_{uuid.uuid4().hex}"


def _unsupported(what: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(what, param=param, code="unsupported_parameter")


def check_supported(request: ResponseRequest) -> None:
    """Refuse, in words, what this gateway does not do (400)."""
    if request.background:
        raise _unsupported("background responses (`background: true`) are not supported", "background")
    if request.reasoning and any(value is not None for value in request.reasoning.values()):
        raise _unsupported(
            f"`reasoning` is not supported: the model `{request.model}` is not a reasoning model",
            "reasoning",
        )
    if request.include:
        raise _unsupported(f"`include` values are not supported: {', '.join(request.include)}", "include")
    if request.top_logprobs:
        raise _unsupported("`top_logprobs` (log probabilities) is not supported on responses", "top_logprobs")
    if request.max_tool_calls is not None:
        raise _unsupported("`max_tool_calls` is not supported", "max_tool_calls")
    if request.conversation is not None:
        raise _unsupported(
            "the Conversations API (`conversation`) is not supported; chain turns with "
            "`previous_response_id`",
            "conversation",
        )
    if request.prompt is not None:
        raise _unsupported("prompt templates (`prompt`) are not supported", "prompt")
    if request.truncation == "auto":
        raise _unsupported("`truncation: auto` is not supported (only `disabled`)", "truncation")
    if request.text is not None and request.text.verbosity not in (None, "medium"):
        raise _unsupported("`text.verbosity` other than `medium` is not supported", "text.verbosity")
    if request.metadata is not None:
        if len(request.metadata) > METADATA_MAX:
            raise InvalidRequestError(f"`metadata` may hold at most {METADATA_MAX} pairs", param="metadata")
        if any(len(key) > 64 or len(value) > 512 for key, value in request.metadata.items()):
            raise InvalidRequestError(
                "`metadata` keys are at most 64 characters and values at most 512", param="metadata"
            )


def tool_request(request: ResponseRequest) -> ToolRequest | None:
    """The function tools and the choice among them, or ``None`` when no tools are offered.

    Raises:
        InvalidRequestError: a built-in tool, a malformed function tool or an impossible ``tool_choice``.
    """
    specs: list[FunctionToolSpec] = []
    for index, raw in enumerate(request.tools or []):
        kind = str(raw.get("type", ""))
        if kind != "function":
            what = BUILT_IN_TOOLS.get(kind)
            name = f"the built-in tool `{kind}` ({what})" if what else f"tools of type `{kind}`"
            raise _unsupported(f"{name} is not supported; only `function` tools are", f"tools[{index}].type")
        try:
            specs.append(msgspec.convert(raw, FunctionToolSpec))
        except msgspec.ValidationError as exc:
            raise InvalidRequestError(f"invalid function tool: {exc}", param=f"tools[{index}]") from None
    choice = _tool_choice(request.tool_choice)
    if not specs:
        if choice in (None, "none", "auto"):
            return None
        raise InvalidRequestError("`tool_choice` needs function tools in `tools`", param="tool_choice")
    tools = tuple(
        FunctionTool(s.name, s.description or "", s.parameters or {}, bool(s.strict)) for s in specs
    )
    try:
        return ToolRequest(tools, choice or "auto", request.parallel_tool_calls is not False)
    except ToolSpecError as exc:
        raise InvalidRequestError(str(exc), param="tools") from None


def _tool_choice(raw: str | dict[str, Any] | None) -> ToolChoice | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        if raw in ("none", "auto", "required"):
            return raw  # type: ignore[return-value]
        raise InvalidRequestError(
            f"`tool_choice` {raw[:40]!r} is not one of none, auto, required", param="tool_choice"
        )
    kind = raw.get("type")
    if kind == "function" and isinstance(raw.get("name"), str):
        return FunctionChoice(raw["name"])
    raise _unsupported(
        f"`tool_choice` of type `{kind}` is not supported; use none, auto, required or "
        '{"type": "function", "name": ...}',
        "tool_choice",
    )


def input_items(raw: str | list[dict[str, Any]]) -> list[Item]:
    """The request's ``input`` as stored items (a string is one user message); ids are given where the
    client sent none.

    Raises:
        InvalidRequestError: an item or content part of a kind this gateway does not take.
    """
    if isinstance(raw, str):
        return [MessageItem(id=new_id("msg"), role="user", content=[InputText(raw)])]
    if not raw:
        raise InvalidRequestError("`input` must not be empty", param="input")
    return [_item(item, f"input[{index}]") for index, item in enumerate(raw)]


def _field(raw: dict[str, Any], name: str, param: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str):
        raise InvalidRequestError(f"`{param}.{name}` must be a string", param=f"{param}.{name}")
    return value


def _item(raw: dict[str, Any], param: str) -> Item:
    kind = raw.get("type", "message")
    given = raw.get("id")
    if kind == "message":
        role = raw.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise InvalidRequestError(
                f"`{param}.role` must be user, system, developer or assistant", param=f"{param}.role"
            )
        content = raw.get("content")
        parts: list[InputText | OutputText]
        if isinstance(content, str):
            parts = [OutputText(text=content) if role == "assistant" else InputText(content)]
        elif isinstance(content, list):
            parts = [_part(part, role, f"{param}.content[{i}]") for i, part in enumerate(content)]
        else:
            raise InvalidRequestError(
                f"`{param}.content` must be a string or a list of parts", param=f"{param}.content"
            )
        item_id = given if isinstance(given, str) else new_id("msg")
        return MessageItem(id=item_id, role=role, content=parts)
    if kind == "function_call":
        return FunctionCallItem(
            id=given if isinstance(given, str) else new_id("fc"),
            call_id=_field(raw, "call_id", param),
            name=_field(raw, "name", param),
            arguments=_field(raw, "arguments", param),
        )
    if kind == "function_call_output":
        output = raw.get("output")
        if isinstance(output, list):
            output = "".join(
                _part(part, "user", f"{param}.output[{i}]").text for i, part in enumerate(output)
            )
        if not isinstance(output, str):
            raise InvalidRequestError(f"`{param}.output` must be a string", param=f"{param}.output")
        return FunctionCallOutputItem(
            id=given if isinstance(given, str) else new_id("fco"),
            call_id=_field(raw, "call_id", param),
            output=output,
        )
    raise _unsupported(
        f"input items of type `{kind}` are not supported; only message, function_call and "
        "function_call_output",
        f"{param}.type",
    )


def _part(raw: Any, role: str, param: str) -> InputText | OutputText:
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind in ("input_text", "output_text", "text") and isinstance(raw.get("text"), str):
        return OutputText(text=raw["text"]) if role == "assistant" else InputText(raw["text"])
    raise _unsupported(
        f"content parts of type `{kind}` are not supported; only text (input_text, output_text)",
        f"{param}.type",
    )


def chat_messages(items: Sequence[Item], instructions: str | None) -> list[dict[str, Any]]:
    """The conversation as OpenAI chat messages (``engine.tools`` renders them, calls and results
    included): a function call joins the assistant message before it, a result is a ``tool`` message."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return messages
