"""The response cache service: policy, tenant scope, outcomes, counters, and surviving a backend outage."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

from gateway.cache.backend import CacheBackend, CacheBackendError, CacheCallRefusedError
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


_BYPASS = CacheLookup(CacheOutcome.BYPASS)


class ResponseCache:
    """Deterministic responses, scoped to the tenant, over one ``CacheBackend``.

    Never raises on a backend failure: the request is answered as a bypass, the failure is counted,
    logged once per outage, and reported to ``on_backend_error``; the backend is skipped for
    ``retry_after_s`` and then tried again.
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

    def scope(self, user: str) -> str:
        """The key scope of a user: their own unless the cache is shared."""
        return "shared" if self.shared_scope else f"user:{user}"

    def count(self, outcome: CacheOutcome) -> None:
        """Count one request's outcome (``lookup`` does, unless told that the caller will)."""
        if outcome is CacheOutcome.HIT:
            self.hits += 1
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
            self.count(found.outcome)
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
        if not policy.read or not self.circuit.allow():
            return storable
        try:
            data = await self.backend.get(key)
        except CacheBackendError as exc:
            self._failed("get", exc)
            return storable
        self.circuit.success()
        if data is not None:
            try:
                value = decode_completion(data)
            except msgspec.DecodeError as exc:  # written by another version: treat as absent
                logger.warning("unreadable cache entry %s: %s", key[:12], exc)
                self.errors += 1
            else:
                return CacheLookup(CacheOutcome.HIT, value=value, key=None, model_id=model_id, ttl_s=ttl)
        return CacheLookup(CacheOutcome.MISS, key=storable.key, model_id=model_id, ttl_s=ttl)

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
        try:
            await self.backend.set(
                lookup.key, encode_completion(completion), ttl_s=lookup.ttl_s, model=lookup.model_id
            )
        except CacheBackendError as exc:
            self._failed("set", exc)
            return False
        self.circuit.success()
        self.stores += 1
        return True

    async def invalidate_model(self, model_id: str) -> int | None:
        """Drop a model's entries (call it when the model is loaded again); ``None`` if the backend failed."""
        try:
            dropped = await self.backend.delete_model(model_id)
        except CacheBackendError as exc:
            self._failed("delete_model", exc)
            return None
        self.circuit.success()
        return dropped

    async def flush(self) -> int:
        """Drop every entry (the admin route); returns how many.

        Raises:
            CacheBackendError: the backend failed (the admin should know the flush did not happen).
        """
        try:
            dropped = await self.backend.flush()
        except CacheBackendError as exc:
            self._failed("flush", exc)
            raise
        self.circuit.success()
        return dropped

    async def stats(self) -> dict[str, Any]:
        """The admin view: backend, enabled, available, entries, bytes, hits, misses, bypasses, errors,
        stores, hit_ratio.

        Counters are this process's; ``entries``/``bytes`` are the backend's (``None`` when it failed).
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
        }
