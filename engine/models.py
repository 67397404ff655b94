"""The served models at run time (model lifecycle): load, look up by id or alias, unload and drain;
each with its engine and slot pool."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.base import Engine, EngineError
from engine.config import ModelSettings, QueueSettings
from engine.llamacpp import open_engine
from engine.llamacpp.model import check_gguf
from engine.pool import PoolObserver, SlotPool
from engine.registry import load_registry
from engine.upstream.model import PROVIDER as UPSTREAM_PROVIDER
from engine.upstream.model import UpstreamModel

logger = logging.getLogger("pocketllm.models")
LOCAL_PROVIDER = "llama.cpp"

ModelState = Literal["loading", "ready", "failed", "unloading", "unloaded"]


class UnknownModelError(EngineError, LookupError):
    """No configured model has this id or alias."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class ModelNotReadyError(EngineError):
    """The model is configured but not loaded (loading, failed, unloading or unloaded)."""

    retry_after = 5


@dataclass(eq=False)
class ModelRuntime:
    """One configured model and, once loaded, its engine and slot pool."""

    settings: ModelSettings
    path: Path
    created: int = field(default_factory=lambda: int(time.time()))
    state: ModelState = "unloaded"
    error: str | None = None
    engine: Engine | None = None
    pool: SlotPool | None = None
    embed_pool: SlotPool | None = None
    """One turn at a time on the embedding context, with the same bounded FIFO queue and wait limit."""
    digest: str = ""
    """Identifies the exact weights (registry sha256, else a digest of path, size and mtime)."""
    loads: int = 0
    """Successful loads in this process (more than one: it was reloaded)."""
    upstream: UpstreamModel | None = None
    """An upstream model's client, replicas and health checks, once loaded (no engine, no pools)."""

    @property
    def is_upstream(self) -> bool:
        """Whether remote replicas serve this model (``settings.upstream``)."""
        return self.settings.upstream is not None

    @property
    def provider(self) -> str:
        """``gen_ai.provider.name``: ``llama.cpp`` here, ``openai`` for an OpenAI-compatible upstream."""
        return UPSTREAM_PROVIDER if self.is_upstream else LOCAL_PROVIDER

    @property
    def id(self) -> str:
        """The model id clients use."""
        return self.settings.id

    @property
    def n_ctx_per_slot(self) -> int:
        """Context window of one request."""
        return self.settings.n_ctx // self.settings.slots

    @property
    def pools(self) -> list[SlotPool]:
        """The generation and embedding pools of a loaded model."""
        return [pool for pool in (self.pool, self.embed_pool) if pool is not None]

    def check_ready(self) -> None:
        """``ModelNotReadyError`` unless the model (local or upstream) is loaded."""
        if self.state != "ready":
            raise ModelNotReadyError(f"the model `{self.id}` is {self.state}")

    def ready(self) -> tuple[Engine, SlotPool]:
        """The engine and pool of a local model; ``ModelNotReadyError`` when it is not loaded."""
        if self.state != "ready" or self.engine is None or self.pool is None:
            raise ModelNotReadyError(f"the model `{self.id}` is {self.state}")
        return self.engine, self.pool

    def ready_upstream(self) -> UpstreamModel:
        """The upstream of an upstream model; ``ModelNotReadyError`` when it is not loaded."""
        if self.state != "ready" or self.upstream is None:
            raise ModelNotReadyError(f"the model `{self.id}` is {self.state}")
        return self.upstream


