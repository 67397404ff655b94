"""Where cached responses live: the backend protocol and the in-process LRU backend."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class CacheBackendError(Exception):
    """The backend could not do what was asked (unreachable, timed out, bad reply)."""


class CacheCallRefusedError(CacheBackendError):
    """The backend is up but refused this one call (a Redis reply error such as an invalid argument).

    Not an outage: the service counts it without opening its circuit, so one request's bad value can
    never make the shared cache skip everyone else's requests.
    """


@dataclass(frozen=True, slots=True)
class BackendStats:
    """What a backend holds now (expired entries not counted)."""

    entries: int
    bytes: int


class CacheBackend(Protocol):
    """A store of opaque values by key, each with a TTL and the model it belongs to.

    Implementations raise ``CacheBackendError`` (never anything else) when the store fails.
    """

    name: str
    """``"memory"`` or ``"redis"``: shown in the cache stats."""

    async def get(self, key: str) -> bytes | None:
        """The live value under ``key``, or ``None``."""
        ...

    async def get_with_ttl(self, key: str) -> tuple[bytes, float | None] | None:
        """The live value under ``key`` and the seconds it has left (``None`` when the backend cannot
        tell), or ``None`` when there is no live value. One call, as cheap as ``get`` give or take."""
        ...

    async def set(self, key: str, value: bytes, *, ttl_s: float, model: str) -> None:
        """Store ``value`` for ``ttl_s`` seconds as an entry of ``model`` (replaces any old value)."""
        ...

    async def delete_model(self, model: str) -> int:
        """Drop every entry of ``model``; returns how many were dropped."""
        ...

    async def flush(self) -> int:
        """Drop every entry; returns how many were dropped."""
        ...

    async def stats(self) -> BackendStats:
        """Live entries and their value bytes."""
        ...

    async def close(self) -> None:
        """Release connections (the backend is not used afterwards)."""
        ...


@dataclass(slots=True)
class _Entry:
    value: bytes
    expires_at: float
    model: str


class MemoryCacheBackend:
    """An in-process LRU bounded by entry count and value bytes, with per-entry TTL.

    For a single gateway process (no Redis configured). Not shared between processes.
    """

    name = "memory"

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create an empty cache.

        Args:
            max_entries: most entries kept; the least recently used go first.
            max_bytes: most value bytes kept; a single value larger than this is not stored.
            clock: monotonic seconds (injectable for tests).
        """
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= len(entry.value)

    async def get(self, key: str) -> bytes | None:
        """The live value under ``key``, or ``None`` (an expired entry is dropped on the way)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry.value

    async def get_with_ttl(self, key: str) -> tuple[bytes, float | None] | None:
        """The live value under ``key`` and its remaining seconds, or ``None``."""
        value = await self.get(key)
        if value is None:
            return None
        return value, self._entries[key].expires_at - self._clock()

    async def set(self, key: str, value: bytes, *, ttl_s: float, model: str) -> None:
        """Store ``value``, evicting least recently used entries to stay within the bounds."""
        if key in self._entries:
            self._drop(key)
        if len(value) > self._max_bytes or ttl_s <= 0:
            return
        while self._entries and (
            len(self._entries) >= self._max_entries or self._bytes + len(value) > self._max_bytes
        ):
            self._drop(next(iter(self._entries)))
        self._entries[key] = _Entry(value, self._clock() + ttl_s, model)
        self._bytes += len(value)

    async def delete_model(self, model: str) -> int:
        """Drop every entry of ``model``."""
        keys = [key for key, entry in self._entries.items() if entry.model == model]
        for key in keys:
            self._drop(key)
        return len(keys)

    async def flush(self) -> int:
        """Drop every entry."""
        count = len(self._entries)
        self._entries.clear()
        self._bytes = 0
        return count

    async def stats(self) -> BackendStats:
        """Live entries and bytes (expired entries are dropped first)."""
        now = self._clock()
        for key in [key for key, entry in self._entries.items() if entry.expires_at <= now]:
            self._drop(key)
        return BackendStats(len(self._entries), self._bytes)

    async def close(self) -> None:
        """Nothing to release."""
