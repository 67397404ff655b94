"""The PocketLLM backend's chat routes: ``POST /chat`` with stored sessions, ``/chat/history`` and the
``/chat/ws`` WebSocket. A turn is a chat completion over the session's history: it runs through the same
pipeline as ``/v1/chat/completions`` (rate limit -> cache -> engine) and only its wire shape differs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import aclosing
from typing import Annotated, Any, cast

import msgspec
from litestar import Controller, Request, Response, WebSocket, delete, get, post, websocket
from litestar.di import NamedDependency
from litestar.exceptions import SerializationException, WebSocketDisconnect
from litestar.params import FromPath, JSONBody, QueryParameter
from msgspec import Meta, Struct

from auth.authenticate import Authenticator
from auth.errors import AuthenticationError
from auth.principal import Principal
from auth.store import ChatSession, IdentityStore
from engine.base import TokenEvent
from engine.models import ModelManager
from gateway.cache.entry import CachedCompletion
from gateway.errors import (
    ClientDisconnectedError,
    GatewayError,
    PermissionDeniedError,
    UnauthenticatedError,
    as_gateway_error,
    error_dict,
)
from gateway.errors import validation_error as validation_failure
from gateway.observability import websocket_turn
from gateway.openai.frames import Frames, Piece, chat_token_logprobs
from gateway.openai.generation import AnyJob, Shape, chat_shape, prepare_chat
from gateway.openai.pipeline import Call, Pipeline, Run, Signal, respond, until_gone
from gateway.openai.protocol.chat import ChatCompletionRequest, ChatMessage, ChoiceLogprobs
from gateway.openai.protocol.common import Usage
from gateway.pocket.sessions import check_session_id, own_session, session_not_found, title_from
from gateway.security import check_inference, check_model_access, requires_inference
from gateway.sse import EventStream, frame
from telemetry.requests import current_request
from telemetry.setup import Telemetry


class ChatRequest(Struct, forbid_unknown_fields=True):
    """``POST /chat`` and one turn on ``/chat/ws``."""

    prompt: Annotated[str, Meta(min_length=1)]
    session_id: str | None = None
    model: str | None = None
    stream: bool = False
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    system: Annotated[str, Meta(min_length=1)] | None = None
    """A system prompt for this turn: sent first, before the history; not stored in the session."""


class ChatReply(Struct):
    """``POST /chat`` answer."""

    response: str
    session_id: str
    model: str
    finish_reason: str
    usage: dict[str, int]


def _usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class PocketFrames(Frames):
    """PocketLLM's shapes: ``{"session_id", "delta"}`` frames, a ``done`` frame, the ``ChatReply`` body.

    A turn never asks for logprobs.
    """

    object = "chat.completion"
    id_prefix = "chat-"

    def __init__(self, turn: Turn) -> None:
        super().__init__(turn.shape, turn.model)
        self.turn = turn

    def token_logprobs(self, event: TokenEvent, offset: int) -> ChoiceLogprobs:
        """As chat completions (unused: a turn asks for none)."""
        return chat_token_logprobs(event)

    def stored_logprobs(self, plain: dict[str, Any] | None) -> None:
        """None: a turn asks for no logprobs."""
        return

    def chunk(self, piece: Piece) -> bytes | None:
        """A delta, or the ``done`` frame when the reply has finished."""
        message = self.turn.message(piece)
        return frame(message) if message is not None else None

    def tail(self, usage: Usage) -> Iterator[bytes]:
        """Nothing after ``done``."""
        return iter(())

    def body(self, answer: CachedCompletion, cached_tokens: int) -> ChatReply:
        """The whole reply."""
        choice = answer.choices[0]
        usage = Usage(answer.prompt_tokens, answer.completion_tokens, answer.total_tokens)
        return ChatReply(
            choice.text, self.turn.session_id, self.turn.model, choice.finish_reason, _usage_dict(usage)
        )


class Turn:
    """One exchange in a chat session: the user's prompt and the reply the pipeline makes."""

    def __init__(self, data: ChatRequest, session: ChatSession | None, model: str, shape: Shape) -> None:
        self.data = data
        self.shape = shape
        self.session = session
        self.session_id = session.id if session is not None else uuid.uuid4().hex
        self.model = model

    def message(self, piece: Piece) -> dict[str, Any] | None:
        """What a piece of the reply tells the client (``/chat`` frames; ``/chat/ws`` adds its ``type``): its
        text as a ``delta``, or at the end ``done`` with the finish reason and usage; ``None`` for nothing."""
        if piece.usage is not None:
            return {
                "session_id": self.session_id,
                "done": True,
                "finish_reason": piece.finish_reason,
                "usage": _usage_dict(piece.usage),
            }
        if piece.finish_reason is not None or not piece.text:
            return None
        return {"session_id": self.session_id, "delta": piece.text}

    async def record(self, identity_store: IdentityStore, user_id: str, answer: CachedCompletion) -> None:
        """Store both sides of the exchange in the user's session."""
        await identity_store.add_messages(
            user_id, self.session_id, [("user", self.data.prompt), ("assistant", answer.choices[0].text)]
        )


