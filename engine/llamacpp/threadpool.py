"""A persistent ggml CPU threadpool attached to a llama.cpp context (as llama-server does).

Without one, every ``llama_decode`` spins up a disposable pool of worker threads; on a busy machine
that costs a great deal (measured here: 13-26 tokens/s against ~145 with a persistent pool under the
same competing load). llama-cpp-python has no binding for it, so this calls the shared libraries it
ships through ctypes, and quietly does nothing where the symbols are missing.
"""

from __future__ import annotations

import ctypes
import logging

from engine.llamacpp.cpu import LIBRARY_DIR

logger = logging.getLogger("pocketllm.engine")

GGML_MAX_N_THREADS = 512


class _ThreadpoolParams(ctypes.Structure):
    """``struct ggml_threadpool_params`` of ggml.h."""

    _fields_ = (
        ("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    )


def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL, ctypes.CDLL] | None:
    lib = LIBRARY_DIR
    try:
        base = ctypes.CDLL(str(lib / "libggml-base.so"))
        cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"))
        llama = ctypes.CDLL(str(lib / "libllama.so"))
        base.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_ThreadpoolParams), ctypes.c_int]
        base.ggml_threadpool_params_init.restype = None
        cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(_ThreadpoolParams)]
        cpu.ggml_threadpool_new.restype = ctypes.c_void_p
        cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
        cpu.ggml_threadpool_free.restype = None
        llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        llama.llama_attach_threadpool.restype = None
        llama.llama_detach_threadpool.argtypes = [ctypes.c_void_p]
        llama.llama_detach_threadpool.restype = None
    except (OSError, AttributeError):
        return None
    return base, cpu, llama


class Threadpool:
    """One persistent pool of ``n_threads`` ggml workers, attached to a context until ``close``."""

    def __init__(self, context: int, n_threads: int) -> None:
        self._context = context
        self._pool: int | None = None
        self._libraries = _libraries()
        if self._libraries is None:
            logger.info("no ggml threadpool API in this llama-cpp-python; decoding uses per-call threads")
            return
        base, cpu, llama = self._libraries
        params = _ThreadpoolParams()
        base.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
        pool = cpu.ggml_threadpool_new(ctypes.byref(params))
        if not pool:
            logger.warning("ggml_threadpool_new failed; decoding uses per-call threads")
            return
        llama.llama_attach_threadpool(context, pool, pool)
        self._pool = pool

    def close(self) -> None:
        """Detach from the context (before the context is freed) and free the pool; idempotent."""
        if self._pool is None or self._libraries is None:
            return
        _, cpu, llama = self._libraries
        llama.llama_detach_threadpool(self._context)
        cpu.ggml_threadpool_free(self._pool)
        self._pool = None
