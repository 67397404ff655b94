"""``/v1/completions`` wire types."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from gateway.cache.key import CacheOptions
from gateway.openai.protocol.common import (
    Bias,
    FinishReason,
    ModelName,
    Penalty,
    Seed,
    StreamOptions,
    Temperature,
    TopP,
    Usage,
)

Prompt = str | Annotated[list[str | int | list[int]], Meta(min_length=1, max_length=4096)]
"""A string, strings, token ids, or token-id lists (the shapes are checked in ``generation``)."""


class CompletionRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """Request body of ``POST /v1/completions``."""

    model: ModelName
    prompt: Prompt
    max_tokens: Annotated[int, Meta(ge=0)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Meta(ge=1)] | None = None
    best_of: Annotated[int, Meta(ge=1, le=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    echo: bool | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: TopP | None = None
    repeat_penalty: Annotated[float, Meta(ge=0.0, le=10.0)] | None = None
    cache: CacheOptions | None = None


class CompletionLogprobs(Struct):
    """``choices[].logprobs`` of a text completion (the legacy shape)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Struct):
    """One choice of a text completion (also used for streamed chunks)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(Struct):
    """Response body (or one streamed chunk) of a text completion."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str
    usage: Usage | None = None
    object: Literal["text_completion"] = "text_completion"
