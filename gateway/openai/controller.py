"""The OpenAI API routes: thin handlers over ``generation`` (validate and prepare) and ``pipeline``."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from auth.principal import Principal
from engine.models import ModelManager, ModelRuntime
from gateway.cache.entry import CachedCompletion
from gateway.dependencies import Inference
from gateway.openai.frames import ChatFrames, CompletionFrames
from gateway.openai.generation import (
    AnyJob,
    chat_shape,
    completion_shape,
    prepare_chat,
    prepare_completion,
    prepare_embeddings,
)
from gateway.openai.pipeline import Call, respond, until_disconnect
from gateway.openai.protocol.chat import ChatCompletion, ChatCompletionRequest
from gateway.openai.protocol.completions import Completion, CompletionRequest
from gateway.openai.protocol.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from gateway.openai.protocol.models import ModelList, ModelObject
from gateway.pocket.sessions import recordable_session, session_for_recording, title_from
from gateway.security import check_model_access, requires_inference
from gateway.sse import EventStream
from telemetry.requests import current_request


class OpenAIController(Controller):
    """``/v1`` routes."""

    path = "/v1"
    tags = ["OpenAI"]
    guards = [requires_inference]

    @get("/models", summary="List models")
    async def list_models(self, model_manager: NamedDependency[ModelManager]) -> ModelList:
        """Every served model (ids and aliases), answered at once even while every slot is busy."""
        data = []
        for runtime in model_manager.runtimes:
            for name in (runtime.id, *runtime.settings.aliases):
                data.append(ModelObject(name, runtime.created, "pocketllm"))
        return ModelList(data)

    @get("/models/{model_id:path}", summary="Retrieve a model")
    async def get_model(
        self, model_manager: NamedDependency[ModelManager], model_id: FromPath[str]
    ) -> ModelObject:
        """One model by id or alias."""
        name = model_id.lstrip("/")
        runtime = model_manager.resolve(name)
        return ModelObject(name, runtime.created, "pocketllm")

    @post("/chat/completions", summary="Create a chat completion", status_code=200)
    async def chat_completions(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[ChatCompletionRequest],
        inference: NamedDependency[Inference],
    ) -> Response[ChatCompletion] | EventStream:
        """OpenAI chat completions, JSON or SSE (``stream: true``).

        With an ``X-Session-Id`` header the exchange is recorded into that chat session of the caller;
        it and ``prompt_cache_key`` send the request to the slot that ran the same session or key last.
        Rate limits apply before generation (429 ``rate_limit_exceeded``); deterministic requests are
        answered from the response cache when they can be (``x-cache: hit|miss|bypass``).
        """
        principal, pipeline, settings = inference.principal, inference.pipeline, inference.settings
        runtime = _resolve(inference.models, principal, data.model)
        session_id = request.headers.get("x-session-id")
        record = None
        if session_id is not None:
            identity_store = pipeline.store  # (not a dependency: Litestar checks a Protocol per request)
            prompt = data.messages[-1].text()
            existing = await recordable_session(identity_store, principal, session_id)

            async def record(answer: CachedCompletion) -> None:
                # a new session is created only now: a refused or failed request leaves none behind
                session = existing or await session_for_recording(
                    identity_store, principal, session_id, runtime.id, title_from(prompt)
                )
                await identity_store.add_messages(
                    principal.user_id, session.id, [("user", prompt), ("assistant", answer.choices[0].text)]
                )

        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        frames = ChatFrames(chat_shape(data, runtime, settings.limits), data.model, include_usage)
        cache_control = request.headers.getall("cache-control", [])

        # prompt_cache_key routes like a session (to the slot that last ran it), without recording
        affinity = session_id
        if affinity is None and data.prompt_cache_key:
            affinity = f"prompt_cache_key:{data.prompt_cache_key}"

        async def prepare() -> AnyJob:
            return await prepare_chat(data, runtime, settings.limits, affinity, principal.user_id)

        run = await pipeline.start(Call(data, principal, frames, prepare, cache_control, record))
        if session_id:
            run.headers["X-Session-Id"] = session_id
        return await respond(request, run, stream=bool(data.stream))

    @post("/completions", summary="Create a text completion", status_code=200)
    async def completions(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[CompletionRequest],
        inference: NamedDependency[Inference],
    ) -> Response[Completion] | EventStream:
        """OpenAI (legacy) text completions, JSON or SSE; rate limits and the cache as for chat."""
        principal, pipeline, settings = inference.principal, inference.pipeline, inference.settings
        runtime = _resolve(inference.models, principal, data.model)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        frames = CompletionFrames(completion_shape(data, runtime, settings.limits), data.model, include_usage)
        cache_control = request.headers.getall("cache-control", [])

        async def prepare() -> AnyJob:
            return await prepare_completion(data, runtime, settings.limits, principal.user_id)

        run = await pipeline.start(Call(data, principal, frames, prepare, cache_control))
        return await respond(request, run, stream=bool(data.stream))

    @post("/embeddings", summary="Create embeddings", status_code=200)
    async def embeddings(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[EmbeddingRequest],
        inference: NamedDependency[Inference],
    ) -> EmbeddingList:
        """Mean-pooled, normalised embeddings; ``encoding_format`` float or base64. Rate limits apply
        (input tokens count as TPM); a client that goes away stops the work before its next turn."""
        principal, pipeline, settings = inference.principal, inference.pipeline, inference.settings
        runtime = _resolve(inference.models, principal, data.model)
        job = await prepare_embeddings(data, runtime, settings.limits)
        vectors, used = await until_disconnect(request, pipeline.embed(job, principal))
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


def _resolve(model_manager: ModelManager, principal: Principal, name: str) -> ModelRuntime:
    """The model by id or alias, if this credential may use it (404 unknown, 403 not allowed)."""
    runtime = model_manager.resolve(name)
    check_model_access(principal, name, runtime.id)
    current_request().identify(name, runtime.id, runtime.provider)
    return runtime
