"""Per-request logits processing for llama-cpp-python's sampler: logit bias and logprob capture."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from engine.base import TopLogprob

Logits = npt.NDArray[np.single]
LogitsProcessor = Callable[[npt.NDArray[np.intc], Logits], Logits]


def logit_bias_processor(bias: dict[int, float]) -> LogitsProcessor:
    """Add OpenAI-style ``logit_bias`` (-100 bans, +100 forces) to the raw logits."""
    ids = np.fromiter(bias.keys(), dtype=np.intc)
    values = np.fromiter(bias.values(), dtype=np.single)

    def apply(_: npt.NDArray[np.intc], scores: Logits) -> Logits:
        scores[ids] += values
        return scores

    return apply


class LogprobCapture:
    """Records the log-softmax of the logits the sampler sees, to report logprobs of the chosen token."""

    __slots__ = ("_logprobs", "top_n")

    def __init__(self, top_n: int) -> None:
        self.top_n = top_n
        self._logprobs: Logits | None = None

    def __call__(self, _: npt.NDArray[np.intc], scores: Logits) -> Logits:
        shifted = scores - scores.max()
        self._logprobs = shifted - np.log(np.exp(shifted).sum())
        return scores

    def lookup(
        self, token: int, piece: Callable[[int], bytes]
    ) -> tuple[float | None, tuple[TopLogprob, ...]]:
        """Logprob of ``token`` and the ``top_n`` alternatives at the step that sampled it."""
        if self._logprobs is None:
            return None, ()
        logprobs = self._logprobs
        chosen = float(logprobs[token])
        if self.top_n <= 0:
            return chosen, ()
        top = np.argpartition(logprobs, -self.top_n)[-self.top_n :]
        top = top[np.argsort(-logprobs[top])]
        alternatives = []
        for candidate in top:
            raw = piece(int(candidate))
            alternatives.append(
                TopLogprob(raw.decode("utf-8", errors="replace"), float(logprobs[candidate]), list(raw))
            )
        return chosen, tuple(alternatives)
