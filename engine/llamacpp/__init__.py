"""llama.cpp engines (the only package that imports ``llama_cpp``)."""

from __future__ import annotations

from pathlib import Path

from engine.llamacpp import cpu

cpu.apply()  # before any model loads (see cpu.py: ggml's AMX kernels crash on some CPUs)

from engine.llamacpp.batched import DEFAULT_KV_CACHE_MIB, BatchedEngine  # noqa: E402
from engine.llamacpp.sequential import SequentialEngine  # noqa: E402

ENGINES: dict[str, type[BatchedEngine] | type[SequentialEngine]] = {
    "batched": BatchedEngine,
    "sequential": SequentialEngine,
}


def open_engine(
    path: Path,
    *,
    kind: str,
    slots: int,
    n_ctx_per_slot: int,
    n_threads: int,
    n_batch: int,
    chat_template: str | None,
    embeddings: bool,
    flash_attention: bool = True,
    kv_cache_mib: int = DEFAULT_KV_CACHE_MIB,
) -> BatchedEngine | SequentialEngine:
    """Load ``path`` with the engine ``kind``: ``batched`` (continuous batching) or ``sequential``.

    ``kv_cache_mib`` bounds the batched engine's host-memory cache of sequences that lost their slot
    (0: none); the sequential engine has no such cache.
    """
    extra = {"kv_cache_mib": kv_cache_mib} if kind == "batched" else {}
    return ENGINES[kind](
        path,
        slots=slots,
        n_ctx_per_slot=n_ctx_per_slot,
        n_threads=n_threads,
        n_batch=n_batch,
        chat_template=chat_template,
        embeddings=embeddings,
        flash_attention=flash_attention,
        **extra,
    )
