"""Wire types shared by the OpenAI endpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]


class StreamOptions(Struct, forbid_unknown_fields=True):
    """``stream_options`` of a streaming request."""

    include_usage: bool = False


class PromptTokensDetails(Struct):
    """Breakdown of prompt tokens."""

    cached_tokens: int = 0


class Usage(Struct):
    """Token accounting of one response."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ErrorBody(Struct):
    """The inside of OpenAI's error envelope."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(Struct):
    """``{"error": {...}}``."""

    error: ErrorBody


FinishReason = Literal["stop", "length"]
