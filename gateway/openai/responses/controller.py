"""``/v1/responses``: the Responses API on the gateway's own pipeline and identity store.

A request becomes a chat conversation (the chain of stored responses it continues, then its own input
items) and runs through ``Pipeline.start`` like a chat completion (for an upstream model, as one chat
request to its upstream: ``_prepare_upstream``): rate limits, the response cache
(keyed on the request as sent, ``previous_response_id`` included), the slot pool, telemetry and the
error envelope are the chat path's. A chain runs on the slot that holds it: the job's session is the
chain's first response id, so each turn computes only its new tokens.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from auth.principal import Principal
from auth.store import IdentityStore, StoredResponse
from engine.base import GrammarError
from engine.models import ModelManager, ModelRuntime
from engine.tools import ToolRequest
from gateway.cache.entry import CachedCompletion
from gateway.errors import ContextLengthError, InvalidRequestError, NotFoundError
from gateway.openai.controller import _resolve
from gateway.openai.generation import (
    DEFAULT_TEMPERATURE,
    AnyJob,
    Job,
    Shape,
    UpstreamJob,
    _budget,
    chat_scope,
    sampling_params,
    tokenize_checked,
    upstream_chat_job,
)
from gateway.openai.pipeline import Call, Pipeline, Run, respond
from gateway.openai.responses.convert import (
    chat_messages,
    check_supported,
    input_items,
    tool_request,
)
from gateway.openai.responses.frames import ResponseFrames
from gateway.openai.responses.protocol import (
    DeletedResponse,
    Item,
    ItemList,
    ResponseObject,
    ResponseRequest,
    TextFormat,
)
from gateway.security import requires_inference
from gateway.settings import LimitsSettings, Settings
from gateway.sse import EventStream


def response_not_found(param: str | None = None) -> NotFoundError:
    """The same 404 for a missing response and for another user's."""
    return NotFoundError("no such response", param=param, code="response_not_found")


class ResponsesController(Controller):
    """``/v1/responses`` routes."""

    path = "/v1/responses"
    tags = ["OpenAI"]
    guards = [requires_inference]

    @post("", summary="Create a response", status_code=200)
    async def create(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[ResponseRequest],
        model_manager: NamedDependency[ModelManager],
        settings: NamedDependency[Settings],
        principal: NamedDependency[Principal],
        pipeline: NamedDependency[Pipeline],
        identity_store: NamedDependency[IdentityStore],
    ) -> Response[ResponseObject] | EventStream:
        """OpenAI Responses, JSON or typed SSE events (``stream: true``); stored for the caller unless
        ``store: false``, and continued by ``previous_response_id`` (404 when it is not the caller's)."""
        check_supported(data)
        runtime = _resolve(model_manager, principal, data.model)
        tools = tool_request(data)
        items = input_items(data.input)
        history: list[Item] = []
        session: str | None = None
        if data.previous_response_id is not None:
            chain = await identity_store.response_chain(data.previous_response_id, principal.user_id)
            if not chain:
                raise response_not_found("previous_response_id")
            session = chain[0].id
            for stored in chain:
                history += msgspec.json.decode(stored.input, type=list[Item])
                history += msgspec.json.decode(stored.body, type=ResponseObject).output
        runtime.check_ready() if runtime.is_upstream else runtime.ready()
        shape = Shape(runtime, 1, 1, False)
        frames = ResponseFrames(
            shape,
            _template(data, tools),
            tools is not None and tools.calls_allowed,
            structured=runtime.is_upstream,  # an upstream streams calls as calls, not as text to parse
        )
        messages = chat_messages([*history, *items], data.instructions)
        store = data.store is not False
        started: list[Run] = []

        async def prepare() -> AnyJob:
            chain = session or frames.id
            if runtime.is_upstream:
                return _prepare_upstream(data, runtime, settings.limits, messages, tools, chain)
            return await _prepare(data, runtime, settings.limits, messages, tools, chain, principal.user_id)

        async def finished(answer: CachedCompletion) -> None:
            final = frames.finish(answer, started[0].cached_tokens)
            if store:
                await identity_store.save_response(
                    StoredResponse(
                        final.id,
                        principal.user_id,
                        data.previous_response_id,
                        runtime.id,
                        time.time(),
                        msgspec.json.encode(items).decode(),
                        msgspec.json.encode(final).decode(),
                    )
                )

        cache_control = request.headers.getall("cache-control", [])
        run = await pipeline.start(Call(data, principal, frames, prepare, cache_control, finished))
        started.append(run)
        return await respond(request, run, stream=bool(data.stream))

    @get("/{response_id:str}", summary="Retrieve a response")
    async def retrieve(
        self,
        principal: NamedDependency[Principal],
        identity_store: NamedDependency[IdentityStore],
        response_id: FromPath[str],
    ) -> Response[bytes]:
        """The caller's stored response (404 for a missing or another user's)."""
        stored = await _own(identity_store, principal, response_id)
        return Response(stored.body.encode(), media_type="application/json")

    @delete("/{response_id:str}", summary="Delete a response", status_code=200)
    async def delete(
        self,
        principal: NamedDependency[Principal],
        identity_store: NamedDependency[IdentityStore],
        response_id: FromPath[str],
    ) -> DeletedResponse:
        """Delete the caller's stored response; a response that continued it keeps its own turn only."""
        if not await identity_store.delete_response(response_id, principal.user_id):
            raise response_not_found()
        return DeletedResponse(response_id)

    @get("/{response_id:str}/input_items", summary="List a response's input items")
    async def input_items(
        self,
        principal: NamedDependency[Principal],
        identity_store: NamedDependency[IdentityStore],
        response_id: FromPath[str],
        after: FromQuery[str | None] = None,
        order: FromQuery[Literal["asc", "desc"]] = "desc",
        # QueryParameter, not Meta: Litestar does not apply msgspec Meta constraints to query parameters
        limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
    ) -> ItemList:
        """The input items of the response's own turn (not those of the responses it continued), newest
        first unless ``order=asc``, paged by ``after`` (an item id) and ``limit``."""
        stored = await _own(identity_store, principal, response_id)
        items = msgspec.json.decode(stored.input, type=list[Item])
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [item.id for item in items]
            if after not in ids:
                raise InvalidRequestError(
                    f"`after` {after[:64]!r} is not an item of this list", param="after"
                )
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return ItemList(
            page, page[0].id if page else None, page[-1].id if page else None, len(items) > len(page)
        )


