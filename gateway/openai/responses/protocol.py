"""``/v1/responses`` wire types: the request, the items of a conversation, the response object and the
typed stream events (as the ``openai`` SDK's ``types.responses`` classes read them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, field

from gateway.cache.key import CacheOptions
from gateway.openai.protocol.common import MaxTokens, ModelName, Temperature, TopP

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class TextFormat(Struct, forbid_unknown_fields=True):
    """``text.format``: ``text``, ``json_object`` or ``json_schema`` (with ``name`` and ``schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(Struct, forbid_unknown_fields=True):
    """``text``."""

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class FunctionToolSpec(Struct, forbid_unknown_fields=True):
    """A ``tools[i]`` of type ``function`` (the Responses shape: ``name`` at the top level)."""

    type: Literal["function"]
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """Request body of ``POST /v1/responses``.

    ``tools``, ``tool_choice`` and the fields the gateway does not support are taken as plain data and
    checked in code, so that a refusal names them in words (``web_search`` is not a function tool...).
    """

    model: ModelName
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    safety_identifier: Annotated[str, Meta(max_length=256)] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    # accepted so that a refusal can name them (``gateway.openai.responses.convert.check_supported``)
    reasoning: dict[str, Any] | None = None
    background: bool | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    conversation: Any = None
    prompt: Any = None
    cache: CacheOptions | None = None
    """The gateway's response-cache extension, as on chat completions."""


# -- items (input and output) ---------------------------------------------------------------------------


class InputText(Struct, tag="input_text", tag_field="type"):
    """A text part of an input message."""

    text: str


class OutputText(Struct, tag="output_text", tag_field="type", kw_only=True):
    """The text part of an assistant message."""

    text: str
    annotations: list[Any] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)


class MessageItem(Struct, tag="message", tag_field="type", kw_only=True):
    """A message: the caller's (``input_text`` parts) or the model's (``output_text`` parts)."""

    id: str
    role: Literal["user", "system", "developer", "assistant"]
    content: list[InputText | OutputText]
    status: ItemStatus = "completed"

    def text(self) -> str:
        """The parts' text joined."""
        return "".join(part.text for part in self.content)


class FunctionCallItem(Struct, tag="function_call", tag_field="type", kw_only=True):
    """A call of a function tool by the model (``arguments``: JSON text)."""

    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus = "completed"


class FunctionCallOutputItem(Struct, tag="function_call_output", tag_field="type", kw_only=True):
    """The caller's result of a function call."""

    id: str
    call_id: str
    output: str
    status: ItemStatus = "completed"


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem
OutputItem = MessageItem | FunctionCallItem


# -- the response object -------------------------------------------------------------------------------


class InputTokensDetails(Struct):
    """``usage.input_tokens_details``."""

    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct):
    """``usage.output_tokens_details``."""

    reasoning_tokens: int = 0


class ResponseUsage(Struct):
    """``usage`` of a response."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(Struct):
    """``error`` of a failed response."""

    code: str
    message: str


class IncompleteDetails(Struct):
    """Why a response is ``incomplete``."""

    reason: Literal["max_output_tokens"]


class Reasoning(Struct):
    """``reasoning``: always empty here (no reasoning models)."""

    effort: None = None
    summary: None = None


class ResponseObject(Struct, kw_only=True):
    """The ``response`` object (``POST``/``GET /v1/responses``, and inside stream events)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    completed_at: int | None = None
    background: bool = False
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: Reasoning = field(default_factory=Reasoning)
    service_tier: str = "default"
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_logprobs: int = 0
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class DeletedResponse(Struct):
    """``DELETE /v1/responses/{id}``."""

    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class ItemList(Struct):
    """``GET /v1/responses/{id}/input_items``."""

    data: list[Item]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


# -- stream events ---------------------------------------------------------------------------------------


class ResponseEvent(Struct, tag_field="type"):
    """Base of the stream events: each has its ``type`` (the tag) and ``sequence_number``."""

    sequence_number: int


class ResponseCreated(ResponseEvent, tag="response.created"):
    """The response exists (``in_progress``, no output yet)."""

    response: ResponseObject


class ResponseInProgress(ResponseEvent, tag="response.in_progress"):
    """Generation is under way."""

    response: ResponseObject


class ResponseCompleted(ResponseEvent, tag="response.completed"):
    """The finished response."""

    response: ResponseObject


class ResponseIncomplete(ResponseEvent, tag="response.incomplete"):
    """The response ended early (``max_output_tokens``)."""

    response: ResponseObject


class ResponseFailed(ResponseEvent, tag="response.failed"):
    """Generation failed; ``response.error`` says why."""

    response: ResponseObject


class ErrorEvent(ResponseEvent, tag="error"):
    """A failure before the response started."""

    code: str | None
    message: str
    param: str | None


class OutputItemAdded(ResponseEvent, tag="response.output_item.added"):
    """An output item begins."""

    output_index: int
    item: OutputItem


class OutputItemDone(ResponseEvent, tag="response.output_item.done"):
    """An output item is complete."""

    output_index: int
    item: OutputItem


class ContentPartAdded(ResponseEvent, tag="response.content_part.added"):
    """A message's content part begins."""

    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class ContentPartDone(ResponseEvent, tag="response.content_part.done"):
    """A message's content part is complete."""

    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class OutputTextDelta(ResponseEvent, tag="response.output_text.delta"):
    """More text of a message."""

    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = field(default_factory=list)


class OutputTextDone(ResponseEvent, tag="response.output_text.done"):
    """A message's whole text."""

    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = field(default_factory=list)


class ArgumentsDelta(ResponseEvent, tag="response.function_call_arguments.delta"):
    """More of a function call's arguments."""

    item_id: str
    output_index: int
    delta: str


class ArgumentsDone(ResponseEvent, tag="response.function_call_arguments.done"):
    """A function call's whole arguments."""

    item_id: str
    output_index: int
    name: str
    arguments: str


StreamEvent = (
    ResponseCreated
    | ResponseInProgress
    | ResponseCompleted
    | ResponseIncomplete
    | ResponseFailed
    | ErrorEvent
    | OutputItemAdded
    | OutputItemDone
    | ContentPartAdded
    | ContentPartDone
    | OutputTextDelta
    | OutputTextDone
    | ArgumentsDelta
    | ArgumentsDone
)