async def start_turn(
    data: ChatRequest,
    principal: Principal,
    identity_store: IdentityStore,
    model_manager: ModelManager,
    pipeline: Pipeline,
) -> tuple[Turn, Run]:
    """Load the session (404 when it is not the caller's), prepare the reply over its history, admit it
    (429 before any new session is created), then create the session when none was given."""
    model_name = data.model or model_manager.runtimes[0].id
    runtime = model_manager.resolve(model_name)
    check_model_access(principal, model_name, runtime.id)
    session = (
        await own_session(identity_store, principal, data.session_id) if data.session_id is not None else None
    )
    history = await identity_store.list_messages(principal.user_id, session.id) if session is not None else []
    completion = ChatCompletionRequest(
        model=model_name,
        messages=[
            *([ChatMessage(role="system", content=data.system)] if data.system is not None else []),
            *(ChatMessage(role=cast(Any, m.role), content=m.content) for m in history),
            ChatMessage(role="user", content=data.prompt),
        ],
        max_tokens=data.max_tokens,
        temperature=data.temperature,
    )
    turn = Turn(data, session, model_name, chat_shape(completion, runtime, pipeline.settings.limits))

    async def prepare() -> AnyJob:
        return await prepare_chat(
            completion, runtime, pipeline.settings.limits, turn.session_id, principal.user_id
        )

    async def record(answer: CachedCompletion) -> None:
        await turn.record(identity_store, principal.user_id, answer)

    run = await pipeline.start(Call(completion, principal, PocketFrames(turn), prepare, on_answer=record))
    if session is None:
        try:
            turn.session = await identity_store.create_session(
                principal.user_id, title_from(data.prompt), runtime.id, turn.session_id
            )
        except BaseException:
            await run.close()
            raise
    return turn, run


