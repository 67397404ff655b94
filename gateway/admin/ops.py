"""Operations routes: ``/admin/metrics``, ``/admin/model/info``, model load/unload, and ``GET /metrics``."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Any

from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from engine.models import ModelManager, ModelRuntime
from engine.registry import load_registry, sha256_file
from gateway.cache.service import ResponseCache
from gateway.errors import ServiceUnavailableError
from gateway.security import requires_admin
from gateway.settings import Settings
from telemetry.setup import PROMETHEUS_CONTENT_TYPE, Telemetry


class FileDigests:
    """SHA-256 of model files, computed once per file version off the event loop."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}
        self._lock = asyncio.Lock()

    async def sha256(self, path: Path) -> str | None:
        """The file's SHA-256 (``None`` when the file is missing)."""
        try:
            stat = await asyncio.to_thread(path.stat)
        except OSError:
            return None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        async with self._lock:
            if key not in self._known:
                self._known[key] = await asyncio.to_thread(sha256_file, path)
            return self._known[key]


def _quantization(runtime: ModelRuntime, registry_quantization: str) -> str | None:
    if registry_quantization:
        return registry_quantization
    if runtime.engine is None:
        return None
    # llama.cpp's model description is "<arch> <size> <file type>", e.g. "llama 135M Q4_1"
    parts = runtime.engine.info.description.split(" ", 2)
    return parts[2] if len(parts) == 3 else None


def upstream_info(runtime: ModelRuntime) -> dict[str, Any]:
    """An upstream model for operators: replicas (URLs, state, counts), timeouts; never its key."""
    model = runtime.settings
    upstream = model.upstream
    assert upstream is not None
    live = runtime.upstream
    replicas = (
        live.status(urls=True)
        if live is not None
        else [{"index": index, "url": url, "state": None} for index, url in enumerate(upstream.urls)]
    )
    return {
        "id": runtime.id,
        "aliases": list(model.aliases),
        "state": runtime.state,
        "error": runtime.error,
        "provider": runtime.provider,
        "upstream": {
            "model": upstream.model or runtime.id,
            "replicas": replicas,
            "api_key_env": upstream.api_key_env,
            "api_key_set": live.api_key_set if live is not None else None,
            "connect_timeout_s": upstream.connect_timeout_s,
            "first_byte_timeout_s": upstream.first_byte_timeout_s,
            "idle_timeout_s": upstream.idle_timeout_s,
            "max_concurrency": upstream.max_concurrency,
            "health_interval_s": upstream.health_interval_s,
            "in_flight": live.running if live is not None else 0,
        },
    }


async def model_info(runtime: ModelRuntime, digests: FileDigests) -> dict[str, Any]:
    """Everything an operator asks about one configured model."""
    if runtime.is_upstream:
        return upstream_info(runtime)
    model = runtime.settings
    entry = load_registry().get(model.source or model.id) if not model.path else None
    try:
        size: int | None = runtime.path.stat().st_size
    except OSError:
        size = None
    info = runtime.engine.info if runtime.engine is not None else None
    template_source = runtime.engine.template_source if runtime.engine is not None else None
    return {
        "id": runtime.id,
        "aliases": list(model.aliases),
        "state": runtime.state,
        "error": runtime.error,
        "provider": runtime.provider,
        "path": str(runtime.path),
        "source": entry.name if entry else None,
        "size_bytes": size,
        "sha256": entry.sha256 if entry else await digests.sha256(runtime.path),
        "quantization": _quantization(runtime, entry.quantization if entry else ""),
        "parameters": info.n_params if info else None,
        "description": info.description if info else None,
        "context": {
            "n_ctx": model.n_ctx,
            "n_ctx_per_slot": runtime.n_ctx_per_slot,
            "n_ctx_train": info.n_ctx_train if info else None,
        },
        "threads": model.n_threads,
        "slots": model.slots,
        "engine": model.engine,
        "embeddings": model.embeddings,
        "chat_template_source": template_source or ("override" if model.chat_template else None),
    }


