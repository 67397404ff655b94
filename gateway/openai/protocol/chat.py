"""``/v1/chat/completions`` wire types."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.cache.key import CacheOptions
from gateway.openai.protocol.common import (
    Bias,
    MaxTokens,
    ModelName,
    Penalty,
    Seed,
    StreamOptions,
    Temperature,
    TopP,
    Usage,
)

FinishReason = Literal["stop", "length", "tool_calls", "function_call"]
"""``function_call`` answers a request made with the legacy ``functions``."""


class TextPart(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    """A text part of a message's content array."""

    text: str


class RefusalPart(Struct, tag="refusal", tag_field="type", forbid_unknown_fields=True):
    """A refusal part of an assistant message's content (read as its text)."""

    refusal: str


class ImagePart(Struct, tag="image_url", tag_field="type"):
    """An image part: accepted by the schema so the refusal can say what is unsupported, in words."""

    image_url: Any = None


class AudioPart(Struct, tag="input_audio", tag_field="type"):
    """An audio part (refused in words, like ``ImagePart``)."""

    input_audio: Any = None


class FilePart(Struct, tag="file", tag_field="type"):
    """A file part (refused in words, like ``ImagePart``)."""

    file: Any = None


ContentPart = TextPart | RefusalPart | ImagePart | AudioPart | FilePart
UNSUPPORTED_PARTS: dict[type[Struct], str] = {ImagePart: "image", AudioPart: "audio", FilePart: "file"}
"""Content parts the models here cannot read, by the name the refusal uses."""

MetadataKey = Annotated[str, Meta(max_length=64)]
MetadataValue = Annotated[str, Meta(max_length=512)]
FunctionName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]


class FunctionCall(Struct, forbid_unknown_fields=True):
    """A call as it appears in a message: ``arguments`` is JSON text."""

    name: str
    arguments: str


class MessageToolCall(Struct, forbid_unknown_fields=True, kw_only=True):
    """``tool_calls[i]`` of an assistant message (in a request or a response)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Struct, forbid_unknown_fields=True, kw_only=True):
    """One message of the conversation.

    Every field of the response message (``refusal``, ``annotations``, ``audio``, ``function_call``,
    ``tool_calls``) is accepted back, so a client can append the answer it got to its history.
    """

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | UnsetType = UNSET
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | UnsetType = UNSET
    function_call: FunctionCall | None = None
    """The legacy single call of an assistant message."""
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any | None = None
    """A reference to an earlier audio answer: only ``null`` is accepted (there is no audio here)."""

    def text(self) -> str:
        """The message content as one string: text (and refusal) parts joined with no separator, as
        OpenAI concatenates a message's text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(
            part.text if isinstance(part, TextPart) else part.refusal
            for part in self.content
            if isinstance(part, TextPart | RefusalPart)
        )


class FunctionDefinition(Struct, forbid_unknown_fields=True, kw_only=True):
    """``tools[i].function``, or an item of the legacy ``functions``."""

    name: FunctionName
    description: str | UnsetType = UNSET
    parameters: dict[str, Any] | UnsetType = UNSET
    """JSON Schema of the arguments; every call's arguments validate against it."""
    strict: bool | None = None


class Tool(Struct, forbid_unknown_fields=True):
    """``tools[i]``."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Struct, forbid_unknown_fields=True):
    """``{"name": ...}`` of a named ``tool_choice`` or a legacy ``function_call``."""

    name: str


class NamedToolChoice(Struct, forbid_unknown_fields=True):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Struct, forbid_unknown_fields=True):
    """``response_format.json_schema``."""

    name: Annotated[str, Meta(min_length=1, max_length=64)]
    schema: dict[str, Any] | UnsetType = UNSET
    description: str | UnsetType = UNSET
    strict: bool | None = None


class ResponseFormat(Struct, forbid_unknown_fields=True):
    """``response_format``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | UnsetType = UNSET


class ChatCompletionRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """Request body of ``POST /v1/chat/completions``.

    Any field outside this set is refused with a 400 naming it. Fields that do not change the output
    (``store``, ``metadata``, ``service_tier``, ``safety_identifier``, ``user``) are accepted and
    ignored; ``prompt_cache_key`` routes the request to the slot that ran the same key last.
    """

    model: ModelName
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Meta(ge=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    # llama.cpp sampling extensions (as llama-server and llama-cpp-python's server accept them)
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: TopP | None = None
    repeat_penalty: Annotated[float, Meta(ge=0.0, le=10.0)] | None = None
    cache: CacheOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[FunctionDefinition], Meta(min_length=1)] | None = None
    """Legacy: the same as ``tools`` of type ``function``."""
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    """Legacy: the same as ``tool_choice``."""
    store: bool | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=16)] | None = None
    service_tier: Annotated[str, Meta(max_length=32)] | None = None
    safety_identifier: Annotated[str, Meta(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    reasoning_effort: Annotated[str, Meta(max_length=32)] | None = None
    """Only ``null``: the models here do not reason (OpenAI refuses it for such models too)."""
    modalities: list[Literal["text", "audio"]] | None = None
    prediction: Any | None = None
    audio: Any | None = None


class TopLogprobEntry(Struct):
    """An alternative token in ``logprobs.content[].top_logprobs``."""

    token: str
    logprob: float
    bytes: list[int] | None


class LogprobEntry(Struct):
    """One sampled token in ``logprobs.content``."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobEntry]


class ChoiceLogprobs(Struct):
    """``choices[].logprobs`` of a chat response."""

    content: list[LogprobEntry] | None


class AssistantMessage(Struct):
    """The generated message (``content`` is ``null`` when it holds only tool calls)."""

    role: Literal["assistant"]
    content: str | None
    refusal: None = None
    tool_calls: list[MessageToolCall] | UnsetType = UNSET
    function_call: FunctionCall | UnsetType = UNSET
    """The call, for a request made with the legacy ``functions``."""


class ToolCallFunctionDelta(Struct, omit_defaults=True):
    """``delta.tool_calls[i].function``: the name on the call's first delta, then argument fragments."""

    arguments: str
    name: str | UnsetType = UNSET


class ToolCallDelta(Struct, omit_defaults=True):
    """``delta.tool_calls[i]``: ``index``, ``id``, ``type`` and the name on a call's first delta only."""

    index: int
    function: ToolCallFunctionDelta
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET


class ChatChoice(Struct):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(Struct):
    """Response body of a non-streaming chat completion."""

    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str
    object: Literal["chat.completion"] = "chat.completion"


class ChoiceDelta(Struct, omit_defaults=True):
    """The delta of a streamed chunk (absent fields are omitted)."""

    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET
    function_call: ToolCallFunctionDelta | UnsetType = UNSET


class ChunkChoice(Struct):
    """One choice of a streamed chunk; ``finish_reason`` is ``null`` until the last content chunk."""

    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Struct):
    """One SSE ``data:`` payload of a streaming chat completion."""

    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
