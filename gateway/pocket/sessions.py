"""Chat sessions at the HTTP edge: id checks, ownership, recording exchanges."""

from __future__ import annotations

import re

from auth.errors import SessionExistsError
from auth.principal import Principal
from auth.store import ChatSession, IdentityStore
from gateway.errors import InvalidRequestError, NotFoundError

_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def check_session_id(session_id: str, param: str = "session_id") -> str:
    """Refuse ids with control characters, slashes or dots-only (path traversal) and over-long ones."""
    if not _SESSION_ID.match(session_id):
        raise InvalidRequestError(
            "a session id is 1-128 characters of letters, digits, '.', '_', ':' and '-', starting with a "
            "letter or digit",
            param=param,
            code="invalid_session_id",
        )
    return session_id


def session_not_found() -> NotFoundError:
    """The same 404 for a missing session and for another user's."""
    return NotFoundError("no such chat session", param="session_id", code="session_not_found")


async def own_session(store: IdentityStore, principal: Principal, session_id: str) -> ChatSession:
    """The caller's existing session, or 404 (also when it is someone else's)."""
    session = await store.get_session(check_session_id(session_id), principal.user_id)
    if session is None:
        raise session_not_found()
    return session


async def recordable_session(
    store: IdentityStore, principal: Principal, session_id: str
) -> ChatSession | None:
    """Before any work: the caller's session ``session_id``, or ``None`` when they have none of that id
    yet (400 for a malformed id). Ids are per user: another user's id is just a new session of this one."""
    return await store.get_session(check_session_id(session_id, "X-Session-Id"), principal.user_id)


async def session_for_recording(
    store: IdentityStore, principal: Principal, session_id: str, model: str, title: str
) -> ChatSession:
    """The caller's session ``session_id``, created when new (also when two requests create it at once)."""
    session = await recordable_session(store, principal, session_id)
    if session is not None:
        return session
    try:
        return await store.create_session(principal.user_id, title, model, session_id)
    except SessionExistsError:  # a concurrent request of the same user created it first
        found = await store.get_session(session_id, principal.user_id)
        if found is None:
            raise
        return found


def title_from(prompt: str) -> str:
    """A session title: the first line of the first prompt, shortened."""
    line = prompt.strip().splitlines()[0] if prompt.strip() else "New chat"
    return line[:80]
