"""The PocketLLM backend's routes: login, chat with stored sessions, history, and the chat WebSocket."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, WebSocket, delete, get, post, websocket
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import WebSocketDisconnect
from litestar.params import FromPath, JSONBody, QueryParameter
from msgspec import Meta, Struct

from auth.principal import Principal
from auth.service import AuthenticationFailedError, Authenticator, LoginThrottledError
from auth.store import ChatSession, IdentityStore
from gateway.errors import AuthenticationError, GatewayError, RateLimitError
from gateway.generation import ChoiceFinished, ChoiceToken, Job, acquire, prepare_chat, reserve, run_choices
from gateway.protocol.chat import ChatCompletionRequest, ChatMessage
from gateway.quotas import Admission, admit
from gateway.runtime import ModelManager
from gateway.security import authenticate, check_model_access, requires_inference
from gateway.services.backends import Services
from gateway.sessions import check_session_id, own_session, session_not_found, title_from
from gateway.settings import Settings
from gateway.streaming import EventStream, event_stream, frame


class LoginRequest(Struct, forbid_unknown_fields=True):
    """``POST /auth/login``."""

    username: Annotated[str, Meta(min_length=1, max_length=128)]
    password: Annotated[str, Meta(min_length=1, max_length=1024)]


class LoginResponse(Struct):
    """PocketLLM's login answer."""

    access_token: str
    token_type: str
    user_id: str
    username: str
    is_admin: bool


class ChatRequest(Struct, forbid_unknown_fields=True):
    """``POST /chat``."""

    prompt: Annotated[str, Meta(min_length=1)]
    session_id: str | None = None
    model: str | None = None
    stream: bool = False
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None


class ChatReply(Struct):
    """``POST /chat`` answer."""

    response: str
    session_id: str
    model: str
    finish_reason: str
    usage: dict[str, int]


