"""The OpenAI API: thin controllers over ``gateway.generation``."""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

import msgspec
import numpy as np
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from auth.principal import Principal
from engine.base import EngineError, TokenEvent
from gateway.answer import Answer, Events, answer
from gateway.caching import StreamRecorder
from gateway.errors import (
    InvalidRequestError,
    NotFoundError,
    from_engine_error,
)
from gateway.generation import (
    ChoiceFinished,
    Job,
    JobOutput,
    check_token_ids,
    prepare_chat,
    prepare_completion,
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
from gateway.services.backends import Services
from gateway.services.cached import CachedCompletion, ReplayChunk
from gateway.sessions import recordable_session, session_for_recording, title_from
from gateway.settings import Settings
from gateway.streaming import EventStream, frame
from telemetry.requests import current_request

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
        services: NamedDependency[Services],
    ) -> Response[ChatCompletion] | EventStream:
        """OpenAI chat completions, JSON or SSE (``stream: true``).

        With an ``X-Session-Id`` header the exchange is recorded into that chat session of the caller.
        Rate limits apply before generation (429 ``rate_limit_exceeded``); deterministic requests are
        answered from the response cache when they can be (``x-cache: hit|miss|bypass``).
        """
        runtime = _resolve(models, principal, data.model)
        session_id = request.headers.get("x-session-id")
        record = None
        if session_id is not None:
            store = request.app.state.authenticator.store
            prompt = data.messages[-1].text()
            existing = await recordable_session(store, principal, session_id)

            async def record(reply: str) -> None:
                # a new session is created only now: a refused or failed request leaves none behind
                session = existing or await session_for_recording(
                    store, principal, session_id, runtime.id, title_from(prompt)
                )
                await store.add_messages(session.id, [("user", prompt), ("assistant", reply)])

        headers = {"X-Session-Id": session_id} if session_id else {}
        job = await prepare_chat(data, runtime, settings.limits, session_id, principal.user_id)
        created = int(time.time())
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        frames = _Frames(job, completion_id, created, data.model, include_usage, record, "chat.completion")

        def from_output(output: JobOutput) -> tuple[ChatCompletion, list[dict[str, Any] | None]]:
            body = _chat_completion(job, output, completion_id, created, data.model)
            logprobs = [msgspec.to_builtins(c.logprobs) if c.logprobs else None for c in body.choices]
            return body, logprobs

        def from_cache(value: CachedCompletion) -> ChatCompletion:
            return ChatCompletion(
                id=completion_id,
                created=created,
                model=data.model,
                system_fingerprint=_fingerprint(job),
                choices=[
                    ChatChoice(
                        index=c.index,
                        message=AssistantMessage("assistant", c.text),
                        logprobs=_cached_logprobs(job, c.logprobs, ChoiceLogprobs),
                        finish_reason=c.finish_reason,  # type: ignore[arg-type]
                    )
                    for c in value.choices
                ],
                usage=_usage(value.prompt_tokens, value.completion_tokens, 0),
            )

        return await answer(
            Answer(request, job, data, principal, settings, services, frames, headers, record),
            frames.chat,
            from_output,
            from_cache,
        )

    @post("/completions", summary="Create a text completion", status_code=200)
    async def completions(
        self,
        request: Request[Any, Any, State],
        data: JSONBody[CompletionRequest],
        models: NamedDependency[ModelManager],
        settings: NamedDependency[Settings],
        principal: NamedDependency[Principal],
        services: NamedDependency[Services],
    ) -> Response[Completion] | EventStream:
        """OpenAI (legacy) text completions, JSON or SSE; rate limits and the cache as for chat."""
        runtime = _resolve(models, principal, data.model)
        job = await prepare_completion(data, runtime, settings.limits, principal.user_id)
        created = int(time.time())
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        frames = _Frames(job, completion_id, created, data.model, include_usage, None, "text_completion")

        def build(choices: list[CompletionChoice], prompt: int, completion: int, cached: int) -> Completion:
            return Completion(
                id=completion_id,
                created=created,
                model=data.model,
                choices=choices,
                system_fingerprint=_fingerprint(job),
                usage=_usage(prompt, completion, cached),
            )

        def from_output(output: JobOutput) -> tuple[Completion, list[dict[str, Any] | None]]:
            choices = []
            for c in output.choices:
                echo = job.echo_texts[c.index // job.n] if job.echo_texts else ""
                logprobs = _completion_logprobs(c.tokens, len(echo)) if job.params.logprobs else None
                choices.append(CompletionChoice(c.index, c.text, logprobs, c.finish_reason))  # type: ignore[arg-type]
            body = build(choices, output.prompt_tokens, output.completion_tokens, output.cached_tokens)
            return body, [msgspec.to_builtins(c.logprobs) if c.logprobs else None for c in choices]

        def from_cache(value: CachedCompletion) -> Completion:
            choices = [
                CompletionChoice(
                    c.index,
                    (job.echo_texts[c.index // job.n] if job.echo_texts else "") + c.text,
                    _cached_logprobs(job, c.logprobs, CompletionLogprobs),
                    c.finish_reason,  # type: ignore[arg-type]
                )
                for c in value.choices
            ]
            return build(choices, value.prompt_tokens, value.completion_tokens, 0)

        return await answer(
            Answer(request, job, data, principal, settings, services, frames),
            frames.completion,
            from_output,
            from_cache,
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
        current_request().generated(used, 0)
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
    """Builds the SSE frames of one response from choice events (the engine's, or a replay).

    It also records what it sent; once every choice has finished, ``store`` (when set) gets the whole
    answer for the response cache. A stream that fails or is cancelled never gets that far.
    """

    def __init__(
        self,
        job: Job,
        completion_id: str,
        created: int,
        model: str,
        include_usage: bool,
        on_complete: Callable[[str], Awaitable[None]] | None = None,
        kind: Literal["chat.completion", "text_completion"] = "chat.completion",
    ) -> None:
        self.on_complete = on_complete
        self.job = job
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.fingerprint = _fingerprint(job)
        self.kind = kind
        self.recorder = StreamRecorder(kind, job, created)
        self.store: Callable[[CachedCompletion], Awaitable[Any]] | None = None

    async def _finish(self) -> None:
        completion = self.recorder.completion()
        if self.store is not None and completion is not None:
            await self.store(completion)

    async def chat(self, events: Events) -> AsyncIterator[bytes]:
        """``chat.completion.chunk`` frames: role first, content deltas, finish, optional usage."""

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
            return frame(
                ChatCompletionChunk(
                    self.completion_id, self.created, self.model, self.fingerprint, choices, usage
                )
            )

        job, recorder = self.job, self.recorder
        for index in range(job.choices):
            yield chunk([ChunkChoice(index, ChoiceDelta(role="assistant", content=""))])
        cached = 0
        async for item in events:
            if isinstance(item, ChoiceFinished):
                recorder.finish(item.index, item.event)
                cached = max(cached, item.event.cached_tokens)
                yield chunk([ChunkChoice(item.index, ChoiceDelta(), None, item.event.finish_reason)])
                continue
            if isinstance(item, ReplayChunk):
                text, logprobs = item.text, _cached_logprobs(job, item.logprobs, ChoiceLogprobs)
            else:
                event, text = item.event, item.event.text
                recorder.generated += event.token_id >= 0
                logprobs = _chat_logprobs([event]) if job.params.logprobs and event.token_id >= 0 else None
            recorder.text(item.index, text, logprobs)
            if text or logprobs is not None:
                yield chunk([ChunkChoice(item.index, ChoiceDelta(content=text), logprobs)])
        if self.on_complete is not None:
            await self.on_complete("".join(recorder.texts.get(0, [])))
        await self._finish()
        if self.include_usage:
            yield chunk([], _usage(job.prompt_tokens, recorder.completion_tokens, cached))

    async def completion(self, events: Events) -> AsyncIterator[bytes]:
        """``text_completion`` frames: echoed prompts, text deltas, finish, optional usage."""

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
            return frame(
                Completion(self.completion_id, self.created, self.model, choices, self.fingerprint, usage)
            )

        job, recorder = self.job, self.recorder
        offsets = dict.fromkeys(range(job.choices), 0)
        if job.echo_texts:
            for index in range(job.choices):
                offsets[index] = len(job.echo_texts[index // job.n])
                yield chunk([CompletionChoice(index, job.echo_texts[index // job.n])])
        cached = 0
        async for item in events:
            if isinstance(item, ChoiceFinished):
                recorder.finish(item.index, item.event)
                cached = max(cached, item.event.cached_tokens)
                yield chunk([CompletionChoice(item.index, "", None, item.event.finish_reason)])
                continue
            if isinstance(item, ReplayChunk):
                text, logprobs = item.text, _cached_logprobs(job, item.logprobs, CompletionLogprobs)
            else:
                event, text, logprobs = item.event, item.event.text, None
                recorder.generated += event.token_id >= 0
                if job.params.logprobs and event.token_id >= 0:
                    logprobs = _completion_logprobs([event], offsets[item.index])
            offsets[item.index] += len(text)
            recorder.text(item.index, text, logprobs)
            if text or logprobs is not None:
                yield chunk([CompletionChoice(item.index, text, logprobs)])
        await self._finish()
        if self.include_usage:
            yield chunk([], _usage(job.prompt_tokens, recorder.completion_tokens, cached))


L = TypeVar("L", ChoiceLogprobs, CompletionLogprobs)


def _cached_logprobs(job: Job, logprobs: dict[str, Any] | None, shape: type[L]) -> L | None:
    """Stored (plain) logprobs as the wire type, when the request asks for logprobs."""
    if not job.params.logprobs or not logprobs:
        return None
    return msgspec.convert(logprobs, shape)


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
    current_request().identify(name, runtime.id)
    return runtime
