"""The response cache on the request path: lookups for a prepared job, answers from a hit, entries from
finished generations. The policy (what is cacheable, the key) lives in ``gateway.services``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Literal

import msgspec

from auth.principal import Principal
from engine.base import Finished
from gateway.generation import ChoiceFinished, Job, JobOutput
from gateway.protocol.chat import ChatCompletionRequest
from gateway.protocol.completions import CompletionRequest
from gateway.services.cache_key import cache_policy
from gateway.services.cached import CachedChoice, CachedCompletion, ReplayChunk
from gateway.services.response_cache import CacheLookup, ResponseCache

CACHE_HEADER = "x-cache"
REPLAY_MAX_CHUNKS = 16
"""Pieces per choice of a replayed stream."""


def request_view(data: ChatCompletionRequest | CompletionRequest, job: Job) -> dict[str, Any]:
    """The request as plain data for the cache key, with the gateway's own defaults filled in.

    ``max_tokens`` becomes the budget really used (so a chat ``max_completion_tokens`` and the same
    ``max_tokens`` share an entry, and a change of the default in settings changes the key).
    """
    view: dict[str, Any] = msgspec.to_builtins(data)
    view.pop("max_completion_tokens", None)
    view["max_tokens"] = job.params.max_tokens
    return view


async def lookup(
    cache: ResponseCache,
    principal: Principal,
    job: Job,
    data: ChatCompletionRequest | CompletionRequest,
    cache_control: Iterable[str],
) -> CacheLookup:
    """Look a prepared request up (``x-cache`` comes from the outcome).

    Args:
        cache: the response cache.
        principal: the caller (the tenant is their user).
        job: the validated job (its model and its token budget).
        data: the request body.
        cache_control: the ``Cache-Control`` request header values.
    """
    body = msgspec.to_builtins(data.cache) if data.cache is not None else None
    return await cache.lookup(
        user=principal.user_id,
        model_id=job.runtime.id,
        model_digest=job.runtime.digest,
        request=request_view(data, job),
        policy=cache_policy(list(cache_control), body),
    )


def completion_from_output(
    kind: Literal["chat.completion", "text_completion"],
    job: Job,
    output: JobOutput,
    created: int,
    logprobs: Sequence[dict[str, Any] | None],
) -> CachedCompletion:
    """The cache entry of a finished non-streaming response.

    Args:
        kind: which endpoint produced it.
        job: the job that ran.
        output: its output (completion texts include an echoed prompt, which is stripped here).
        created: the response's ``created``.
        logprobs: per choice, the logprobs as sent on the wire (plain data) or ``None``.
    """
    choices = []
    for choice, choice_logprobs in zip(output.choices, logprobs, strict=True):
        echo = job.echo_texts[choice.index // job.n] if job.echo_texts else ""
        choices.append(
            CachedChoice(
                index=choice.index,
                text=choice.text[len(echo) :],
                finish_reason=choice.finish_reason,
                logprobs=choice_logprobs,
            )
        )
    return CachedCompletion(
        object=kind,
        model=job.runtime.id,
        created=created,
        choices=choices,
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
    )


async def replay(value: CachedCompletion) -> AsyncIterator[ReplayChunk | ChoiceFinished]:
    """A cached answer as stream events: several text pieces per choice, then its finish.

    The whole completion-token count goes on the last choice's finish (the sum is what usage shows).
    """
    chunks = value.chunks(REPLAY_MAX_CHUNKS)
    last_index = max((c.index for c in value.choices), default=0)
    for chunk in chunks:
        yield chunk
        if chunk.finish_reason is not None:
            tokens = value.completion_tokens if chunk.index == last_index else 0
            finished = Finished(chunk.finish_reason, value.prompt_tokens, tokens)  # type: ignore[arg-type]
            yield ChoiceFinished(chunk.index, finished)


class StreamRecorder:
    """Collects what a stream sent, per choice, to store it once the stream has finished."""

    def __init__(self, kind: Literal["chat.completion", "text_completion"], job: Job, created: int) -> None:
        self.kind = kind
        self.job = job
        self.created = created
        self.texts: dict[int, list[str]] = {}
        self.logprobs: dict[int, list[dict[str, Any]]] = {}
        self.finishes: dict[int, str] = {}
        self.completion_tokens = 0
        self.generated = 0
        """Tokens sampled so far (the usage of a stream that ends early)."""

    def text(self, index: int, text: str, logprobs: Any = None) -> None:
        """A piece of choice ``index`` and its logprobs (a wire Struct) if requested."""
        self.texts.setdefault(index, []).append(text)
        if logprobs is not None:
            self.logprobs.setdefault(index, []).append(msgspec.to_builtins(logprobs))

    def finish(self, index: int, event: Finished) -> None:
        """Choice ``index`` ended."""
        self.finishes[index] = event.finish_reason
        self.completion_tokens += event.completion_tokens

    @property
    def used_tokens(self) -> int:
        """Prompt plus completion tokens spent so far."""
        return self.job.prompt_tokens + max(self.completion_tokens, self.generated)

    def completion(self) -> CachedCompletion | None:
        """The entry, or ``None`` unless every choice finished."""
        if len(self.finishes) != self.job.choices:
            return None
        choices = [
            CachedChoice(
                index=index,
                text="".join(self.texts.get(index, [])),
                finish_reason=self.finishes[index],
                logprobs=_merge_logprobs(self.logprobs[index]) if index in self.logprobs else None,
            )
            for index in range(self.job.choices)
        ]
        return CachedCompletion(
            object=self.kind,
            model=self.job.runtime.id,
            created=self.created,
            choices=choices,
            prompt_tokens=self.job.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )


def _merge_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Join per-chunk logprobs (chat ``{"content": [...]}`` or legacy column lists) into one."""
    merged: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            if isinstance(value, list):
                merged.setdefault(name, []).extend(value)
            else:
                merged.setdefault(name, value)
    return merged
