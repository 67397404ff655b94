"""Which ggml CPU kernels this process uses: decided once, before any model loads.

llama.cpp can repack a model's weights into "extra buffer types" with faster CPU kernels. On a CPU
with AMX (Intel Sapphire Rapids and later), ``pip install llama-cpp-python`` compiles for the native
CPU and so includes ggml's AMX kernels, and on some such machines these crash the process with SIGSEGV
in ``ggml_backend_amx_mul_mat`` at the first decode (llama.cpp issue #20824, open). Seen here: every
decode of SmolLM2 Q4_1 on a 2-core Xeon VM, in llama-cpp-python and in ``llama-server`` alike.
Where ggml was built with AMX, models therefore load with ``use_extra_bufts`` off (plain AVX-512
kernels; ``llama-server --no-repack`` does the same). ``POCKETLLM_WEIGHT_REPACK=on`` turns repacking
back on, ``off`` turns it off everywhere.

llama-cpp-python's ``Llama`` (the sequential engine, the embedding context) takes no parameter for
this, so ``apply`` makes llama-cpp-python's own model defaults carry the choice as well.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as bindings

logger = logging.getLogger("pocketllm.engine")

LIBRARY_DIR = Path(llama_cpp.__file__).parent / "lib"
"""Where llama-cpp-python keeps its shared libraries (libllama, libggml-base, libggml-cpu)."""

_library_defaults = bindings.llama_model_default_params


def ggml_has_amx() -> bool:
    """Whether the ggml CPU backend in use was compiled with its AMX kernels."""
    try:
        cpu = ctypes.CDLL(str(LIBRARY_DIR / "libggml-cpu.so"))
        has_amx = cpu.ggml_cpu_has_amx_int8
    except (OSError, AttributeError):
        return False
    has_amx.argtypes = []
    has_amx.restype = ctypes.c_int
    return bool(has_amx())


@functools.cache
def weight_repack() -> bool:
    """Whether models load with llama.cpp's extra (repacked-weight) buffer types."""
    setting = os.environ.get("POCKETLLM_WEIGHT_REPACK", "auto").strip().lower()
    if setting in ("on", "1", "true"):
        return True
    if setting in ("off", "0", "false"):
        return False
    if ggml_has_amx():
        logger.info(
            "ggml was built with AMX kernels, which crash on some CPUs (llama.cpp #20824): "
            "weights load without repacking (POCKETLLM_WEIGHT_REPACK=on enables it)"
        )
        return False
    return True


def model_params() -> llama_cpp.llama_model_params:
    """llama.cpp's default model parameters with this process's repacking choice."""
    params: llama_cpp.llama_model_params = _library_defaults()
    params.use_extra_bufts = weight_repack()
    return params


def apply() -> None:
    """Make every model that llama-cpp-python loads in this process follow ``weight_repack``."""
    bindings.llama_model_default_params = model_params
    llama_cpp.llama_model_default_params = model_params
