"""Shapes and jobs of a model that is never loaded: what the frame builders and the pipeline need in unit
tests (no engine runs them)."""

from __future__ import annotations

from pathlib import Path

from engine.base import GenerationParams
from engine.config import ModelSettings
from engine.models import ModelRuntime
from engine.pool import SlotPool
from gateway.openai.generation import Job, Shape


def shape(*, n: int = 1, prompts: int = 1, logprobs: bool = False, echo: list[str] | None = None) -> Shape:
    runtime = ModelRuntime(ModelSettings(id="m"), Path("/nonexistent.gguf"), digest="abcdef0123456789")
    return Shape(runtime, prompts, n, logprobs, tuple(echo or ()))


def job(*, n: int = 1, prompts: int = 1, logprobs: bool = False, echo: list[str] | None = None) -> Job:
    params = GenerationParams(max_tokens=8, logprobs=logprobs, top_logprobs=1 if logprobs else 0)
    pool = SlotPool("m", 1, max_queue=0, max_wait_s=1.0)
    the_shape = shape(n=n, prompts=prompts, logprobs=logprobs, echo=echo)
    return Job(the_shape, None, pool, [[1, 2, 3]] * prompts, params)  # type: ignore[arg-type]
