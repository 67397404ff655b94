"""Which ggml CPU kernels models load with (engine/llamacpp/cpu.py): AMX builds must not crash."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.llamacpp import cpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_choice() -> Iterator[None]:
    cpu.weight_repack.cache_clear()
    yield
    cpu.weight_repack.cache_clear()


@pytest.mark.parametrize(("setting", "expected"), [("on", True), ("off", False), ("OFF", False)])
def test_the_environment_overrides_the_choice(
    fresh_choice: None, monkeypatch: pytest.MonkeyPatch, setting: str, expected: bool
) -> None:
    monkeypatch.setenv("POCKETLLM_WEIGHT_REPACK", setting)
    assert cpu.weight_repack() is expected
    assert cpu.model_params().use_extra_bufts is expected


def test_by_default_repacking_is_off_exactly_where_ggml_has_amx(
    fresh_choice: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POCKETLLM_WEIGHT_REPACK", raising=False)
    assert cpu.weight_repack() is not cpu.ggml_has_amx()


def test_a_llama_context_decodes_in_a_fresh_process(model_path: Path) -> None:
    """llama-cpp-python's ``Llama`` (the sequential engine, embeddings) takes the same defaults.

    On a CPU where ggml's AMX kernels crash, this process dies with SIGSEGV without them.
    """
    script = (
        "import engine.llamacpp\n"
        "from engine.llamacpp import cpu\n"
        "from llama_cpp import Llama, llama_model_default_params\n"
        "assert llama_model_default_params().use_extra_bufts is cpu.weight_repack()\n"
        f"llm = Llama({str(model_path)!r}, n_ctx=256, n_threads=2, verbose=False)\n"
        "out = llm.create_completion('The capital of France is', max_tokens=8, temperature=0)\n"
        "print(out['usage']['completion_tokens'], repr(out['choices'][0]['text']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "POCKETLLM_WEIGHT_REPACK"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    count, text = done.stdout.split(" ", 1)
    assert int(count) > 0
    assert text.strip() not in ("''", "")
