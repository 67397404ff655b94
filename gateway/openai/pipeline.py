"""The one path of every request that generates text: rate limit -> response cache -> engine -> pieces.

``/v1/chat/completions``, ``/v1/completions``, ``POST /chat`` and ``/chat/ws`` all run through here:

1. ``Pipeline.start(call)``: the cache lookup (keyed on the request as sent: no template, no tokenizer);
   on a hit, admission (429) and nothing else; on a miss, the job is prepared (template, tokenize,
   checks), admitted with its tokens reserved (429), and given a slot or a place in the model's queue
   (503 when neither). Nothing is held when it raises.
2. ``Run.events()``: pings while the request waits for its slot, ``BEGIN`` when the answer starts, then a
   ``Piece`` per step (from the engine, or replayed from the cache). When the last choice finishes, the
   answer is stored in the cache and given to ``call.on_answer`` (chat sessions) *before* that piece is
   yielded, so a client that reads the end finds the history written.
3. ``Run.answer()``: the same events, collected into the finished answer (the JSON routes).

However the run ends (finished, failed, cancelled because the client left), its slot and its rate-limit
ticket are given back, with the tokens it really used.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response

from auth.principal import Principal
from auth.store import IdentityStore
from engine.base import Finished
from engine.pool import Reservation
from engine.tools import ArgumentsDelta, ContentDelta, ToolCallParser, ToolCallStart, new_call_id
from gateway.cache.entry import CachedChoice, CachedCompletion, ReplayChunk
from gateway.cache.key import cache_policy
from gateway.cache.service import CacheLookup, ResponseCache
from gateway.errors import ClientDisconnectedError, InternalError, as_gateway_error
from gateway.openai.frames import Frames, Logprobs, Piece, usage_of
from gateway.openai.generation import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    AnyJob,
    ChoiceDelta,
    ChoiceEnd,
    ChoiceFinished,
    ChoiceToken,
    ChoiceWaiting,
    EmbeddingJob,
    Job,
    Shape,
    UpstreamEmbeddingJob,
    UpstreamJob,
    reserve,
    run_choices,
    run_upstream,
)
from gateway.openai.protocol.chat import ChatCompletionRequest
from gateway.openai.protocol.common import Usage
from gateway.openai.protocol.completions import CompletionRequest
from gateway.openai.responses.protocol import ResponseRequest
from gateway.ratelimit.admission import Admission, LimitOverrides, admit
from gateway.ratelimit.limiter import RateLimiter
from gateway.settings import LimitsSettings, Settings
from gateway.sse import PING, EventStream
from telemetry.requests import SPAN_CACHE, current_request

T = TypeVar("T")
logger = logging.getLogger("pocketllm.api")

CACHE_HEADER = "x-cache"
EMBEDDING_TURN_TOKENS = 128
"""Input tokens of one turn on an embedding context (an input longer than this is a turn of its own):
short, because llama.cpp's embedding context costs about as much per sequence as per token here."""
REPLAY_MAX_CHUNKS = 16
"""Pieces per choice of an answer replayed from the cache."""


class Signal(enum.Enum):
    """Events of a run that are not pieces of the answer."""

    PING = "ping"
    """Still waiting for a slot (sent every ``queue.ping_interval_s``)."""
    BEGIN = "begin"
    """The answer starts (a slot was taken, or the cache had it)."""


Event = Piece | Signal
Item = ChoiceToken | ChoiceFinished | ReplayChunk | ChoiceDelta | ChoiceEnd | ChoiceWaiting
GenerationRequest = ChatCompletionRequest | CompletionRequest | ResponseRequest


@dataclass(slots=True)
class Call:
    """One request on its way in: what was sent, who asks, how its answer is shown, how to prepare it."""

    request: GenerationRequest
    principal: Principal
    frames: Frames
    """The answer's wire shape; its ``shape`` is what the answer looks like."""
    prepare: Callable[[], Awaitable[AnyJob]]
    """Renders, tokenizes and checks the request: called on a cache miss only."""
    cache_control: Sequence[str] = ()
    on_answer: Callable[[CachedCompletion], Awaitable[None]] | None = None
    """Called with the finished answer (not when it failed or was cancelled); records chat sessions."""