async def _own(store: IdentityStore, principal: Principal, response_id: str) -> StoredResponse:
    stored = await store.get_response(response_id, principal.user_id) if len(response_id) <= 128 else None
    if stored is None:
        raise response_not_found()
    return stored


def _template(data: ResponseRequest, tools: ToolRequest | None) -> ResponseObject:
    """The response as the request makes it, before any output (id and time are the frames')."""
    text_format: dict[str, Any] = {"type": "text"}
    if data.text is not None and data.text.format is not None:
        text_format = {k: v for k, v in msgspec.to_builtins(data.text.format).items() if v is not None}
    return ResponseObject(
        id="",
        created_at=0,
        status="in_progress",
        instructions=data.instructions,
        max_output_tokens=data.max_output_tokens,
        model=data.model,
        output=[],
        parallel_tool_calls=tools.parallel if tools is not None else data.parallel_tool_calls is not False,
        previous_response_id=data.previous_response_id,
        store=data.store is not False,
        temperature=data.temperature if data.temperature is not None else DEFAULT_TEMPERATURE,
        text={"format": text_format, "verbosity": "medium"},
        tool_choice=data.tool_choice if data.tool_choice is not None else "auto",
        tools=[
            {
                "type": "function",
                "name": tool.name,
                "description": tool.description or None,
                "parameters": tool.parameters or None,
                "strict": tool.strict,
            }
            for tool in (tools.tools if tools is not None else ())
        ],
        top_p=data.top_p if data.top_p is not None else 1.0,
        user=data.user,
        safety_identifier=data.safety_identifier,
        prompt_cache_key=data.prompt_cache_key,
        metadata=data.metadata or {},
    )


