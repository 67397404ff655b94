"""Rate limits: the limiter protocol, limit specs, decisions and their HTTP headers.

Every limiter enforces, per subject (an API key, a user), over a sliding window (60 s by default):
- requests per window: a log of admission times, so no window of that length ever admits more
  (no double burst at a window edge);
- tokens per window: each admission reserves ``prompt + max_tokens``, corrected by ``release`` with
  what was really used;
- concurrent requests: a lease per admitted request, freed by ``release``. A lease lives ``lease_ttl_s``
  (seconds) unless ``renew`` extends it; the process that holds it renews it while its request runs
  (``leases.LeaseKeeper``), so the slots of a process that dies come back within the TTL.
A request is admitted only if every limit of every subject allows it; a refused request records
nothing (a request refused for concurrency uses none of its RPM).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, Protocol, runtime_checkable

from msgspec import Struct

LimitKind = Literal["requests", "tokens", "concurrency"]

CONCURRENCY_RETRY_S = 1.0
"""Retry hint for a concurrency refusal (when a slot frees is unknown)."""


class RateLimitBackendError(Exception):
    """A shared limiter backend could not answer (unreachable, timed out, bad reply)."""


class LimitSpec(Struct, frozen=True, kw_only=True):
    """The limits of one subject; ``None`` is unlimited."""

    rpm: int | None = None
    """Requests per window."""
    tpm: int | None = None
    """Tokens (prompt + completion) per window."""
    concurrency: int | None = None
    """Requests in flight."""


class Subject(Struct, frozen=True):
    """Who a limit applies to, e.g. ``Subject("key:<id>", spec)`` and ``Subject("user:<id>", spec)``."""

    id: str
    limits: LimitSpec


class Ticket(Struct, frozen=True):
    """An admitted request's hold on its limits; give it to ``release`` exactly when it ends."""

    id: str
    subjects: tuple[Subject, ...]
    tokens: int
    """Tokens reserved at admission."""
    backend: str
    """Name of the limiter that admitted it."""

    @property
    def holds_lease(self) -> bool:
        """Whether it holds a concurrency slot (which must be renewed while the request runs)."""
        return any(subject.limits.concurrency is not None for subject in self.subjects)


class LimitState(Struct, frozen=True):
    """One limit as the headers show it (the tightest subject's)."""

    limit: int
    remaining: int
    reset_s: float
    """Seconds until the limit is back to its full value."""


class Decision(Struct, frozen=True, kw_only=True):
    """The answer to ``acquire``."""

    allowed: bool
    limited_by: LimitKind | None = None
    """Which limit refused the request (``None`` when allowed)."""
    retry_after_s: float = 0.0
    """When a retry could be admitted (0 when allowed)."""
    requests: LimitState | None = None
    tokens: LimitState | None = None
    concurrency: LimitState | None = None
    ticket: Ticket | None = None
    """Set when allowed."""

    @property
    def state(self) -> LimitState | None:
        """The state of the limit that refused (``limit``/``remaining``/``reset_s``)."""
        return getattr(self, self.limited_by) if self.limited_by else None

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, plus ``Retry-After`` (whole
        seconds) and ``retry-after-ms`` (read by the OpenAI SDKs) when refused."""
        out: dict[str, str] = {}
        for kind, state in (("requests", self.requests), ("tokens", self.tokens)):
            if state is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(state.limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
                out[f"x-ratelimit-reset-{kind}"] = format_duration(state.reset_s)
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
            out["retry-after-ms"] = str(max(1, math.ceil(self.retry_after_s * 1000)))
        return out


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: ``"250ms"``, ``"1.5s"``, ``"6m0s"``."""
    seconds = max(0.0, seconds)
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"


