"""Admission: whose limits apply to a request, the check (429), and the release when the request ends.

A request is limited per API key (when it came with one) and per user. Each subject's limits are the
settings' defaults, replaced field by field by the override stored for it (``PUT /admin/keys/{id}/limits``,
``PUT /admin/users/{id}/limits``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from auth.principal import Principal
from auth.store import UNLIMITED, IdentityStore, LimitOverride
from gateway.errors import RateLimitExceededError
from gateway.ratelimit.limiter import Decision, LimitKind, LimitSpec, RateLimiter, Subject, format_duration
from gateway.settings import RateLimitSettings
from telemetry.requests import current_request

logger = logging.getLogger("pocketllm.ratelimit")

_WHAT: dict[LimitKind, str] = {
    "requests": "requests per minute (RPM)",
    "tokens": "tokens per minute (TPM)",
    "concurrency": "concurrent requests",
}


def refusal(decision: Decision) -> RateLimitExceededError:
    """The 429 for a refused ``decision``, naming the limit, with ``Retry-After`` and ``x-ratelimit-*``."""
    kind: LimitKind = decision.limited_by or "requests"
    state = decision.state
    limit = f": limit {state.limit}" if state is not None else ""
    return RateLimitExceededError(
        kind,
        f"Rate limit reached on {_WHAT[kind]}{limit}. Please try again in "
        f"{format_duration(decision.retry_after_s)}.",
        decision.headers(),
    )


def _field(override: int | None, default: int | None) -> int | None:
    if override is None:
        return default
    return None if override == UNLIMITED else override


def effective_limits(subject: str, override: LimitOverride | None, settings: RateLimitSettings) -> LimitSpec:
    """The limits of ``"key:<id>"`` or ``"user:<id>"``: the defaults, replaced field by field."""
    o = override or LimitOverride()
    s = settings
    if subject.startswith("key:"):
        rpm, tpm, concurrency = s.key_rpm, s.key_tpm, s.key_concurrency
    else:
        rpm, tpm, concurrency = s.user_rpm, s.user_tpm, s.user_concurrency
    return LimitSpec(
        rpm=_field(o.rpm, rpm), tpm=_field(o.tpm, tpm), concurrency=_field(o.concurrency, concurrency)
    )


class LimitOverrides:
    """The stored limit overrides of a request's subjects.

    A principal authenticated by an API key or one of our JWTs carries them: the authenticator read them
    in the same store round trip as the credential (``Principal.limits``), so admission costs no round
    trip, and they are exactly as fresh as that lookup (the key cache's TTL, ``auth.key_cache_ttl_s``;
    every request for a JWT). Only a principal without them (a token of an external identity provider)
    has them read here, each subject at most once per ``ttl_s``.

    An override set through this process's admin routes applies at once (the store reports the change to
    the key cache and to this cache, and ``forget`` drops the subject here); one set through another
    replica applies at once on PostgreSQL (its NOTIFY), else within the key cache's TTL (this cache's
    ``ttl_s`` for the principals without limits).
    """

    def __init__(self, store: IdentityStore, ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.ttl_s = ttl_s
        self._clock = clock
        self._known: dict[str, tuple[float, LimitOverride | None]] = {}
        store.on_identity_change(self._known.clear)

    async def of(self, principal: Principal, subjects: list[str]) -> dict[str, LimitOverride]:
        """The overrides of ``subjects`` (the principal's own), from the principal when it carries them."""
        carried = principal.known_overrides()
        if carried is not None:
            return carried
        return await self.get(subjects)

    async def get(self, subjects: list[str]) -> dict[str, LimitOverride]:
        """The overrides of ``subjects`` (absent: none stored)."""
        now = self._clock()
        missing = [s for s in subjects if s not in self._known or self._known[s][0] <= now]
        if missing:
            found = await self.store.get_limit_overrides(missing)
            if len(self._known) > 100_000:
                self._known.clear()
            for subject in missing:
                self._known[subject] = (now + self.ttl_s, found.get(subject))
        return {s: o for s in subjects if (o := self._known[s][1]) is not None}

    def forget(self, subject: str) -> None:
        """Read ``subject`` from the store next time (its override was just changed here)."""
        self._known.pop(subject, None)


async def subjects_for(
    principal: Principal, settings: RateLimitSettings, overrides_source: LimitOverrides
) -> list[Subject]:
    """The subjects limiting this caller (key, then user), with their effective limits.

    Subjects without any limit are left out (nothing to count for them).
    """
    ids = [f"key:{principal.key_id}"] if principal.key_id else []
    ids.append(f"user:{principal.user_id}")
    overrides = await overrides_source.of(principal, ids)
    subjects = []
    for subject_id in ids:
        spec = effective_limits(subject_id, overrides.get(subject_id), settings)
        if spec != LimitSpec():
            subjects.append(Subject(subject_id, spec))
    return subjects


class Admission:
    """An admitted request's hold on its limits; ``release`` it exactly once when the request ends."""

    def __init__(self, limiter: RateLimiter | None, decision: Decision | None) -> None:
        self._limiter = limiter
        self._ticket = decision.ticket if decision is not None else None
        self.headers: dict[str, str] = decision.headers() if decision is not None else {}
        """``x-ratelimit-*`` headers for the response."""

    async def release(self, used_tokens: int) -> None:
        """Free the concurrency slot and charge ``used_tokens``; idempotent; survives cancellation.

        The release runs as its own task, so a request cancelled by a client disconnect (whose task is
        cancelled again at every await) still gives its slot back.
        """
        ticket, self._ticket = self._ticket, None
        if ticket is None or self._limiter is None:
            return
        task = asyncio.ensure_future(self._limiter.release(ticket, used_tokens=max(0, used_tokens)))
        task.add_done_callback(_log_failure)
        await asyncio.shield(task)  # if this await is cancelled, the task still finishes

    async def releasing(self, body: AsyncIterator[bytes], used: Callable[[], int]) -> AsyncIterator[bytes]:
        """The stream ``body``; when it ends (finished, failed or cancelled) the ticket is released with
        ``used()`` tokens."""
        try:
            async for chunk in body:
                yield chunk
        finally:
            await self.release(used())


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("releasing a rate-limit ticket failed", exc_info=task.exception())


UNLIMITED_ADMISSION = Admission(None, None)
"""For requests no limit applies to."""


async def admit(
    limiter: RateLimiter,
    settings: RateLimitSettings,
    overrides: LimitOverrides,
    principal: Principal,
    *,
    tokens: int,
) -> Admission:
    """Admit a request reserving ``tokens`` (prompt + max_tokens) or refuse it.

    Raises:
        RateLimitExceededError: 429 with ``Retry-After`` and ``x-ratelimit-*`` headers.
    """
    if not settings.enabled:
        return UNLIMITED_ADMISSION
    subjects = await subjects_for(principal, settings, overrides)
    if not subjects:
        return UNLIMITED_ADMISSION
    decision = await limiter.acquire(subjects, tokens=tokens)
    if not decision.allowed:
        error = refusal(decision)
        current_request().rate_limited(error.kind)
        raise error
    return Admission(limiter, decision)