class Pipeline:
    """The stages every generating request passes, with the services they use (one per app)."""

    def __init__(
        self, settings: Settings, limiter: RateLimiter, cache: ResponseCache, store: IdentityStore
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.cache = cache
        self.store = store
        self.overrides = LimitOverrides(store)

    async def start(self, call: Call) -> Run:
        """Look the call up in the cache; on a hit admit it (no tokens); on a miss prepare its job
        (template, tokenize, checks), admit it with prompt + max_tokens reserved, and reserve its slot.

        A hit needs neither the template nor the tokenizer: its key is made from the request as sent.

        Raises:
            RateLimitExceededError: over a limit (429).
            QueueFullError: every slot is busy and the queue is full (503 at the edge).
        """
        shape = call.frames.shape
        with current_request().stage(SPAN_CACHE):
            found = await self.cache.lookup(
                user=call.principal.user_id,
                model_id=shape.runtime.id,
                model_digest=shape.runtime.digest,
                request=_key_view(call.request, shape, self.settings.limits),
                policy=cache_policy(call.cache_control, call.request.cache),
                counted=False,
            )
        if found.value is not None:
            admission = await self._admit(call, 0)
            self._counted(found)
            return Run(call, self, admission, found, None, None)
        job = await call.prepare()
        admission = await self._admit(call, job.reserved_tokens)
        reservation = None
        if isinstance(job, Job):  # an upstream job's replica is chosen when it runs
            try:
                reservation = reserve(job)
            except BaseException:
                await admission.release(0)
                raise
        self._counted(found)
        return Run(call, self, admission, found, job, reservation)

    def _counted(self, found: CacheLookup) -> None:
        """An admitted request's cache outcome (a refused or invalid one is nobody's lookup)."""
        self.cache.count(found.outcome, found.tier)
        current_request().cache(found.outcome.value, found.tier)

    async def _admit(self, call: Call, tokens: int) -> Admission:
        return await admit(
            self.limiter, self.settings.ratelimit, self.overrides, call.principal, tokens=tokens
        )

    async def embed(
        self, job: EmbeddingJob | UpstreamEmbeddingJob, principal: Principal
    ) -> tuple[list[list[float]], int]:
        """Admission (RPM, TPM by input tokens, concurrency), then the inputs in turns on the model's
        embedding context: each turn waits at the back of the embedding pool's FIFO queue, so a large
        request cannot hold others back for longer than a turn. Only the first turn can be refused (503
        when the queue is full or after ``queue.max_wait_s``); the later ones are continuations, so a
        request that has started is never refused with the work of its earlier turns thrown away.
        Cancelling it (the client left) stops it before its next turn.

        Returns:
            One vector per input, and the tokens they used.
        """
        admission = await admit(
            self.limiter, self.settings.ratelimit, self.overrides, principal, tokens=job.total_tokens
        )
        if isinstance(job, UpstreamEmbeddingJob):
            used = 0
            try:
                got, reported = await job.upstream.embed(job.texts)
                used = reported if reported is not None else job.total_tokens
            finally:
                await admission.release(used)
            return got, used
        vectors: list[list[float]] = []
        used = 0
        try:
            for number, turn in enumerate(job.turns(EMBEDDING_TURN_TOKENS)):
                reservation = job.pool.reserve(continuation=number > 0)
                try:
                    await reservation.wait()
                    got, count = await job.engine.embed([job.texts[index] for index in turn])
                finally:
                    reservation.release()
                vectors += got
                used += count
        finally:
            await admission.release(used)
        return vectors, used


_NOT_IN_KEY = ("store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key")
"""Request fields that change nothing in the answer: requests differing only in them share an entry."""


def _key_view(request: GenerationRequest, shape: Shape, limits: LimitsSettings) -> dict[str, Any]:
    """The request as plain data for the cache key, made without tokenizing.

    A chat ``max_completion_tokens`` and the same ``max_tokens`` share an entry. Without either, the
    budget is the default capped by the context left after the prompt: the same request always gets
    the same one, unless the default or the context per slot changes, so both are part of the key.
    """
    view: dict[str, Any] = msgspec.to_builtins(request)
    for name in _NOT_IN_KEY:
        view.pop(name, None)
    requested = view.pop("max_completion_tokens", None) or view.get("max_tokens")
    view["max_tokens"] = requested
    if requested is None:
        default = (
            limits.max_tokens_default
            if shape.prompts == 1 and not isinstance(request, CompletionRequest)
            else COMPLETIONS_DEFAULT_MAX_TOKENS
        )
        view["budget"] = [default, shape.runtime.n_ctx_per_slot]
    return view


class Run:
    """An admitted call on its way to its answer. Consume ``events()`` or ``answer()`` exactly once."""

    def __init__(
        self,
        call: Call,
        pipeline: Pipeline,
        admission: Admission,
        found: CacheLookup,
        job: AnyJob | None,
        reservation: Reservation | None,
    ) -> None:
        self.call = call
        self.job = job
        """What the engine runs (``None`` for a cache hit)."""
        self._pipeline = pipeline
        self._admission = admission
        self._found = found
        self._reservation = reservation
        self.headers = {**admission.headers, CACHE_HEADER: found.outcome.value}
        """``x-cache`` and ``x-ratelimit-*`` for the response."""
        self._choices = call.frames.shape.choices
        self._prompt_tokens = found.value.prompt_tokens if found.value is not None else 0
        if job is not None:
            self._prompt_tokens = job.prompt_tokens
        self._texts: dict[int, list[str]] = {}
        self._logprobs: dict[int, list[dict[str, Any]]] = {}
        self._offsets = {index: len(call.frames.echo(index)) for index in range(self._choices)}
        self._finishes: dict[int, str] = {}
        self._calls: dict[int, list[dict[str, Any]]] = {}
        """Each choice's tool calls in OpenAI's wire shape (arguments grow as they stream)."""
        self._parsers: dict[int, ToolCallParser] = {}
        self._primed: AsyncGenerator[Item] | None = None
        if isinstance(job, Job) and job.shape.tool_calls:
            self._parsers = {index: ToolCallParser() for index in range(self._choices)}
        self._completion_tokens = 0
        self._cached_tokens = 0
        self._generated = 0
        """Tokens sampled so far (what a run that ends early has used)."""

    @property
    def upstream(self) -> bool:
        """Whether an upstream model answers (not the cache, not a local engine)."""
        return isinstance(self.job, UpstreamJob)

    @property
    def hit(self) -> bool:
        """Whether the answer comes from the response cache."""
        return self._found.value is not None

    @property
    def used_tokens(self) -> int:
        """What the rate limits are charged: prompt plus completion tokens (nothing for a cache hit)."""
        if self.hit:
            return 0
        return self._prompt_tokens + max(self._completion_tokens, self._generated)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV was reused rather than computed."""
        return self._cached_tokens

    @property
    def usage(self) -> Usage:
        """The answer's usage so far."""
        return usage_of(self._prompt_tokens, self._completion_tokens, self._cached_tokens)

    async def events(self, ping_interval_s: float | None = None) -> AsyncGenerator[Event]:
        """The answer as it is made; see the module docstring."""
        interval = ping_interval_s or self._pipeline.settings.queue.ping_interval_s
        source: AsyncGenerator[Item] | None = None
        try:
            if self._found.value is not None:
                source = _replay(self._found.value)
            elif isinstance(self.job, UpstreamJob):
                source = self._primed or run_upstream(self.job, interval)
                # pings while the request waits for room on a replica, as while queued for a slot
                first = await anext(source, None)
                while isinstance(first, ChoiceWaiting):
                    yield Signal.PING
                    first = await anext(source, None)
                source = _prepend(first, source)
            else:
                assert self._reservation is not None
                assert self.job is not None
                waiter = asyncio.ensure_future(self._reservation.wait())
                try:
                    while not (await asyncio.wait({waiter}, timeout=interval))[0]:
                        yield Signal.PING
                finally:
                    if not waiter.done():
                        waiter.cancel()
                source = run_choices(self.job, waiter.result())
            yield Signal.BEGIN
            async for item in source:
                if isinstance(item, ChoiceWaiting):  # a later choice (n > 1) waits for room
                    yield Signal.PING
                    continue
                piece = self._collect(item)
                if piece is None:
                    continue
                if piece.finish_reason is not None and len(self._finishes) == self._choices:
                    await self._finished()
                    piece = replace(piece, usage=self.usage)
                yield piece
        finally:
            if source is not None:
                await source.aclose()  # stops the engine at once when the consumer left early
            if self._reservation is not None:
                self._reservation.release()
            await self._admission.release(self.used_tokens)

    async def prime(self) -> None:
        """An upstream job: open its upstream stream and wait for the first event before any response
        header is sent, so a request that no replica takes gets its own status (502, 504, 429 with
        ``Retry-After``) rather than an error frame in a 200 stream. Nothing for other runs.

        Except when every replica is at its concurrency limit: then the headers go out after one ping
        interval, and the stream sends pings while the request waits for room (as a local model's queue
        does); a failure after that wait is an error frame.

        On failure (or cancellation: the client left) everything ``start`` took is given back.
        """
        if not isinstance(self.job, UpstreamJob) or self._primed is not None:
            return
        source = run_upstream(self.job, self._pipeline.settings.queue.ping_interval_s)
        try:
            first = await anext(source)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await source.aclose()
            await self._admission.release(0)
            raise
        self._primed = _prepend(first, source)

    async def answer(self) -> CachedCompletion:
        """Run to the end and return the finished answer (choices in index order)."""
        if self._found.value is not None:  # a cached answer needs no replay to be whole
            try:
                if self.call.on_answer is not None:
                    await self.call.on_answer(self._found.value)
            finally:
                await self._admission.release(0)
            return self._found.value
        async with aclosing(self.events()) as events:
            async for _ in events:
                pass
        return self._completion()

    async def close(self) -> None:
        """Give back what ``start`` took, for a run whose events will never be consumed."""
        if self._primed is not None:
            await self._primed.aclose()
        if self._reservation is not None:
            self._reservation.release()
        await self._admission.release(0)

    def _collect(self, item: Item) -> Piece | None:
        frames = self.call.frames
        if isinstance(item, ChoiceWaiting):
            return None
        if isinstance(item, ChoiceDelta):  # an upstream chunk: its text and call fragments as they are
            self._generated += 1  # about a token per chunk: what a stream that breaks off is charged
            if item.tool_calls:
                return self._tool_piece(item.index, item.text, None, item.tool_calls)
            return self._text_piece(item.index, item.text, None)
        if isinstance(item, ChoiceEnd):
            self._completion_tokens += item.completion_tokens
            self._prompt_tokens += item.prompt_correction  # the upstream's count replaces the estimate
            self._cached_tokens = max(self._cached_tokens, item.cached_tokens)
            reason = item.finish_reason
            if reason == "tool_calls" and frames.shape.legacy_functions:
                reason = "function_call"
            self._finishes[item.index] = reason
            return Piece(item.index, finish_reason=reason)
        parser = self._parsers.get(item.index)
        if isinstance(item, ChoiceFinished):
            self._completion_tokens += item.event.completion_tokens
            self._cached_tokens = max(self._cached_tokens, item.event.cached_tokens)
            finish_reason: str = item.event.finish_reason
            piece = Piece(item.index)
            if parser is not None:
                deltas, output = parser.finish(item.event.finish_reason)
                piece = self._tool_piece(item.index, "", None, deltas)
                finish_reason = output.finish_reason
                if finish_reason == "tool_calls" and frames.shape.legacy_functions:
                    finish_reason = "function_call"
            self._finishes[item.index] = finish_reason
            return replace(piece, finish_reason=finish_reason)
        if isinstance(item, ReplayChunk):
            text, logprobs = item.text, frames.stored_logprobs(item.logprobs)
            calls = item.tool_calls or ()
            replayed: list[ToolCallStart | ArgumentsDelta] = []
            for number, call in enumerate(calls):  # each call whole, under a new id
                function = call["function"]
                replayed += [ToolCallStart(number, new_call_id(), function["name"])]
                replayed += [ArgumentsDelta(number, function["arguments"])]
            return self._tool_piece(item.index, text, logprobs, replayed)
        event, text, logprobs = item.event, item.event.text, None
        if event.token_id >= 0:
            self._generated += 1
            if frames.shape.logprobs:
                logprobs = frames.token_logprobs(event, self._offsets[item.index])
        if parser is not None:
            return self._tool_piece(item.index, "", logprobs, parser.feed(text))
        return self._text_piece(item.index, text, logprobs)

    def _text_piece(self, index: int, text: str, logprobs: Logprobs | None) -> Piece:
        self._offsets[index] += len(text)
        self._texts.setdefault(index, []).append(text)
        if logprobs is not None:
            self._logprobs.setdefault(index, []).append(msgspec.to_builtins(logprobs))
        return Piece(index, text, logprobs)

    def _tool_piece(
        self,
        index: int,
        text: str,
        logprobs: Logprobs | None,
        deltas: Sequence[ContentDelta | ToolCallStart | ArgumentsDelta],
    ) -> Piece:
        """A piece of reply text and call deltas; the calls are kept in their wire shape as they grow."""
        text += "".join(delta.text for delta in deltas if isinstance(delta, ContentDelta))
        calls = self._calls.setdefault(index, [])
        tool_deltas = tuple(delta for delta in deltas if not isinstance(delta, ContentDelta))
        for delta in tool_deltas:
            if isinstance(delta, ToolCallStart):
                function = {"name": delta.name, "arguments": ""}
                calls.append({"id": delta.id, "type": "function", "function": function})
            else:
                calls[delta.index]["function"]["arguments"] += delta.text
        return replace(self._text_piece(index, text, logprobs), tool_calls=tool_deltas)

    def _completion(self) -> CachedCompletion:
        return CachedCompletion(
            choices=[
                CachedChoice(
                    index=index,
                    text="".join(self._texts.get(index, [])),
                    finish_reason=self._finishes[index],
                    logprobs=_merge_logprobs(self._logprobs[index]) if index in self._logprobs else None,
                    tool_calls=self._calls.get(index) or None,
                )
                for index in range(self._choices)
            ],
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
        )

    async def _finished(self) -> None:
        """Every choice finished: keep the answer (cache) and hand it on (chat sessions)."""
        completion = self._completion()
        if self._found.key is not None:
            await self._pipeline.cache.store(self._found, completion)
        if self.call.on_answer is not None:
            await self.call.on_answer(completion)


async def respond(request: Request[Any, Any, Any], run: Run, *, stream: bool) -> Response[Any] | EventStream:
    """The HTTP response of a run: SSE frames as they are made, or the JSON body once it is finished
    (cancelled, with its slot freed, if the client goes away first)."""
    frames = run.call.frames
    if stream:
        if run.upstream:  # the first upstream event before any header (see Run.prime)
            await until_disconnect(request, run.prime())
        return EventStream(stream_frames(run), run.headers)
    if run.hit:  # already whole: nothing to cancel if the client leaves, no watcher task to pay for
        answer = await run.answer()
    else:
        answer = await until_disconnect(request, run.answer())
    return Response(frames.body(answer, run.cached_tokens), headers=run.headers)


async def stream_frames(run: Run) -> AsyncIterator[bytes]:
    """A run's events as SSE frames, then ``[DONE]``; a failure becomes a ``data: {"error": ...}`` frame
    that ends the stream (engine and identity errors mapped by ``gateway.errors``; anything else is a bug:
    logged with its traceback, and the client gets an ``internal_error`` frame, never the traceback)."""
    frames = run.call.frames
    try:
        async with aclosing(run.events()) as events:
            async for event in events:
                if event is Signal.PING:
                    yield PING
                elif event is Signal.BEGIN:
                    for chunk in frames.head():
                        yield chunk
                else:
                    data = frames.chunk(event)
                    if data is not None:
                        yield data
        for chunk in frames.tail(run.usage):
            yield chunk
        if frames.done is not None:
            yield frames.done
    except Exception as exc:
        error = as_gateway_error(exc)
        if error is None:
            logger.exception("a stream failed")
            error = InternalError("internal server error")
        current_request().failed(error.code or error.error_type)
        yield frames.error(error)


async def _prepend(first: Item | None, rest: AsyncGenerator[Item]) -> AsyncGenerator[Item]:
    """``first`` (already taken from ``rest``), then the rest; closing this closes ``rest``."""
    try:
        if first is not None:
            yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def _replay(value: CachedCompletion) -> AsyncGenerator[ReplayChunk | ChoiceFinished]:
    """A cached answer as stream events: several text pieces per choice, then its finish.

    The whole completion-token count goes on the last choice's finish (the sum is what usage shows).
    """
    last_index = max((c.index for c in value.choices), default=0)
    for chunk in value.chunks(REPLAY_MAX_CHUNKS):
        yield chunk
        if chunk.finish_reason is not None:
            tokens = value.completion_tokens if chunk.index == last_index else 0
            finished = Finished(chunk.finish_reason, value.prompt_tokens, tokens)  # type: ignore[arg-type]
            yield ChoiceFinished(chunk.index, finished)


def _merge_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Join per-piece logprobs (chat ``{"content": [...]}`` or legacy column lists) into one."""
    merged: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            if isinstance(value, list):
                merged.setdefault(name, []).extend(value)
            else:
                merged.setdefault(name, value)
    return merged


async def until_disconnect(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Run ``work`` but cancel it (freeing its slot) if the client goes away first (499)."""

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return await until_gone(disconnected(), work)


async def until_gone(gone: Awaitable[object], work: Awaitable[T]) -> T:
    """Run ``work`` but cancel it (freeing its slot) if ``gone`` (the client left: an HTTP disconnect, a
    closed WebSocket) completes first; then ``ClientDisconnectedError`` (499)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(gone)
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # let the cancellation run (the slot is given back) before the caller goes on
            await asyncio.wait({task})
    if task.cancelled():
        raise ClientDisconnectedError("the client closed the connection before the response was ready")
    return task.result()
