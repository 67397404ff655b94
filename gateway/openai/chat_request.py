"""What a chat request asks beyond sampling: its tools, its messages as the engine renders them, and the
features it asks for that no model here has (refused in words before anything runs)."""

from __future__ import annotations

from typing import Any

from engine.tools import FunctionChoice, FunctionTool, ToolChoice, ToolRequest, ToolSpecError
from gateway.errors import InvalidRequestError
from gateway.openai.protocol.chat import (
    UNSUPPORTED_PARTS,
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
)


def refuse_unsupported(request: ChatCompletionRequest) -> None:
    """A 400 naming the feature, for what would change the output and is not supported here.

    ``reasoning_effort`` follows OpenAI for a model that does not reason: any value is refused
    (``null`` is the same as leaving it out).
    """
    model = request.model
    if request.reasoning_effort is not None:
        raise InvalidRequestError(
            "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
            param="reasoning_effort",
            code="unsupported_parameter",
        )
    if request.modalities is not None and "audio" in request.modalities:
        raise _unsupported(f"audio output is not supported by model {model}", "modalities")
    if request.audio is not None:
        raise _unsupported(f"audio output is not supported by model {model}", "audio")
    if request.prediction is not None:
        raise _unsupported(
            f"predicted outputs (`prediction`) are not supported by model {model}", "prediction"
        )
    for index, message in enumerate(request.messages):
        if message.audio is not None:
            raise _unsupported(f"audio input is not supported by model {model}", f"messages[{index}].audio")
        if isinstance(message.content, list):
            for part_index, part in enumerate(message.content):
                kind = UNSUPPORTED_PARTS.get(type(part))
                if kind is not None:
                    raise _unsupported(
                        f"{kind} input is not supported by model {model}",
                        f"messages[{index}].content[{part_index}]",
                    )


def _unsupported(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="unsupported_value")


def legacy_functions(request: ChatCompletionRequest) -> bool:
    """Whether the request uses the legacy ``functions`` (the answer then says ``function_call``)."""
    return request.functions is not None


def tool_request(request: ChatCompletionRequest) -> ToolRequest | None:
    """The request's tools and choice (``None`` without tools); legacy ``functions``/``function_call``
    map onto the same (one call at most, as that API has). A named function is called exactly once.

    Raises:
        InvalidRequestError: ``tools`` and ``functions`` together, or a choice that names no offered tool.
    """
    if request.tools is not None and request.functions is not None:
        raise InvalidRequestError(
            "`tools` and the legacy `functions` cannot be used together", param="functions"
        )
    choice: ToolChoice = "auto"
    if request.functions is not None:
        definitions = request.functions
        parallel = False
        if request.function_call is not None:
            named = request.function_call
            choice = named if isinstance(named, str) else FunctionChoice(named.name)
        param = "function_call"
    else:
        if not request.tools:
            if request.tool_choice not in (None, "none", "auto"):
                raise InvalidRequestError(
                    "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
                    "specified.",
                    param="tool_choice",
                )
            return None
        definitions = [tool.function for tool in request.tools]
        parallel = request.parallel_tool_calls is not False
        if request.tool_choice is not None:
            named_tool = request.tool_choice
            choice = named_tool if isinstance(named_tool, str) else FunctionChoice(named_tool.function.name)
        param = "tool_choice"
    tools = tuple(
        FunctionTool(
            definition.name,
            definition.description or "",
            definition.parameters or {},
            bool(definition.strict),
        )
        for definition in definitions
    )
    if isinstance(choice, FunctionChoice):
        parallel = False  # called once, as OpenAI does (instructor and LangChain rely on it)
    try:
        return ToolRequest(tools, choice, parallel)
    except ToolSpecError as exc:
        raise InvalidRequestError(str(exc), param=param) from None


def calls_allowed(request: ChatCompletionRequest) -> bool:
    """Whether the answer may hold tool calls (known from the request alone, as the cache needs)."""
    tools = tool_request(request)
    return tools is not None and tools.calls_allowed


def uses_tool_turns(request: ChatCompletionRequest) -> bool:
    """Whether the history holds calls or their results (then it is rendered as the tools path does)."""
    return any(
        message.role in ("tool", "function") or message.tool_calls or message.function_call is not None
        for message in request.messages
    )


def engine_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The history as the engine's tool renderers take it (OpenAI's shape, legacy roles mapped).

    A legacy ``function_call`` becomes a one-call ``tool_calls`` and a ``function`` message the ``tool``
    message answering it (the call's id is the function's name: the legacy API has no ids).

    Raises:
        InvalidRequestError: a ``tool`` message without ``tool_call_id``, or calls on a non-assistant.
    """
    rendered: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        item: dict[str, Any] = {"role": message.role, "content": message.text()}
        if isinstance(message.name, str):
            item["name"] = message.name
        calls = [_call(call.id, call.function) for call in message.tool_calls or ()]
        if message.function_call is not None:
            calls.append(_call(message.function_call.name, message.function_call))
        if calls:
            if message.role != "assistant":
                raise InvalidRequestError(
                    "only assistant messages may hold tool calls", param=f"messages[{index}].tool_calls"
                )
            item["tool_calls"] = calls
        if message.role == "tool":
            if not isinstance(message.tool_call_id, str):
                raise InvalidRequestError(
                    "a message with role 'tool' needs `tool_call_id`", param=f"messages[{index}].tool_call_id"
                )
            item["tool_call_id"] = message.tool_call_id
        elif message.role == "function":
            name = message.name if isinstance(message.name, str) else ""
            item.update(role="tool", tool_call_id=name)
        rendered.append(item)
    return rendered


def _call(call_id: str, function: FunctionCall) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": function.name, "arguments": function.arguments},
    }