async def _prepare(
    data: ResponseRequest,
    runtime: ModelRuntime,
    limits: LimitsSettings,
    messages: list[dict[str, Any]],
    tools: ToolRequest | None,
    session: str,
    tenant: str,
) -> Job:
    """Render the conversation (with the tools, when offered or in its history), tokenize and check it,
    and build the job that runs it on the chain's slot, reusing kept KV state as chat does: the caller's
    (``tenant``) in full, another user's only for the shared system prefix."""
    engine, pool = runtime.ready()
    if len(messages) > runtime.n_ctx_per_slot:  # every message takes at least one token
        raise ContextLengthError(
            f"This model's maximum context length is {runtime.n_ctx_per_slot} tokens. However, the "
            f"conversation has {len(messages)} messages. Please shorten it.",
            param="input",
        )
    text_format = data.text.format if data.text is not None else None
    structured = text_format is not None and text_format.type != "text"
    grammar = None
    if tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        request = tools if tools is not None else ToolRequest((), "none")
        if structured and request.calls_allowed:
            raise InvalidRequestError(
                "`text.format` json_object/json_schema cannot be combined with callable function tools",
                param="text.format",
            )
        try:
            prompt = await asyncio.to_thread(engine.tool_prompt, messages, request)
        except GrammarError as exc:
            raise InvalidRequestError(
                f"a function's parameters cannot be enforced: {exc}", param="tools"
            ) from None
        text, grammar = prompt.text, prompt.grammar
    else:
        text = engine.render_chat(messages)
    if structured and text_format is not None:
        if text_format.type == "json_schema" and not text_format.schema:
            raise InvalidRequestError(
                "`text.format.schema` is required for type json_schema", param="text.format.schema"
            )
        try:
            grammar = await asyncio.to_thread(engine.grammar_for, text_format.type, text_format.schema)
        except GrammarError as exc:
            raise InvalidRequestError(
                f"`text.format` cannot be enforced: {exc}", param="text.format"
            ) from None
    prompt_tokens = await tokenize_checked(engine, text, runtime.n_ctx_per_slot, "input")
    max_tokens = _budget(
        runtime, len(prompt_tokens), data.max_output_tokens, limits.max_tokens_default, "max_output_tokens"
    )
    params = sampling_params(max_tokens, temperature=data.temperature, top_p=data.top_p, grammar=grammar)
    scope = await chat_scope(engine, messages, text, prompt_tokens, tenant)
    return Job(
        Shape(runtime, 1, 1, False), engine, pool, [prompt_tokens], params, session=session, scope=scope
    )


def _text_format(data: ResponseRequest) -> TextFormat | None:
    """``text.format`` when it asks for JSON (``json_object``/``json_schema``), else ``None``."""
    text_format = data.text.format if data.text is not None else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_schema" and not text_format.schema:
        raise InvalidRequestError(
            "`text.format.schema` is required for type json_schema", param="text.format.schema"
        )
    return text_format


def _prepare_upstream(
    data: ResponseRequest,
    runtime: ModelRuntime,
    limits: LimitsSettings,
    messages: list[dict[str, Any]],
    tools: ToolRequest | None,
    session: str,
) -> UpstreamJob:
    """The conversation as one chat request for the model's upstream (which renders and tokenizes it):
    messages with their calls and results, sampling, ``text.format`` as ``response_format``, the function
    tools and ``tool_choice`` in chat's shape. The chain's first response id is the affinity, so a chain
    stays on the replica whose KV cache holds it."""
    upstream = runtime.ready_upstream()
    text_format = _text_format(data)
    if text_format is not None and tools is not None and tools.calls_allowed:
        raise InvalidRequestError(
            "`text.format` json_object/json_schema cannot be combined with callable function tools",
            param="text.format",
        )
    max_tokens = data.max_output_tokens if data.max_output_tokens is not None else limits.max_tokens_default
    body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens}
    if data.temperature is not None:
        body["temperature"] = data.temperature
    if data.top_p is not None:
        body["top_p"] = data.top_p
    if text_format is not None:
        if text_format.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        else:
            schema: dict[str, Any] = {"name": text_format.name or "response", "schema": text_format.schema}
            if text_format.strict is not None:
                schema["strict"] = text_format.strict
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
    if tools is not None:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    **({"description": tool.description} if tool.description else {}),
                    "parameters": tool.parameters or {"type": "object", "properties": {}},
                    **({"strict": True} if tool.strict else {}),
                },
            }
            for tool in tools.tools
        ]
        choice = tools.choice
        body["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
        if not tools.parallel:
            body["parallel_tool_calls"] = False
    return upstream_chat_job(Shape(runtime, 1, 1, False), upstream, body, max_tokens, session=session)
