"""``/v1/chat/completions`` wire types."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from gateway.cache.key import CacheOptions
from gateway.openai.protocol.common import (
    Bias,
    FinishReason,
    MaxTokens,
    ModelName,
    Penalty,
    Seed,
    StreamOptions,
    Temperature,
    TopP,
    Usage,
)


class TextPart(Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    """A text part of a message's content array."""

    text: str


class ChatMessage(Struct, forbid_unknown_fields=True):
    """One message of the conversation."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | UnsetType = UNSET

    def text(self) -> str:
        """The message content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


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

    Any field outside this set (``tools``, for one) is refused with a 400 naming it.
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
    """The generated message."""

    role: Literal["assistant"]
    content: str | None
    refusal: None = None


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
