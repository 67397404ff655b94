"""The OpenAI API: thin controllers over ``gateway.generation``."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from auth.principal import Principal
from engine.base import EngineError, TokenEvent
from gateway.errors import (
    InvalidRequestError,
    NotFoundError,
    from_engine_error,
)
from gateway.generation import (
    ChoiceFinished,
    ChoiceToken,
    Job,
    JobOutput,
    check_token_ids,
    prepare_chat,
    prepare_completion,
    reserve,
    run_choices,
    run_to_completion,
    split_inputs,
    tokenize_checked,
)
from gateway.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    LogprobEntry,
    TopLogprobEntry,
)
from gateway.protocol.common import PromptTokensDetails, Usage
from gateway.protocol.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from gateway.protocol.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from gateway.protocol.models import ModelList, ModelObject
from gateway.runtime import ModelManager, ModelRuntime
from gateway.security import check_model_access, requires_inference
from gateway.sessions import session_for_recording, title_from
from gateway.settings import Settings
from gateway.streaming import EventStream, event_stream, frame

T = TypeVar("T")
logger = logging.getLogger("pocketllm.api")


def _usage(prompt: int, completion: int, cached: int) -> Usage:
    return Usage(prompt, completion, prompt + completion, PromptTokensDetails(cached))


def _fingerprint(job: Job) -> str:
    return f"fp_{job.runtime.digest[:10]}"


def _chat_logprobs(events: list[TokenEvent]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        [
            LogprobEntry(
                token=e.piece.decode("utf-8", errors="replace"),
                logprob=e.logprob if e.logprob is not None else 0.0,
                bytes=list(e.piece),
                top_logprobs=[TopLogprobEntry(t.token, t.logprob, t.bytes) for t in e.top_logprobs],
            )
            for e in events
        ]
    )


def _completion_logprobs(events: list[TokenEvent], offset: int) -> CompletionLogprobs:
    tokens, logprobs, tops, offsets = [], [], [], []
    for e in events:
        text = e.piece.decode("utf-8", errors="replace")
        tokens.append(text)
        logprobs.append(e.logprob)
        tops.append({t.token: t.logprob for t in e.top_logprobs} if e.top_logprobs else None)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens, logprobs, tops, offsets)


async def _until_disconnect(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
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
    return task.result()


class OpenAIController(Controller):
    """``/v1`` routes."""

    path = "/v1"
    tags = ["OpenAI"]
    guards = [requires_inference]

    @get("/models", summary="List models")
    async def list_models(self, models: NamedDependency[ModelManager]) -> ModelList:
        """Every served model (ids and aliases), answered at once even while every slot is busy."""
        data = []
        for runtime in models.runtimes:
            for name in (runtime.id, *runtime.settings.aliases):
                data.append(ModelObject(name, runtime.created, "pocketllm"))
        return ModelList(data)

    @get("/models/{model_id:path}", summary="Retrieve a model")
    async def get_model(self, models: NamedDependency[ModelManager], model_id: FromPath[str]) -> ModelObject:
        """One model by id or alias."""
        name = model_id.lstrip("/")
        runtime = models.resolve(name)
        return ModelObject(name, runtime.created, "pocketllm")

    @post("/chat/completions", summary="Create a chat completion", status_code=200)
    async def chat_completions(
        self,
        request: Request[Any, Any, State],
        data: JSONBody[ChatCompletionRequest],
        models: NamedDependency[ModelManager],
        settings: NamedDependency[Settings],
        principal: NamedDependency[Principal],
    ) -> Response[ChatCompletion] | EventStream:
        """OpenAI chat completions, JSON or SSE (``stream: true``).

        With an ``X-Session-Id`` header the exchange is recorded into that chat session of the caller.
        """
        runtime = _resolve(models, principal, data.model)
        session_id = request.headers.get("x-session-id")
        record = None
        if session_id is not None:
            store = request.app.state.authenticator.store
            prompt = data.messages[-1].text()
            session = await session_for_recording(
                store, principal, session_id, runtime.id, title_from(prompt)
            )

            async def record(reply: str) -> None:
                await store.add_messages(session.id, [("user", prompt), ("assistant", reply)])

        headers = {"X-Session-Id": session_id} if session_id else {}
        job = await prepare_chat(data, runtime, settings.limits, session_id)
        reservation = reserve(job)
        created = int(time.time())
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            frames = _Frames(job, completion_id, created, data.model, include_usage, record)
            return EventStream(
                event_stream(
                    reservation,
                    settings.queue.ping_interval_s,
                    lambda slot: frames.chat(run_choices(job, slot)),
                ),
                headers,
            )
        output: JobOutput = await _until_disconnect(request, run_to_completion(job, reservation))
        if record is not None:
            await record(output.choices[0].text)
        return Response(_chat_completion(job, output, completion_id, created, data.model), headers=headers)

    @post("/completions", summary="Create a text completion", status_code=200)
    async def completions(
        self,
        request: Request[Any, Any, State],
        data: JSONBody[CompletionRequest],
        models: NamedDependency[ModelManager],
        settings: NamedDependency[Settings],
        principal: NamedDependency[Principal],
    ) -> Completion | EventStream:
        """OpenAI (legacy) text completions, JSON or SSE."""
        runtime = _resolve(models, principal, data.model)
        job = await prepare_completion(data, runtime, settings.limits)
        reservation = reserve(job)
        created = int(time.time())
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            frames = _Frames(job, completion_id, created, data.model, include_usage)
            return EventStream(
                event_stream(
                    reservation,
                    settings.queue.ping_interval_s,
                    lambda slot: frames.completion(run_choices(job, slot)),
                )
            )
        output: JobOutput = await _until_disconnect(request, run_to_completion(job, reservation))
        choices = []
        for c in output.choices:
            echo = job.echo_texts[c.index // job.n] if job.echo_texts else ""
            logprobs = _completion_logprobs(c.tokens, len(echo)) if job.params.logprobs else None
            choices.append(CompletionChoice(c.index, c.text, logprobs, c.finish_reason))  # type: ignore[arg-type]
        return Completion(
            id=completion_id,
            created=created,
            model=data.model,
            choices=choices,
            system_fingerprint=_fingerprint(job),
            usage=_usage(output.prompt_tokens, output.completion_tokens, output.cached_tokens),
        )

    @post("/embeddings", summary="Create embeddings", status_code=200)
    async def embeddings(
        self,
        data: JSONBody[EmbeddingRequest],
        models: NamedDependency[ModelManager],
        settings: NamedDependency[Settings],
        principal: NamedDependency[Principal],
    ) -> EmbeddingList:
        """Mean-pooled, normalised embeddings; ``encoding_format`` float or base64."""
        runtime = _resolve(models, principal, data.model)
        engine, _ = runtime.ready()
        if not engine.embeddings_enabled:
            raise NotFoundError(
                f"the model `{data.model}` does not serve embeddings", param="model", code="model_not_found"
            )
        if data.dimensions is not None and data.dimensions != int(
            engine.info.metadata.get(
                f"{engine.info.metadata.get('general.architecture', '')}.embedding_length", 0
            )
        ):
            raise InvalidRequestError("`dimensions` cannot be changed for this model", param="dimensions")
        texts = [
            item
            if isinstance(item, str)
            else engine.detokenize(check_token_ids(item, engine.info.n_vocab, "input"))
            for item in split_inputs(data.input, "input")
        ]
        if any(not text for text in texts):
            raise InvalidRequestError("`input` must not contain empty strings", param="input")
        if len(texts) > settings.limits.max_embedding_inputs:
            raise InvalidRequestError(
                f"`input` may hold at most {settings.limits.max_embedding_inputs} items", param="input"
            )
        for text in texts:
            if (
                len(await tokenize_checked(engine, text, runtime.n_ctx_per_slot, "input"))
                > runtime.n_ctx_per_slot
            ):
                raise InvalidRequestError(
                    f"an input is longer than the model's context of {runtime.n_ctx_per_slot} tokens",
                    param="input",
                    code="context_length_exceeded",
                )
        try:
            vectors, used = await engine.embed(texts)
        except EngineError as exc:
            raise from_engine_error(exc) from None
        items = []
        for index, vector in enumerate(vectors):
            if data.encoding_format == "base64":
                encoded: list[float] | str = base64.b64encode(
                    np.asarray(vector, dtype="<f4").tobytes()
                ).decode()
            else:
                encoded = vector
            items.append(Embedding(index, encoded))
        return EmbeddingList(items, data.model, EmbeddingUsage(used, used))


class _Frames:
    """Builds the SSE frames of one response from choice events (the engine's, or a replay)."""

    def __init__(
        self,
        job: Job,
        completion_id: str,
        created: int,
        model: str,
        include_usage: bool,
        on_complete: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.on_complete = on_complete
        self.job = job
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.fingerprint = _fingerprint(job)

    async def chat(self, events: AsyncIterator[ChoiceToken | ChoiceFinished]) -> AsyncIterator[bytes]:
        """``chat.completion.chunk`` frames: role first, content deltas, finish, optional usage."""

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
            return frame(
                ChatCompletionChunk(
                    self.completion_id, self.created, self.model, self.fingerprint, choices, usage
                )
            )

        job = self.job
        for index in range(job.choices):
            yield chunk([ChunkChoice(index, ChoiceDelta(role="assistant", content=""))])
        completion_tokens = cached = 0
        first_choice: list[str] = []
        async for item in events:
            if isinstance(item, ChoiceToken):
                event = item.event
                if item.index == 0:
                    first_choice.append(event.text)
                logprobs = _chat_logprobs([event]) if job.params.logprobs and event.token_id >= 0 else None
                if event.text or logprobs is not None:
                    yield chunk([ChunkChoice(item.index, ChoiceDelta(content=event.text), logprobs)])
            else:
                completion_tokens += item.event.completion_tokens
                cached = max(cached, item.event.cached_tokens)
                yield chunk([ChunkChoice(item.index, ChoiceDelta(), None, item.event.finish_reason)])
        if self.on_complete is not None:
            await self.on_complete("".join(first_choice))
        if self.include_usage:
            yield chunk([], _usage(job.prompt_tokens, completion_tokens, cached))

    async def completion(self, events: AsyncIterator[ChoiceToken | ChoiceFinished]) -> AsyncIterator[bytes]:
        """``text_completion`` frames: echoed prompts, text deltas, finish, optional usage."""

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
            return frame(
                Completion(self.completion_id, self.created, self.model, choices, self.fingerprint, usage)
            )

        job = self.job
        offsets = dict.fromkeys(range(job.choices), 0)
        if job.echo_texts:
            for index in range(job.choices):
                offsets[index] = len(job.echo_texts[index // job.n])
                yield chunk([CompletionChoice(index, job.echo_texts[index // job.n])])
        completion_tokens = cached = 0
        async for item in events:
            if isinstance(item, ChoiceToken):
                event = item.event
                logprobs = None
                if job.params.logprobs and event.token_id >= 0:
                    logprobs = _completion_logprobs([event], offsets[item.index])
                offsets[item.index] += len(event.text)
                if event.text or logprobs is not None:
                    yield chunk([CompletionChoice(item.index, event.text, logprobs)])
            else:
                completion_tokens += item.event.completion_tokens
                cached = max(cached, item.event.cached_tokens)
                yield chunk([CompletionChoice(item.index, "", None, item.event.finish_reason)])
        if self.include_usage:
            yield chunk([], _usage(job.prompt_tokens, completion_tokens, cached))


def _chat_completion(
    job: Job, output: JobOutput, completion_id: str, created: int, model: str
) -> ChatCompletion:
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        system_fingerprint=_fingerprint(job),
        choices=[
            ChatChoice(
                index=c.index,
                message=AssistantMessage("assistant", c.text),
                logprobs=_chat_logprobs(c.tokens) if job.params.logprobs else None,
                finish_reason=c.finish_reason,  # type: ignore[arg-type]
            )
            for c in output.choices
        ],
        usage=_usage(output.prompt_tokens, output.completion_tokens, output.cached_tokens),
    )


def _resolve(models: ModelManager, principal: Principal, name: str) -> ModelRuntime:
    """The model by id or alias, if this credential may use it (404 unknown, 403 not allowed)."""
    runtime = models.resolve(name)
    check_model_access(principal, name, runtime.id)
    return runtime