def model_load(runtime: ModelRuntime) -> dict[str, Any]:
    """A model's state and pool occupancy."""
    pool = runtime.pool
    if runtime.upstream is not None:
        return {"state": runtime.state, "busy": runtime.upstream.running, "queued": 0}
    return {
        "state": runtime.state,
        "slots": runtime.settings.slots,
        "busy": pool.busy if pool else 0,
        "queued": pool.waiting if pool else 0,
    }


class AdminOpsController(Controller):
    """Metrics and model management for operators (admin role or an admin-scoped key)."""

    path = "/admin"
    tags = ["Admin"]
    guards = [requires_admin]

    @get("/metrics", summary="Gateway metrics (JSON)")
    async def metrics(
        self,
        model_manager: NamedDependency[ModelManager],
        telemetry: NamedDependency[Telemetry],
        response_cache: NamedDependency[ResponseCache],
    ) -> dict[str, Any]:
        """Uptime, requests, errors, tokens, latency/TTFT percentiles, per-model slots, cache, system."""
        snapshot = telemetry.metrics.summary.snapshot()
        backend = await response_cache.stats()
        snapshot["cache"] = {
            **snapshot["cache"],
            **{name: backend[name] for name in ("backend", "enabled", "available", "entries", "bytes")},
        }
        return {
            **snapshot,
            "models": {r.id: model_load(r) for r in model_manager.runtimes},
            "kv_cache": {
                r.id: asdict(r.engine.kv_cache_stats())
                for r in model_manager.runtimes
                if r.engine is not None
            },
            "system": await asyncio.to_thread(telemetry.system.snapshot),
        }

    @get("/model/info", summary="Served models")
    async def model_info(
        self, model_manager: NamedDependency[ModelManager], digests: NamedDependency[FileDigests]
    ) -> dict[str, Any]:
        """Every configured model: file, size, sha256, quantization, parameters, context, state."""
        return {"models": [await model_info(r, digests) for r in model_manager.runtimes]}

    @post("/models/{model_id:str}/load", status_code=200, summary="Load a model")
    async def load_model(
        self, model_manager: NamedDependency[ModelManager], model_id: FromPath[str]
    ) -> dict[str, Any]:
        """Load a model (no-op when loaded); 503 naming the error when it cannot be loaded."""
        runtime = model_manager.resolve(model_id)
        if not await model_manager.load(runtime.id):
            raise ServiceUnavailableError(
                f"the model `{runtime.id}` failed to load: {runtime.error}", code="model_load_failed"
            )
        return {"id": runtime.id, **model_load(runtime)}

    @post("/models/{model_id:str}/unload", status_code=200, summary="Unload a model")
    async def unload_model(
        self,
        model_manager: NamedDependency[ModelManager],
        settings: NamedDependency[Settings],
        telemetry: NamedDependency[Telemetry],
        model_id: FromPath[str],
    ) -> dict[str, Any]:
        """Stop taking requests for a model, let its in-flight requests finish, free it.

        Other models keep serving; their requests are not touched.
        """
        runtime = model_manager.resolve(model_id)
        await model_manager.unload(runtime.id, drain_timeout_s=settings.server.drain_timeout_s)
        telemetry.metrics.model_unloaded(runtime.id)
        return {"id": runtime.id, **model_load(runtime)}


def prometheus_route(*, require_admin: bool) -> HTTPRouteHandler:
    """``GET /metrics``: Prometheus text exposition, open or behind the admin guard."""

    @get(
        "/metrics",
        guards=[requires_admin] if require_admin else [],
        media_type=PROMETHEUS_CONTENT_TYPE,
        tags=["Service"],
        summary="Prometheus",
    )
    async def prometheus_metrics(telemetry: NamedDependency[Telemetry]) -> Response[bytes]:
        """Every metric in the Prometheus text format."""
        return Response(telemetry.prometheus_exposition(), media_type=PROMETHEUS_CONTENT_TYPE)

    return prometheus_metrics
