"""From a prepared chat or text completion job to its response: rate limit -> response cache -> engine.

The routes build the job and say how to turn engine output or a cached answer into their wire types;
this module runs the stages in order and makes sure the rate-limit ticket is always released.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol, TypeVar

from litestar import Request, Response
from litestar.datastructures import State

from auth.principal import Principal
from gateway import caching
from gateway.caching import CACHE_HEADER, StreamRecorder
from gateway.errors import GatewayError
from gateway.generation import (
    ChoiceFinished,
    ChoiceToken,
    Job,
    JobOutput,
    reserve,
    run_choices,
    run_to_completion,
)
from gateway.protocol.chat import ChatCompletionRequest
from gateway.protocol.completions import CompletionRequest
from gateway.quotas import admit
from gateway.services.backends import Services
from gateway.services.cached import CachedCompletion, ReplayChunk
from gateway.settings import Settings
from gateway.streaming import EventStream, event_stream, replay_stream
from telemetry.requests import SPAN_CACHE, current_request

T = TypeVar("T")

Events = AsyncIterator[ChoiceToken | ChoiceFinished | ReplayChunk]
"""What SSE frames are made of: the engine's events, or a cached answer's replay."""


class FrameSource(Protocol):
    """The route's SSE frame builder, as far as this module uses it."""

    kind: Literal["chat.completion", "text_completion"]
    created: int
    recorder: StreamRecorder
    store: Callable[[CachedCompletion], Awaitable[Any]] | None


@dataclass(slots=True)
class Answer:
    """One prepared chat or text completion request, on its way to a response."""

    request: Request[Any, Any, State]
    job: Job
    data: ChatCompletionRequest | CompletionRequest
    principal: Principal
    settings: Settings
    services: Services
    frames: FrameSource
    headers: dict[str, str] = field(default_factory=dict)
    record: Callable[[str], Awaitable[None]] | None = None
    """Records the first choice's text into a chat session (``X-Session-Id``)."""


async def answer(
    a: Answer,
    stream_frames: Callable[[Events], AsyncIterator[bytes]],
    from_output: Callable[[JobOutput], tuple[Any, list[dict[str, Any] | None]]],
    from_cache: Callable[[CachedCompletion], Any],
) -> Response[Any] | EventStream:
    """Rate limit -> cache lookup -> engine (or the cached answer) -> JSON or SSE.

    Args:
        a: the request.
        stream_frames: turns events into SSE frames (``_Frames.chat`` or ``.completion``).
        from_output: the JSON body of a finished job, and each choice's wire logprobs (for the cache).
        from_cache: the JSON body of a cached answer.

    The rate-limit ticket is released with the real usage when the response ends, fails, or its client
    goes away (a stream releases it when the stream ends). A cache hit charges no tokens.
    """
    job = a.job
    store = a.request.app.state.authenticator.store
    reserved = job.prompt_tokens + job.params.max_tokens * job.choices
    admission = await admit(a.services, a.settings.ratelimit, store, a.principal, tokens=reserved)
    used, handed_off = 0, False
    try:
        cache_control = a.request.headers.getall("cache-control", [])
        with current_request().stage(SPAN_CACHE):
            found = await caching.lookup(a.services.cache, a.principal, job, a.data, cache_control)
        current_request().cache(found.outcome.value)
        headers = {**a.headers, **admission.headers, CACHE_HEADER: found.outcome.value}
        if found.value is not None:
            if a.data.stream:
                body = replay_stream(stream_frames(caching.replay(found.value)))
                handed_off = True
                return EventStream(admission.releasing(body, lambda: 0), headers)
            if a.record is not None:
                await a.record(found.value.choices[0].text)
            return Response(from_cache(found.value), headers=headers)
        if found.key is not None:
            a.frames.store = partial(a.services.cache.store, found)
        reservation = reserve(job)
        if a.data.stream:
            body = event_stream(
                reservation,
                a.settings.queue.ping_interval_s,
                lambda slot: stream_frames(run_choices(job, slot)),
            )
            handed_off = True
            return EventStream(admission.releasing(body, lambda: a.frames.recorder.used_tokens), headers)
        used = job.prompt_tokens  # charged if it fails or its client goes away
        output: JobOutput = await until_disconnect(a.request, run_to_completion(job, reservation))
        used = output.prompt_tokens + output.completion_tokens
        response, logprobs = from_output(output)
        if found.key is not None:
            kind = a.frames.kind
            entry = caching.completion_from_output(kind, job, output, a.frames.created, logprobs)
            await a.services.cache.store(found, entry)
        if a.record is not None:
            await a.record(output.choices[0].text)
        return Response(response, headers=headers)
    finally:
        if not handed_off:
            await admission.release(used)


async def until_disconnect(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Run ``work`` but cancel it (freeing its slot) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # let the cancellation run (the slot is given back) before the caller releases its limits
            await asyncio.wait({task})
    if task.cancelled():
        raise ClientDisconnectedError("the client closed the connection before the response was ready")
    return task.result()


class ClientDisconnectedError(GatewayError):
    """499 (nginx's "client closed request"): the answer has nobody to go to; nothing is logged."""

    status_code = 499
    error_type = "invalid_request_error"
    default_code = "client_closed_request"
