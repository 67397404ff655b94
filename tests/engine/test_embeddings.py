"""Embeddings on the real model: a batch gives each input the vector it gets alone (issue 15 item 6)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engine.llamacpp.common import Embedder

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def embedder(model_path: Path) -> Iterator[Embedder]:
    embedder = Embedder(model_path, n_ctx=1024, n_threads=2, enabled=True)
    yield embedder
    embedder.close()


def _embed(embedder: Embedder, inputs: list[str]) -> tuple[np.ndarray, int]:
    vectors, tokens = asyncio.run(embedder.embed(inputs))
    return np.array(vectors), tokens


@pytest.mark.parametrize("size", [3, 4, 5, 8])
def test_identical_inputs_in_a_batch_equal_the_single_input_vector(embedder: Embedder, size: int) -> None:
    single, tokens = _embed(embedder, [TEXT])
    batch, batch_tokens = _embed(embedder, [TEXT] * size)
    assert batch_tokens == tokens * size
    assert np.abs(batch - single[0]).max() <= 1e-6
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_each_input_of_a_mixed_batch_equals_its_own_vector(embedder: Embedder) -> None:
    inputs = ["a", TEXT, "another text here, a little longer than the first", TEXT, "z" * 40]
    batch, _ = _embed(embedder, inputs)
    for text, vector in zip(inputs, batch, strict=True):
        alone, _ = _embed(embedder, [text])
        assert np.abs(vector - alone[0]).max() <= 1e-6
    assert np.abs(batch[0] - batch[1]).max() > 1e-2  # different texts still differ
