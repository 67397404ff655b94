"""The OpenAI API routes: thin handlers over ``generation`` (validate and prepare) and ``pipeline``."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from auth.principal import Principal
from auth.store import IdentityStore
from engine.models import ModelManager, ModelRuntime
from gateway.cache.entry import CachedCompletion
from gateway.errors import InvalidRequestError, NotFoundError
from gateway.openai.frames import ChatFrames, CompletionFrames
from gateway.openai.generation import (
    check_token_ids,
    prepare_chat,
    prepare_completion,
    split_inputs,
    tokenize_checked,
)
from gateway.openai.pipeline import Call, Pipeline, respond
from gateway.openai.protocol.chat import ChatCompletion, ChatCompletionRequest
from gateway.openai.protocol.completions import Completion, CompletionRequest
from gateway.openai.protocol.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from gateway.openai.protocol.models import ModelList, ModelObject
from gateway.pocket.sessions import recordable_session, session_for_recording, title_from
from gateway.security import check_model_access, requires_inference
from gateway.settings import Settings
from gateway.sse import EventStream
from telemetry.requests import current_request


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
        request: Request[Any, Any, Any],
        data: JSONBody[ChatCompletionRequest],
        models: NamedDependency[ModelManager],
        settings: NamedDependency[Settings],
        principal: NamedDependency[Principal],
        pipeline: NamedDependency[Pipeline],
        store: NamedDependency[IdentityStore],
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
            prompt = data.messages[-1].text()
            existing = await recordable_session(store, principal, session_id)

            async def record(answer: CachedCompletion) -> None:
                # a new session is created only now: a refused or failed request leaves none behind
                session = existing or await session_for_recording(
                    store, principal, session_id, runtime.id, title_from(prompt)
                )
                await store.add_messages(
                    session.id, [("user", prompt), ("assistant", answer.choices[0].text)]
                )

        job = await prepare_chat(data, runtime, settings.limits, session_id)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        frames = ChatFrames(job, data.model, include_usage)
        cache_control = request.headers.getall("cache-control", [])
        run = await pipeline.start(Call(job, data, principal, frames, cache_control, record))
        if session_id:
            run.headers["X-Session-Id"] = session_id
        return await respond(request, run, stream=bool(data.stream))

    @post("/completions", summary="Create a text completion", status_code=200)
    async def completions(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[CompletionRequest],
        models: NamedDependency[ModelManager],
        settings: NamedDependency[Settings],
        principal: NamedDependency[Principal],
        pipeline: NamedDependency[Pipeline],
    ) -> Response[Completion] | EventStream:
        """OpenAI (legacy) text completions, JSON or SSE; rate limits and the cache as for chat."""
        runtime = _resolve(models, principal, data.model)
        job = await prepare_completion(data, runtime, settings.limits)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        frames = CompletionFrames(job, data.model, include_usage)
        cache_control = request.headers.getall("cache-control", [])
        run = await pipeline.start(Call(job, data, principal, frames, cache_control))
        return await respond(request, run, stream=bool(data.stream))

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
        vectors, used = await engine.embed(texts)
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


def _resolve(models: ModelManager, principal: Principal, name: str) -> ModelRuntime:
    """The model by id or alias, if this credential may use it (404 unknown, 403 not allowed)."""
    runtime = models.resolve(name)
    check_model_access(principal, name, runtime.id)
    current_request().identify(name, runtime.id)
    return runtime
