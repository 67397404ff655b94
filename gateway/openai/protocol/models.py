"""``/v1/models`` wire types."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct


class ModelObject(Struct):
    """One model as OpenAI lists it."""

    id: str
    created: int
    owned_by: str
    object: Literal["model"] = "model"


class ModelList(Struct):
    """Response body of ``GET /v1/models``."""

    data: list[ModelObject]
    object: Literal["list"] = "list"
