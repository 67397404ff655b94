"""The response cache service: policy, tenant scope, outcomes, counters, and surviving a backend outage."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

from gateway.cache.backend import CacheBackend, CacheBackendError, CacheCallRefusedError, MemoryCacheBackend
from gateway.cache.entry import CachedCompletion, decode_completion, encode_completion
from gateway.cache.key import CachePolicy, cache_key, is_deterministic
from gateway.circuit import Circuit, OnBackendError

logger = logging.getLogger("gateway.services.cache")

STORABLE_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "function_call"})
"""Only finished generations are stored: never errors, never cancelled ones."""


class CacheOutcome(StrEnum):
    """The ``x-cache`` response header value."""

    HIT = "hit"
    """Answered from the cache."""
    MISS = "miss"
    """Looked up, not found; the answer will be stored."""
    BYPASS = "bypass"
    """Not looked up: not cacheable, ``no-cache``, cache disabled, or the backend is unavailable."""


@dataclass(frozen=True, slots=True)
class CacheLookup:
    """The result of ``ResponseCache.lookup``; hand it back to ``store``."""

    outcome: CacheOutcome
    value: CachedCompletion | None = None
    """The cached response on a hit."""
    key: str | None = None
    """Set when the answer may be stored."""
    model_id: str = ""
    ttl_s: float = 0.0
    tier: str | None = None
    """On a hit, where the answer came from: ``"local"`` (this process's copy in front of a shared
    backend) or the backend's name (``"redis"``, ``"memory"``)."""


_BYPASS = CacheLookup(CacheOutcome.BYPASS)