@runtime_checkable
class RateLimiter(Protocol):
    """Admission control over ``Subject`` limits."""

    name: str

    async def acquire(self, subjects: Sequence[Subject], *, tokens: int) -> Decision:
        """Admit a request that reserves ``tokens`` (prompt + max_tokens) if every limit allows it.

        Raises:
            RateLimitBackendError: a shared backend failed (the fallback limiter never raises).
        """
        ...

    async def release(self, ticket: Ticket, *, used_tokens: int) -> None:
        """End an admitted request: free its concurrency slot and set its token charge to
        ``used_tokens`` (the real usage; ``0`` for a request that failed before generating).
        Idempotent: a second call changes nothing."""
        ...

    async def renew(self, tickets: Sequence[Ticket]) -> list[str]:
        """Extend the concurrency leases of ``tickets`` (unreleased, issued here) to a full lease TTL from
        now, all in one call.

        Returns:
            The ids of tickets whose lease had already expired or been released (they are not revived).

        Raises:
            RateLimitBackendError: a shared backend failed.
        """
        ...

    async def close(self) -> None:
        """Release resources (not the shared Redis client)."""
        ...


class SubjectCheck(NamedTuple):
    """What one subject's windows held before this request (all times in seconds)."""

    in_flight: int = 0
    requests: int = 0
    requests_retry_s: float = 0.0
    """Until enough old requests leave the window for one more (0 when not full)."""
    requests_reset_s: float = 0.0
    """Until the newest request leaves the window."""
    tokens: int = 0
    tokens_retry_s: float = 0.0
    tokens_reset_s: float = 0.0


def refusals(spec: LimitSpec, check: SubjectCheck, tokens: int) -> list[tuple[LimitKind, float]]:
    """The limits of one subject that refuse ``tokens`` more, with the retry time of each."""
    out: list[tuple[LimitKind, float]] = []
    if spec.concurrency is not None and check.in_flight >= spec.concurrency:
        out.append(("concurrency", CONCURRENCY_RETRY_S))
    if spec.rpm is not None and check.requests >= spec.rpm:
        out.append(("requests", check.requests_retry_s))
    if spec.tpm is not None and check.tokens + tokens > spec.tpm:
        out.append(("tokens", check.tokens_retry_s))
    return out


def _tightest(states: list[LimitState]) -> LimitState | None:
    return min(states, key=lambda s: (s.remaining, -s.reset_s)) if states else None


def compose_decision(
    subjects: Sequence[Subject],
    checks: Sequence[SubjectCheck],
    *,
    tokens: int,
    window_s: float,
    ticket: Ticket | None,
) -> Decision:
    """Turn per-subject checks into one decision (``ticket`` is ``None`` when the backend refused)."""
    refused = [
        r
        for subject, check in zip(subjects, checks, strict=True)
        for r in refusals(subject.limits, check, tokens)
    ]
    allowed = ticket is not None and not refused
    requests: list[LimitState] = []
    token_states: list[LimitState] = []
    concurrency: list[LimitState] = []
    for subject, check in zip(subjects, checks, strict=True):
        spec, added = subject.limits, int(allowed)
        if spec.rpm is not None:
            reset = window_s if allowed else check.requests_reset_s
            requests.append(LimitState(spec.rpm, max(0, spec.rpm - check.requests - added), reset))
        if spec.tpm is not None:
            used = check.tokens + (tokens if allowed else 0)
            reset = window_s if allowed and tokens else check.tokens_reset_s
            token_states.append(LimitState(spec.tpm, max(0, spec.tpm - used), reset))
        if spec.concurrency is not None:
            concurrency.append(
                LimitState(spec.concurrency, max(0, spec.concurrency - check.in_flight - added), 0.0)
            )
    order: tuple[LimitKind, ...] = ("concurrency", "requests", "tokens")
    limited_by = next((kind for kind in order if any(k == kind for k, _ in refused)), None)
    return Decision(
        allowed=allowed,
        limited_by=limited_by,
        retry_after_s=max((retry for _, retry in refused), default=0.0),
        requests=_tightest(requests),
        tokens=_tightest(token_states),
        concurrency=_tightest(concurrency),
        ticket=ticket if allowed else None,
    )