class ChatController(Controller):
    """``/chat`` and ``/chat/history``."""

    path = "/chat"
    tags = ["PocketLLM"]
    guards = [requires_inference]

    @post("", status_code=200, summary="Chat in a stored session")
    async def chat(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[ChatRequest],
        principal: NamedDependency[Principal],
        model_manager: NamedDependency[ModelManager],
        pipeline: NamedDependency[Pipeline],
        identity_store: NamedDependency[IdentityStore],
    ) -> Response[ChatReply] | EventStream:
        """Generate the next reply of a session (a new one when none is given); both turns are stored.

        A client that goes away cancels the generation (JSON or stream) and frees its slot.
        """
        _, run = await start_turn(data, principal, identity_store, model_manager, pipeline)
        return await respond(request, run, stream=data.stream)

    @get("/history", summary="The caller's sessions")
    async def history(
        self,
        principal: NamedDependency[Principal],
        identity_store: NamedDependency[IdentityStore],
        # QueryParameter, not Meta: Litestar does not apply msgspec Meta constraints to query parameters
        limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
        offset: Annotated[int, QueryParameter(ge=0, le=2**62)] = 0,
    ) -> dict[str, Any]:
        """Newest first, paginated."""
        sessions, total = await identity_store.list_sessions(principal.user_id, limit, offset)
        return {
            "sessions": [_session_dict(s) for s in sessions],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    @get("/history/{session_id:str}", summary="One session's messages")
    async def session(
        self,
        principal: NamedDependency[Principal],
        identity_store: NamedDependency[IdentityStore],
        session_id: FromPath[str],
    ) -> dict[str, Any]:
        """The session and its messages in order; 404 for a missing or another user's session."""
        session = await own_session(identity_store, principal, session_id)
        messages = await identity_store.list_messages(principal.user_id, session.id)
        return {
            **_session_dict(session),
            "messages": [
                {"role": m.role, "content": m.content, "created_at": m.created_at} for m in messages
            ],
        }

    @delete("/history/{session_id:str}", status_code=204, summary="Delete a session")
    async def delete_session(
        self,
        principal: NamedDependency[Principal],
        identity_store: NamedDependency[IdentityStore],
        session_id: FromPath[str],
    ) -> None:
        """Delete the caller's session and its messages."""
        if not await identity_store.delete_session(check_session_id(session_id), principal.user_id):
            raise session_not_found()


def _session_dict(session: ChatSession) -> dict[str, Any]:
    return {
        "id": session.id,
        "title": session.title,
        "model": session.model,
        "created_at": session.created_at,
        "updated_at": session.updated_at,
        "message_count": session.message_count,
    }


POLICY_VIOLATION = 1008
"""The WebSocket close code when the credential does not grant chat (no ``inference`` scope) or stops
being valid (revoked, disabled, expired)."""


@websocket("/chat/ws")
async def chat_socket(
    socket: WebSocket[Any, Any, Any],
    model_manager: NamedDependency[ModelManager],
    pipeline: NamedDependency[Pipeline],
    identity_store: NamedDependency[IdentityStore],
    authenticator: NamedDependency[Authenticator],
    telemetry: NamedDependency[Telemetry],
) -> None:
    """Streaming chat over a WebSocket: authenticate by header or a first ``{"token": ...}`` message, then
    send ``{"prompt", "session_id"?, "model"?, "system"?, ...}``; replies are ``delta`` frames and a ``done``
    frame. Each turn is measured as one request of ``/chat/ws`` (``websocket_turn``), as ``POST /chat`` is.

    A credential that does not authenticate gets an error message and the close code 4401. One without
    the ``inference`` scope (an ``admin``-only key), the same 403 as on ``/v1`` and the close code 1008
    (policy violation). The credential is checked again before every turn: once its key is revoked, its
    user disabled or its token expired or logged out, the next prompt gets an error message and the
    socket is closed with 1008."""
    await socket.accept()
    try:
        credential = await _socket_credential(socket)
        principal = await authenticator.authenticate(*credential)
    except WebSocketDisconnect:
        return  # the client left before authenticating: nothing to report
    except Exception as exc:
        error = as_gateway_error(exc)
        if error is None:
            raise
        await socket.send_json({"type": "error", "error": error_dict(error)})
        await socket.close(code=4401)
        return
    try:
        check_inference(principal)
    except PermissionDeniedError as exc:
        await _refuse(socket, exc)
        return
    if not (socket.headers.get("authorization") or socket.headers.get("x-api-key")):
        await socket.send_json({"type": "ready", "username": principal.username})
    inbox = _Inbox(socket)
    try:
        while True:
            message = await inbox.get()
            try:
                principal = await authenticator.authenticate(*credential)
                check_inference(principal)
            except (AuthenticationError, PermissionDeniedError) as exc:
                error = as_gateway_error(exc)
                assert error is not None
                await _refuse(socket, error)
                return
            await _measured_turn(
                socket, inbox, message, principal, telemetry, identity_store, model_manager, pipeline
            )
    except WebSocketDisconnect:
        return
    finally:
        await inbox.close()


async def _measured_turn(
    socket: WebSocket[Any, Any, Any],
    inbox: _Inbox,
    message: Any,
    principal: Principal,
    telemetry: Telemetry,
    identity_store: IdentityStore,
    model_manager: ModelManager,
    pipeline: Pipeline,
) -> None:
    """One turn of ``/chat/ws``, recorded as one request (``websocket_turn``); errors go back as messages."""
    with websocket_turn(telemetry, socket.scope) as record:
        record.authenticated(principal.user_id, principal.username)
        try:
            data = msgspec.convert(message, ChatRequest)
            turn, run = await start_turn(data, principal, identity_store, model_manager, pipeline)
            await _socket_turn(socket, inbox, turn, run)
        except msgspec.ValidationError as exc:
            error = validation_failure(str(exc))
            record.status = error.status_code
            await socket.send_json({"type": "error", "error": error_dict(error)})
        except WebSocketDisconnect:
            record.disconnected = True
            raise
        except Exception as exc:
            error = as_gateway_error(exc)
            if error is None:
                raise
            record.status = error.status_code
            record.failed(error.code or error.error_type)
            await socket.send_json({"type": "error", "error": error_dict(error)})


class _Inbox:
    """The socket's messages, read as they come: a close is seen at once, also while a turn waits in the
    queue or generates (when nothing is sent that could fail), and the turn is cancelled then.

    Prompts sent during a turn wait here for their turn, as they did in the socket's own buffer.
    """

    def __init__(self, socket: WebSocket[Any, Any, Any]) -> None:
        self._socket = socket
        self._messages: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = asyncio.Event()
        """Set when the client closed the socket."""
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                self._messages.put_nowait(await self._socket.receive_json())
        except WebSocketDisconnect as exc:
            self.closed.set()
            self._messages.put_nowait(exc)
        except Exception as exc:  # a message that is not JSON: raised where it is taken, as before
            self._messages.put_nowait(exc)

    async def get(self) -> Any:
        """The next message (raises ``WebSocketDisconnect`` once the socket is closed)."""
        message = await self._messages.get()
        if isinstance(message, Exception):
            raise message
        return message

    async def close(self) -> None:
        """Stop reading."""
        self._reader.cancel()
        await asyncio.wait({self._reader})


async def _refuse(socket: WebSocket[Any, Any, Any], error: GatewayError) -> None:
    """Say why in an error message, then close with 1008 (policy violation)."""
    await socket.send_json({"type": "error", "error": error_dict(error)})
    reason = (
        "the credential is no longer valid" if error.status_code == 401 else "the credential may not chat"
    )
    await socket.close(code=POLICY_VIOLATION, reason=reason)


async def _socket_credential(socket: WebSocket[Any, Any, Any]) -> tuple[str | None, str | None]:
    """The ``(Authorization, x-api-key)`` pair of the socket: its headers, or a first ``{"token"}``."""
    authorization, api_key = socket.headers.get("authorization"), socket.headers.get("x-api-key")
    if authorization or api_key:
        return authorization, api_key
    try:
        first = await socket.receive_json()
    except SerializationException:  # not JSON: no token either
        first = None
    token = first.get("token") if isinstance(first, dict) else None
    if not isinstance(token, str):
        raise UnauthenticatedError('send {"token": "<api key or JWT>"} first')
    return f"Bearer {token}", None


async def _socket_turn(socket: WebSocket[Any, Any, Any], inbox: _Inbox, turn: Turn, run: Run) -> None:
    """Reply to a turn; the socket closing cancels it, queued or generating, and frees its place."""
    try:
        await until_gone(inbox.closed.wait(), _socket_reply(socket, turn, run))
    except ClientDisconnectedError:
        raise WebSocketDisconnect(detail="the client closed the socket") from None
    finally:
        await run.close()  # idempotent: also gives back what a reply cancelled before its first event held


async def _socket_reply(socket: WebSocket[Any, Any, Any], turn: Turn, run: Run) -> None:
    """Send the run's pieces as ``delta`` messages and its end as ``done``.

    ``done`` goes out once the run has ended (slot and rate-limit ticket given back), right after the
    turn is recorded: as an HTTP request is recorded just before its last body message, a client that has
    read ``done`` finds the turn in the metrics."""
    started = time.perf_counter()
    done: dict[str, Any] | None = None
    async with aclosing(run.events()) as events:
        async for event in events:
            message = turn.message(event) if not isinstance(event, Signal) else None
            if message is None:
                continue
            if message.pop("done", False):
                done = {"type": "done", **message, "seconds": round(time.perf_counter() - started, 3)}
            else:
                await _send(socket, {"type": "delta", **message})
    if done is not None:
        record = current_request()
        record.status, record.complete = 200, True
        record.finish()
        await _send(socket, done)


async def _send(socket: WebSocket[Any, Any, Any], message: dict[str, Any]) -> None:
    """``send_json``; a client gone mid-reply (the server raises an ``OSError`` on the send) is a
    ``WebSocketDisconnect``, so the turn is recorded as cancelled."""
    try:
        await socket.send_json(message)
    except OSError as exc:
        raise WebSocketDisconnect(detail="the client went away during the reply") from exc