class ResponseCache:
    """Deterministic responses, scoped to the tenant, over one ``CacheBackend``.

    Never raises on a backend failure: the request is answered as a bypass, the failure is counted,
    logged once per outage, and reported to ``on_backend_error``; the backend is skipped for
    ``retry_after_s`` and then tried again.

    With ``local_ttl_s`` > 0 a bounded in-process LRU sits in front of the (shared) backend: a value read
    from the backend or stored through this process is kept there for at most ``local_ttl_s`` and never
    past the entry's own expiry, and a later hit is answered from it without a backend call. A value
    never changes under its key (the key covers every output-affecting field and the model file), so the
    only staleness is a removal: this process's ``flush``/``invalidate_model`` empty the local copies
    at once; a flush made through another process is seen here within ``local_ttl_s``.
    """

    def __init__(
        self,
        backend: CacheBackend,
        *,
        default_ttl_s: float = 3600.0,
        max_ttl_s: float | None = None,
        shared_scope: bool = False,
        enabled: bool = True,
        retry_after_s: float = 1.0,
        on_backend_error: OnBackendError | None = None,
        local_ttl_s: float = 0.0,
        local_max_entries: int = 1000,
        local_max_bytes: int = 16 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create the service.

        Args:
            backend: where entries live.
            default_ttl_s: entry lifetime unless the request's body ``cache.ttl`` says otherwise.
            max_ttl_s: the longest lifetime a request may ask for (longer asks are capped); the larger
                of ``default_ttl_s`` and one day when None.
            shared_scope: one scope for every user (an explicit setting); per user otherwise.
            enabled: ``False`` makes every lookup a bypass and every store a no-op.
            retry_after_s: how long the backend is skipped after a failure.
            on_backend_error: metrics hook, called with ``(operation, error)`` on each backend failure.
            local_ttl_s: longest time a value is kept in this process in front of the backend; 0 (the
                default, and right for an in-process backend) keeps no local copies.
            local_max_entries: most values kept locally (least recently used go first).
            local_max_bytes: most value bytes kept locally.
            clock: monotonic seconds of the local copies (injectable for tests).
        """
        self.backend = backend
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s if max_ttl_s is not None else max(default_ttl_s, 86400.0)
        self.shared_scope = shared_scope
        self.enabled = enabled
        self.circuit = Circuit(
            f"response cache ({backend.name})", logger, retry_after_s=retry_after_s, on_error=on_backend_error
        )
        self.hits = self.misses = self.bypasses = self.errors = self.stores = 0
        self.local_ttl_s = local_ttl_s if local_ttl_s > 0 else 0.0
        self.local = (
            MemoryCacheBackend(max_entries=local_max_entries, max_bytes=local_max_bytes, clock=clock)
            if self.local_ttl_s
            else None
        )
        """The local copies (``None`` when ``local_ttl_s`` is 0)."""
        self.local_hits = 0
        self._clock = clock
        self._local_epoch = 0
        """Moved on by every local drop: a backend read or write that began before a drop does not put
        its value into the local copies after it (it may be gone from the backend by then)."""

    def scope(self, user: str) -> str:
        """The key scope of a user: their own unless the cache is shared."""
        return "shared" if self.shared_scope else f"user:{user}"

    def count(self, outcome: CacheOutcome, tier: str | None = None) -> None:
        """Count one request's outcome and, for a hit, its ``CacheLookup.tier`` (``lookup`` does, unless
        told that the caller will)."""
        if outcome is CacheOutcome.HIT:
            self.hits += 1
            if tier == "local":
                self.local_hits += 1
        elif outcome is CacheOutcome.MISS:
            self.misses += 1
        else:
            self.bypasses += 1

    def _failed(self, operation: str, error: BaseException) -> None:
        self.errors += 1
        if isinstance(error, CacheCallRefusedError):  # the backend is up: not an outage for everyone
            logger.warning("response cache %s refused: %s", operation, error)
            return
        self.circuit.failure(operation, error)

    def entry_ttl(self, policy: CachePolicy) -> float:
        """An entry's lifetime: the request's body ``cache.ttl`` capped at ``max_ttl_s``, else the
        default. A value that is not a positive number never leaves this method (infinity is capped)."""
        requested = policy.ttl_s
        if requested is None or math.isnan(requested) or requested <= 0:
            return self.default_ttl_s
        return min(requested, self.max_ttl_s)

    async def lookup(
        self,
        *,
        user: str,
        model_id: str,
        model_digest: str,
        request: Mapping[str, Any],
        policy: CachePolicy,
        counted: bool = True,
    ) -> CacheLookup:
        """Look a request up.

        Args:
            user: the tenant (the principal's user id).
            model_id: the resolved model id.
            model_digest: the model file's digest.
            request: the request body as plain data, defaults filled in (see ``cache_key``).
            policy: from ``cache_policy(headers, body cache)``.
            counted: count the outcome now; ``False`` when the caller counts it once the request is
                admitted (a request refused afterwards is no lookup of the cache's statistics).

        Returns:
            ``HIT`` with ``value``; ``MISS`` with a ``key`` to store under; ``BYPASS`` (with a ``key`` when
            the request may still be stored, e.g. ``no-cache``).
        """
        found = await self._lookup(user, model_id, model_digest, request, policy)
        if counted:
            self.count(found.outcome, found.tier)
        return found

    async def _lookup(
        self, user: str, model_id: str, model_digest: str, request: Mapping[str, Any], policy: CachePolicy
    ) -> CacheLookup:
        if not self.enabled or not (policy.store or policy.read):
            return _BYPASS
        if not (policy.opt_in or is_deterministic(request)):
            return _BYPASS
        key = cache_key(self.scope(user), model_id, model_digest, request)
        ttl = self.entry_ttl(policy)
        storable = CacheLookup(
            CacheOutcome.BYPASS, key=key if policy.store else None, model_id=model_id, ttl_s=ttl
        )
        if not policy.read:
            return storable
        if self.local is not None:
            data = await self.local.get(key)  # in memory: never fails, never waits
            if data is not None and (value := self._decode(key, data)) is not None:
                return CacheLookup(
                    CacheOutcome.HIT, value=value, key=None, model_id=model_id, ttl_s=ttl, tier="local"
                )
        if not self.circuit.allow():
            return storable
        epoch, started = self._local_epoch, self._clock()
        remaining_s: float | None = None
        try:
            if self.local is None:
                data = await self.backend.get(key)
            else:
                found = await self.backend.get_with_ttl(key)
                data, remaining_s = found if found is not None else (None, None)
        except CacheBackendError as exc:
            self._failed("get", exc)
            return storable
        self.circuit.success()
        if data is not None and (value := self._decode(key, data)) is not None:
            await self._keep(key, data, model_id, remaining_s, epoch, started)
            return CacheLookup(
                CacheOutcome.HIT, value=value, key=None, model_id=model_id, ttl_s=ttl, tier=self.backend.name
            )
        return CacheLookup(CacheOutcome.MISS, key=storable.key, model_id=model_id, ttl_s=ttl)

    def _decode(self, key: str, data: bytes) -> CachedCompletion | None:
        try:
            return decode_completion(data)
        except msgspec.DecodeError as exc:  # written by another version: treat as absent
            logger.warning("unreadable cache entry %s: %s", key[:12], exc)
            self.errors += 1
            return None

    async def _keep(
        self, key: str, data: bytes, model_id: str, remaining_s: float | None, epoch: int, started: float
    ) -> None:
        """Keep a local copy of a value the backend had (or took) at ``started``, with ``remaining_s``
        left then (``None``: unknown, ``local_ttl_s`` alone bounds it). Counted from ``started``, the copy
        expires no later than the backend's entry. Not kept when a local drop happened since ``epoch``."""
        if self.local is None or epoch != self._local_epoch:
            return
        ttl_s = self.local_ttl_s if remaining_s is None else min(self.local_ttl_s, remaining_s)
        ttl_s -= self._clock() - started
        if ttl_s > 0:
            await self.local.set(key, data, ttl_s=ttl_s, model=model_id)

    async def _drop_local(self, model_id: str | None = None) -> None:
        self._local_epoch += 1
        if self.local is not None:
            await (self.local.flush() if model_id is None else self.local.delete_model(model_id))

    async def store(self, lookup: CacheLookup, completion: CachedCompletion) -> bool:
        """Store a finished answer under the lookup's key.

        Returns:
            Whether it was stored: not when the lookup carries no key (hit, bypass, ``no-store``), a
            choice did not finish (``stop``, ``length``, ``tool_calls``, ``function_call``), or the
            backend is unavailable.
        """
        if lookup.key is None or not self.enabled or not self.circuit.allow():
            return False
        if not completion.choices or any(
            c.finish_reason not in STORABLE_FINISH_REASONS for c in completion.choices
        ):
            return False
        data = encode_completion(completion)
        epoch, started = self._local_epoch, self._clock()
        try:
            await self.backend.set(lookup.key, data, ttl_s=lookup.ttl_s, model=lookup.model_id)
        except CacheBackendError as exc:
            self._failed("set", exc)
            return False
        self.circuit.success()
        self.stores += 1
        await self._keep(lookup.key, data, lookup.model_id, lookup.ttl_s, epoch, started)
        return True

    async def invalidate_model(self, model_id: str) -> int | None:
        """Drop a model's entries (call it when the model is loaded again); ``None`` if the backend failed.

        This process's local copies of them go at once, whether or not the backend call succeeds.
        """
        await self._drop_local(model_id)
        try:
            dropped = await self.backend.delete_model(model_id)
        except CacheBackendError as exc:
            self._failed("delete_model", exc)
            return None
        finally:  # a lookup that read the backend during the call keeps no copy
            await self._drop_local(model_id)
        self.circuit.success()
        return dropped

    async def flush(self) -> int:
        """Drop every entry (the admin route); returns how many.

        This process's local copies go at once, whether or not the backend flush succeeds; other
        processes' local copies expire within their ``local_ttl_s``.

        Raises:
            CacheBackendError: the backend failed (the admin should know the flush did not happen).
        """
        await self._drop_local()
        try:
            dropped = await self.backend.flush()
        except CacheBackendError as exc:
            self._failed("flush", exc)
            raise
        finally:  # a lookup that read the backend during the flush keeps no copy
            await self._drop_local()
        self.circuit.success()
        return dropped

    async def stats(self) -> dict[str, Any]:
        """The admin view: backend, enabled, available, entries, bytes, hits, misses, bypasses, errors,
        stores, hit_ratio, local.

        Counters are this process's; ``entries``/``bytes`` are the backend's (``None`` when it failed).
        ``local`` is this process's layer in front of the backend (``ttl_s``, ``entries``, ``bytes``, and
        ``hits``, which ``hits`` includes), ``None`` when it is off.
        """
        entries: int | None = None
        size: int | None = None
        try:
            backend_stats = await self.backend.stats()
        except CacheBackendError as exc:
            self._failed("stats", exc)
        else:
            self.circuit.success()
            entries, size = backend_stats.entries, backend_stats.bytes
        local: dict[str, Any] | None = None
        if self.local is not None:
            local_stats = await self.local.stats()
            local = {
                "ttl_s": self.local_ttl_s,
                "entries": local_stats.entries,
                "bytes": local_stats.bytes,
                "hits": self.local_hits,
            }
        looked_up = self.hits + self.misses
        return {
            "backend": self.backend.name,
            "enabled": self.enabled,
            "available": entries is not None,
            "entries": entries,
            "bytes": size,
            "hits": self.hits,
            "misses": self.misses,
            "bypasses": self.bypasses,
            "errors": self.errors,
            "stores": self.stores,
            "hit_ratio": self.hits / looked_up if looked_up else 0.0,
            "local": local,
        }
