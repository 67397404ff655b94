"""``/v1/embeddings`` wire types."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from gateway.openai.protocol.common import ModelName

EmbeddingInput = str | Annotated[list[str | int | list[int]], Meta(min_length=1, max_length=4096)]
"""A string, a list of strings, a list of token ids, or a list of token-id lists."""


class EmbeddingRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """Request body of ``POST /v1/embeddings``."""

    model: ModelName
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None


class Embedding(Struct):
    """One embedding (``embedding`` is a list of floats, or base64 of little-endian float32)."""

    index: int
    embedding: list[float] | str
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(Struct):
    """Token accounting of an embeddings response."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Struct):
    """Response body of ``POST /v1/embeddings``."""

    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"
