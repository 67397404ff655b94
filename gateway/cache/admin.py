"""Admin routes of the response cache: statistics and flush."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get, post
from litestar.di import NamedDependency

from gateway.cache.backend import CacheBackendError
from gateway.cache.service import ResponseCache
from gateway.errors import ServiceUnavailableError
from gateway.security import requires_admin


class AdminCacheController(Controller):
    """``/admin/cache/*``."""

    path = "/admin/cache"
    tags = ["Admin"]
    guards = [requires_admin]

    @get("/stats", summary="Response cache statistics")
    async def cache_stats(self, response_cache: NamedDependency[ResponseCache]) -> dict[str, Any]:
        """Backend, entries, bytes (``null`` while the backend is unreachable), this process's hits,
        misses, bypasses, errors, stores and hit ratio, and its local layer (``local``: ttl, entries,
        bytes, hits; ``null`` when off)."""
        return await response_cache.stats()

    @post("/flush", status_code=200, summary="Flush the response cache")
    async def cache_flush(self, response_cache: NamedDependency[ResponseCache]) -> dict[str, Any]:
        """Drop every cached response (of every process sharing the backend). This process's local copies
        go at once; another process's stop being answered within its ``cache.local_ttl_s``."""
        try:
            flushed = await response_cache.flush()
        except CacheBackendError:
            raise ServiceUnavailableError(
                "the cache backend is unavailable; nothing was flushed", code="cache_unavailable"
            ) from None
        return {"flushed": flushed}