class AuthController(Controller):
    """``/auth``."""

    path = "/auth"
    tags = ["PocketLLM"]

    @post("/login", status_code=200, summary="Log in")
    async def login(self, request: Request[Any, Any, State], data: JSONBody[LoginRequest]) -> LoginResponse:
        """Exchange a username and password for a bearer token (throttled after repeated failures)."""
        authenticator: Authenticator = request.app.state.authenticator
        client = request.client.host if request.client else "unknown"
        try:
            user, token = await authenticator.login(data.username, data.password, client)
        except LoginThrottledError as exc:
            raise RateLimitError(
                "too many failed logins; try again later",
                code="login_throttled",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        except AuthenticationFailedError as exc:
            raise AuthenticationError(str(exc), code="invalid_credentials") from None
        return LoginResponse(token, "bearer", user.id, user.username, user.role == "admin")

    @get("/test", summary="Auth service state")
    async def test(
        self, request: Request[Any, Any, State], settings: NamedDependency[Settings]
    ) -> dict[str, Any]:
        """Whether the auth service works, and how it is configured (no secrets)."""
        authenticator: Authenticator = request.app.state.authenticator
        users = await authenticator.store.list_users()
        return {
            "status": "ok",
            "environment": settings.env,
            "store": "sqlite",
            "users": len(users),
            "token_algorithms": list(authenticator.tokens.algorithms),
            "issuer": authenticator.tokens.issuer,
            "audience": authenticator.tokens.audience,
            "external_identity_provider": authenticator.external is not None,
            "password_hash": f"scrypt n={authenticator.passwords.n} r={authenticator.passwords.r} "
            f"p={authenticator.passwords.p}",
        }


def _history_messages(history: list[Any], prompt: str) -> list[ChatMessage]:
    return [
        *(ChatMessage(role=m.role, content=m.content) for m in history),
        ChatMessage(role="user", content=prompt),
    ]


async def _start_turn(
    store: IdentityStore,
    principal: Principal,
    data: ChatRequest,
    models: ModelManager,
    settings: Settings,
    services: Services,
) -> tuple[ChatSession, Job, Admission]:
    """The session (loaded, or created when none is given), the job for the next reply in it, and its
    rate-limit admission (429 before any new session is created). Release the admission when done."""
    model_name = data.model or models.runtimes[0].id
    runtime = models.resolve(model_name)
    check_model_access(principal, model_name, runtime.id)
    session: ChatSession | None = None
    history: list[Any] = []
    if data.session_id is not None:
        session = await own_session(store, principal, data.session_id)
        history = await store.list_messages(session.id)
    completion = ChatCompletionRequest(
        model=model_name,
        messages=_history_messages(history, data.prompt),
        max_tokens=data.max_tokens,
        temperature=data.temperature,
    )
    job = await prepare_chat(
        completion, runtime, settings.limits, session.id if session else None, principal.user_id
    )
    reserved = job.prompt_tokens + job.params.max_tokens
    admission = await admit(services, settings.ratelimit, store, principal, tokens=reserved)
    if session is None:
        try:
            session = await store.create_session(principal.user_id, title_from(data.prompt), runtime.id)
        except BaseException:
            await admission.release(0)
            raise
        job.session = session.id
    return session, job, admission


def _used(job: Job, usage: dict[str, int]) -> int:
    return usage.get("total_tokens", job.prompt_tokens)


class ChatController(Controller):
    """``/chat`` and ``/chat/history``."""

    path = "/chat"
    tags = ["PocketLLM"]
    guards = [requires_inference]

    @post("", status_code=200, summary="Chat in a stored session")
    async def chat(
        self,
        request: Request[Any, Any, State],
        data: JSONBody[ChatRequest],
        principal: NamedDependency[Principal],
        models: NamedDependency[ModelManager],
        settings: NamedDependency[Settings],
        services: NamedDependency[Services],
    ) -> Response[ChatReply] | EventStream:
        """Generate the next reply of a session (a new one when none is given); both turns are stored."""
        store = request.app.state.authenticator.store
        session, job, admission = await _start_turn(store, principal, data, models, settings, services)
        text, finish, usage, handed_off = "", "stop", dict[str, int](), False
        try:
            reservation = reserve(job)
            if data.stream:
                body = event_stream(
                    reservation,
                    settings.queue.ping_interval_s,
                    lambda slot: _chat_frames(job, slot, store, session.id, data.prompt, usage),
                )
                handed_off = True
                return EventStream(admission.releasing(body, lambda: _used(job, usage)), admission.headers)
            try:
                slot = await acquire(job, reservation)
                async for item in run_choices(job, slot):
                    if isinstance(item, ChoiceToken):
                        text += item.event.text
                    else:
                        finish = item.event.finish_reason
                        usage = _usage(item)
            finally:
                reservation.release()
        finally:
            if not handed_off:
                await admission.release(_used(job, usage))
        await store.add_messages(session.id, [("user", data.prompt), ("assistant", text)])
        return Response(
            ChatReply(text, session.id, data.model or job.runtime.id, finish, usage),
            headers=admission.headers,
        )

    @get("/history", summary="The caller's sessions")
    async def history(
        self,
        request: Request[Any, Any, State],
        principal: NamedDependency[Principal],
        # QueryParameter, not Meta: Litestar does not apply msgspec Meta constraints to query parameters
        limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
        offset: Annotated[int, QueryParameter(ge=0, le=2**62)] = 0,
    ) -> dict[str, Any]:
        """Newest first, paginated."""
        sessions, total = await request.app.state.authenticator.store.list_sessions(
            principal.user_id, limit, offset
        )
        return {
            "sessions": [_session_dict(s) for s in sessions],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    @get("/history/{session_id:str}", summary="One session's messages")
    async def session(
        self,
        request: Request[Any, Any, State],
        principal: NamedDependency[Principal],
        session_id: FromPath[str],
    ) -> dict[str, Any]:
        """The session and its messages in order; 404 for a missing or another user's session."""
        store = request.app.state.authenticator.store
        session = await own_session(store, principal, session_id)
        messages = await store.list_messages(session.id)
        return {
            **_session_dict(session),
            "messages": [
                {"role": m.role, "content": m.content, "created_at": m.created_at} for m in messages
            ],
        }

    @delete("/history/{session_id:str}", status_code=204, summary="Delete a session")
    async def delete_session(
        self,
        request: Request[Any, Any, State],
        principal: NamedDependency[Principal],
        session_id: FromPath[str],
    ) -> None:
        """Delete the caller's session and its messages."""
        if not await request.app.state.authenticator.store.delete_session(
            check_session_id(session_id), principal.user_id
        ):
            raise session_not_found()


def _session_dict(session: Any) -> dict[str, Any]:
    return {
        "id": session.id,
        "title": session.title,
        "model": session.model,
        "created_at": session.created_at,
        "updated_at": session.updated_at,
        "message_count": session.message_count,
    }


def _usage(item: ChoiceFinished) -> dict[str, int]:
    event = item.event
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


async def _chat_frames(
    job: Job, slot: int, store: Any, session_id: str, prompt: str, usage: dict[str, int]
) -> AsyncIterator[bytes]:
    """The ``/chat`` stream; ``usage`` is filled in when the reply is done."""
    text = ""
    async for item in run_choices(job, slot):
        if isinstance(item, ChoiceToken):
            if item.event.text:
                text += item.event.text
                yield frame({"session_id": session_id, "delta": item.event.text})
        else:
            usage.update(_usage(item))
            await store.add_messages(session_id, [("user", prompt), ("assistant", text)])
            yield frame(
                {
                    "session_id": session_id,
                    "done": True,
                    "finish_reason": item.event.finish_reason,
                    "usage": usage,
                }
            )


@websocket("/chat/ws")
async def chat_socket(
    socket: WebSocket[Any, Any, State],
    models: NamedDependency[ModelManager],
    settings: NamedDependency[Settings],
    services: NamedDependency[Services],
) -> None:
    """Streaming chat over a WebSocket: authenticate by header or a first ``{"token": ...}`` message, then
    send ``{"prompt", "session_id"?, "model"?}``; replies are ``delta`` frames and a ``done`` frame."""
    await socket.accept()
    try:
        principal = await _socket_principal(socket)
    except GatewayError as exc:
        await socket.send_json({"type": "error", "error": msgspec.to_builtins(exc.body().error)})
        await socket.close(code=4401)
        return
    store = socket.app.state.authenticator.store
    try:
        while True:
            message = await socket.receive_json()
            try:
                request = msgspec.convert(message, ChatRequest)
                await _socket_turn(socket, request, principal, store, models, settings, services)
            except msgspec.ValidationError as exc:
                await socket.send_json(
                    {
                        "type": "error",
                        "error": {
                            "message": str(exc),
                            "type": "invalid_request_error",
                            "param": None,
                            "code": None,
                        },
                    }
                )
            except GatewayError as exc:
                await socket.send_json({"type": "error", "error": msgspec.to_builtins(exc.body().error)})
    except WebSocketDisconnect:
        return


async def _socket_principal(socket: WebSocket[Any, Any, State]) -> Principal:
    if socket.headers.get("authorization") or socket.headers.get("x-api-key"):
        return await authenticate(socket)
    first = await socket.receive_json()
    token = first.get("token") if isinstance(first, dict) else None
    if not isinstance(token, str):
        raise AuthenticationError('send {"token": "<api key or JWT>"} first')
    authenticator: Authenticator = socket.app.state.authenticator
    try:
        principal = await authenticator.authenticate(f"Bearer {token}", None)
    except AuthenticationFailedError as exc:
        raise AuthenticationError(str(exc)) from None
    await socket.send_json({"type": "ready", "username": principal.username})
    return principal


async def _socket_turn(
    socket: WebSocket[Any, Any, State],
    data: ChatRequest,
    principal: Principal,
    store: Any,
    models: ModelManager,
    settings: Settings,
    services: Services,
) -> None:
    session, job, admission = await _start_turn(store, principal, data, models, settings, services)
    text, usage = "", dict[str, int]()
    started = time.perf_counter()
    try:
        reservation = reserve(job)
    except BaseException:
        await admission.release(0)
        raise
    try:
        slot = await acquire(job, reservation)
        async for item in run_choices(job, slot):
            if isinstance(item, ChoiceToken):
                if item.event.text:
                    text += item.event.text
                    await socket.send_json(
                        {"type": "delta", "session_id": session.id, "delta": item.event.text}
                    )
            else:
                usage = _usage(item)
                await store.add_messages(session.id, [("user", data.prompt), ("assistant", text)])
                await socket.send_json(
                    {
                        "type": "done",
                        "session_id": session.id,
                        "finish_reason": item.event.finish_reason,
                        "usage": usage,
                        "seconds": round(time.perf_counter() - started, 3),
                    }
                )
    finally:
        reservation.release()
        await admission.release(_used(job, usage))