class ModelManager:
    """All configured models."""

    def __init__(
        self,
        models: list[tuple[ModelSettings, Path]],
        queue: QueueSettings,
        observer: PoolObserver | None = None,
        on_reload: Callable[[str], Awaitable[Any]] | None = None,
        on_loaded: Callable[[str, Engine], None] | None = None,
    ) -> None:
        """Configure the models (nothing is loaded yet).

        Args:
            models: each model's settings and the path of its GGUF file.
            queue: admission to every model's slots.
            observer: the pools' metrics observer.
            on_loaded: called with a model's id and engine each time it is loaded (metrics).
            on_reload: awaited with a model's id each time it is loaded again (not the first time), e.g.
                to drop its cached responses.
        """
        self._queue = queue
        self._observer = observer
        self._on_reload = on_reload
        self._on_loaded = on_loaded
        self._runtimes: dict[str, ModelRuntime] = {}
        self._names: dict[str, ModelRuntime] = {}
        registry = load_registry()
        for model, path in models:
            runtime = ModelRuntime(model, path)
            source = registry.get(model.source or model.id) if not model.path and not model.upstream else None
            runtime.digest = source.sha256 if source else ""
            self._runtimes[model.id] = runtime
            for name in (model.id, *model.aliases):
                self._names[name] = runtime
        self._lock = asyncio.Lock()

    @property
    def runtimes(self) -> list[ModelRuntime]:
        """Every configured model, in configuration order."""
        return list(self._runtimes.values())

    def resolve(self, name: str) -> ModelRuntime:
        """The model with this id or alias; ``UnknownModelError`` otherwise."""
        runtime = self._names.get(name)
        if runtime is None:
            raise UnknownModelError(name)
        return runtime

    @property
    def all_ready(self) -> bool:
        """Whether every configured model is loaded."""
        return all(r.state == "ready" for r in self._runtimes.values())

    async def load_all(self) -> list[ModelRuntime]:
        """Load every model (one after another, off the event loop); returns those that failed."""
        failed = []
        for runtime in self._runtimes.values():
            if not await self.load(runtime.id):
                failed.append(runtime)
        return failed

    async def load(self, model_id: str) -> bool:
        """Load one model; ``False`` (state ``failed``, error logged) when it cannot be loaded."""
        runtime = self.resolve(model_id)
        async with self._lock:
            if runtime.state == "ready":
                return True
            runtime.state, runtime.error = "loading", None
            if runtime.settings.upstream is not None:
                return await self._open_upstream(runtime)
            started = time.perf_counter()
            try:
                engine = await asyncio.to_thread(self._open, runtime)
            except EngineError as exc:
                runtime.state, runtime.error = "failed", str(exc)
                logger.error("model %s failed to load: %s", runtime.id, exc)
                return False
            except Exception as exc:  # a bug, not a bad file: keep the traceback in the log
                runtime.state, runtime.error = "failed", f"internal error: {type(exc).__name__}"
                logger.exception("model %s failed to load", runtime.id)
                return False
            runtime.engine = engine
            runtime.pool = SlotPool(
                runtime.id,
                engine.slots,
                max_queue=self._queue.max_queue,
                max_wait_s=self._queue.max_wait_s,
                prefix_match=engine.prefix_match,
                observer=self._observer,
            )
            runtime.embed_pool = SlotPool(
                f"{runtime.id}/embeddings",
                1,
                max_queue=self._queue.max_queue,
                max_wait_s=self._queue.max_wait_s,
                observer=self._observer,
            )
            runtime.state = "ready"
            runtime.loads += 1
            if self._on_loaded is not None:
                self._on_loaded(runtime.id, engine)
            if runtime.loads > 1 and self._on_reload is not None:
                await self._on_reload(runtime.id)
            logger.info(
                "model %s loaded from %s in %.1fs (%d slots x %d tokens, %d threads, engine %s)",
                runtime.id,
                runtime.path,
                time.perf_counter() - started,
                engine.slots,
                runtime.n_ctx_per_slot,
                runtime.settings.n_threads,
                runtime.settings.engine,
            )
            return True

    async def _open_upstream(self, runtime: ModelRuntime) -> bool:
        """An upstream model is ready once its client and health checks run (replicas need not answer yet:
        the health checks and the first requests find out)."""
        assert runtime.settings.upstream is not None
        try:
            upstream = UpstreamModel(runtime.id, runtime.settings.upstream, max_wait_s=self._queue.max_wait_s)
        except EngineError as exc:
            runtime.state, runtime.error = "failed", str(exc)
            logger.error("model %s failed to load: %s", runtime.id, exc)
            return False
        await upstream.start()
        runtime.upstream, runtime.digest = upstream, upstream.digest
        runtime.state = "ready"
        runtime.loads += 1
        if runtime.loads > 1 and self._on_reload is not None:
            await self._on_reload(runtime.id)
        logger.info(
            "model %s served by %d upstream replica(s) as %r",
            runtime.id,
            len(upstream.replicas.replicas),
            upstream.upstream_model,
        )
        return True

    def _open(self, runtime: ModelRuntime) -> Engine:
        model = runtime.settings
        size = check_gguf(runtime.path)
        if not runtime.digest:
            stat = runtime.path.stat()
            runtime.digest = hashlib.sha256(
                f"{runtime.path.resolve()}:{size}:{stat.st_mtime_ns}".encode()
            ).hexdigest()
        return open_engine(
            runtime.path,
            kind=model.engine,
            slots=model.slots,
            n_ctx_per_slot=runtime.n_ctx_per_slot,
            n_threads=model.n_threads,
            n_batch=model.n_batch,
            chat_template=model.chat_template,
            embeddings=model.embeddings,
            flash_attention=model.flash_attention,
            kv_cache_mib=model.kv_cache_mib,
        )

    async def unload(self, model_id: str, *, drain_timeout_s: float = 30.0) -> None:
        """Stop taking requests for a model, let in-flight ones finish (bounded), then free it."""
        runtime = self.resolve(model_id)
        async with self._lock:
            if runtime.upstream is not None:
                runtime.state = "unloading"
                upstream = runtime.upstream
                try:
                    async with asyncio.timeout(drain_timeout_s):
                        await upstream.drained()
                except TimeoutError:
                    logger.warning("model %s: unloading with requests still in flight", runtime.id)
                upstream.abort(f"the model {runtime.id} was unloaded")
                await upstream.close()
                runtime.upstream, runtime.state = None, "unloaded"
                logger.info("model %s unloaded", runtime.id)
                return
            if runtime.state != "ready" or runtime.engine is None or runtime.pool is None:
                runtime.state = "unloaded"
                return
            runtime.state = "unloading"
            engine = runtime.engine
            try:
                async with asyncio.timeout(drain_timeout_s):
                    for pool in runtime.pools:
                        await pool.drained()
            except TimeoutError:
                logger.warning("model %s: unloading with requests still in flight", runtime.id)
            await asyncio.to_thread(engine.close)
            runtime.engine = runtime.pool = runtime.embed_pool = None
            runtime.state = "unloaded"
            logger.info("model %s unloaded", runtime.id)

    async def drained(self) -> None:
        """Return once no model has a request running or queued."""
        for runtime in self._runtimes.values():
            for pool in runtime.pools:
                await pool.drained()
            if runtime.upstream is not None:
                await runtime.upstream.drained()

    def abort(self, reason: str) -> None:
        """Fail every queued request and stop running ones at their next token (shutdown)."""
        for runtime in self._runtimes.values():
            for pool in runtime.pools:
                pool.abort(reason)
            if runtime.upstream is not None:
                runtime.upstream.abort(reason)

    async def close(self) -> None:
        """Free every engine."""
        for runtime in self._runtimes.values():
            if runtime.upstream is not None:
                await runtime.upstream.close()
                runtime.upstream, runtime.state = None, "unloaded"
            if runtime.engine is not None:
                await asyncio.to_thread(runtime.engine.close)
                runtime.engine = runtime.pool = runtime.embed_pool = None
                runtime.state = "unloaded"
