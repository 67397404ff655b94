"""The single-sequence engine: one llama.cpp context per slot, each driven by its own thread.

Simple and obviously correct; the reference the batched engine is compared with. Each slot keeps
the KV cache of its last sequence, and llama-cpp-python's ``generate`` reuses the longest common
prefix, so the next turn of a chat on the same slot only processes the new suffix.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llama_cpp import Llama, LogitsProcessorList
from llama_cpp.llama_grammar import LlamaGrammar

from engine.base import (
    CacheScope,
    Cancellation,
    ContextOverflowError,
    EngineCrashedError,
    EngineError,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationParams,
    KVCacheStats,
    TokenEvent,
)
from engine.llamacpp.common import Embedder, Emit, TextFacade, relay
from engine.llamacpp.model import ModelText, check_gguf, open_llama
from engine.llamacpp.sampling import LogitsProcessor, LogprobCapture, logit_bias_processor
from engine.text import IncrementalDetokenizer, StopMatcher

logger = logging.getLogger("pocketllm.engine")

MIN_PROMPT_SUFFIX = 2
"""Prompt tokens always decoded, however much of the prompt the KV cache holds."""


class SequentialEngine(TextFacade):
    """``slots`` independent llama.cpp contexts over one GGUF file."""

    def __init__(
        self,
        path: Path,
        *,
        slots: int,
        n_ctx_per_slot: int,
        n_threads: int,
        n_batch: int = 512,
        chat_template: str | None = None,
        embeddings: bool = True,
        flash_attention: bool = True,
    ) -> None:
        size = check_gguf(path)
        self._path = path
        self._contexts: list[Llama] = []
        self._workers: list[ThreadPoolExecutor] = []
        self._embeddings = Embedder(path, n_ctx=n_ctx_per_slot, n_threads=n_threads, enabled=embeddings)
        try:
            for index in range(slots):
                self._contexts.append(
                    open_llama(
                        path,
                        n_ctx=n_ctx_per_slot,
                        n_threads=n_threads,
                        n_batch=n_batch,
                        flash_attention=flash_attention,
                    )
                )
                self._workers.append(ThreadPoolExecutor(1, thread_name_prefix=f"llama-{path.stem}-{index}"))
        except EngineError:
            self.close()
            raise
        self._owner: list[str | None] = [None] * slots
        """The tenant whose request last ran on each slot."""
        first = self._contexts[0]
        self._text = ModelText(first._model, path, size, chat_template, first.n_ctx())

    @property
    def slots(self) -> int:
        """Parallel sequences."""
        return len(self._contexts)

    def prefix_match(self, slot: int, prompt: Sequence[int]) -> int:
        """Leading prompt tokens already in the slot's KV cache (read without locking: a hint only)."""
        cached = self._contexts[slot]._input_ids
        limit = min(len(cached), len(prompt))
        matched = 0
        while matched < limit and cached[matched] == prompt[matched]:
            matched += 1
        return matched

    def kv_cache_stats(self) -> KVCacheStats:
        """This engine keeps no KV state outside its slots: all zero."""
        return KVCacheStats()

    def generate(
        self,
        slot: int,
        prompt: list[int],
        params: GenerationParams,
        cancel: Cancellation,
        scope: CacheScope | None = None,
    ) -> AsyncIterator[GenerationEvent]:
        """Run one sequence on ``slot``'s thread, relaying its events to the event loop."""
        loop = asyncio.get_running_loop()
        scope = scope or CacheScope()

        def submit(emit: Emit) -> None:
            loop.run_in_executor(self._workers[slot], self._run, slot, prompt, params, cancel, scope, emit)

        return relay(submit, cancel)

    def _run(
        self,
        slot: int,
        prompt: list[int],
        params: GenerationParams,
        cancel: Cancellation,
        scope: CacheScope,
        emit: Emit,
    ) -> None:
        if cancel.cancelled:
            return
        try:
            emit(self._generate(self._contexts[slot], slot, prompt, params, cancel, scope, emit))
        except EngineError as exc:
            emit(exc)
        except Exception as exc:  # the worker thread must never die silently
            logger.exception("generation failed on %s slot %d", self._path.name, slot)
            emit(EngineCrashedError(str(exc)))

    def _generate(
        self,
        llm: Llama,
        slot: int,
        prompt: list[int],
        params: GenerationParams,
        cancel: Cancellation,
        scope: CacheScope,
        emit: Emit,
    ) -> Finished:
        n_ctx = llm.n_ctx()
        if len(prompt) + params.max_tokens > n_ctx:
            raise ContextOverflowError(len(prompt), params.max_tokens, n_ctx)
        cached = self.prefix_match(slot, prompt)
        if self._owner[slot] != scope.tenant:
            cached = min(cached, scope.shared_prefix)  # another tenant's sequence: the shared part only
        self._owner[slot] = scope.tenant
        # llama.cpp's kernels for a one-token batch round differently from larger batches, so a
        # fully cached prompt re-decodes its last few tokens: greedy output then equals a cold run.
        cached = min(cached, max(0, len(prompt) - MIN_PROMPT_SUFFIX))
        llm.n_tokens = min(llm.n_tokens, cached)
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        processors: list[LogitsProcessor] = []
        if params.logit_bias:
            processors.append(logit_bias_processor(params.logit_bias))
        capture = LogprobCapture(params.top_logprobs) if params.logprobs else None
        if capture is not None:
            processors.append(capture)
        grammar = LlamaGrammar.from_string(params.grammar, verbose=False) if params.grammar else None
        text = self._text
        detokenizer = IncrementalDetokenizer()
        stopper = StopMatcher(params.stop)
        finish: FinishReason = "length"
        produced = 0
        tokens = llm.generate(
            prompt,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            logits_processor=LogitsProcessorList(processors) if processors else None,
            grammar=grammar,
        )
        try:
            for token in tokens:
                if cancel.cancelled:
                    break
                if text.is_eog(token):
                    finish = "stop"
                    break
                produced += 1
                piece = text.piece(token)
                released, stopped = stopper.feed(detokenizer.feed(piece))
                logprob, top = capture.lookup(token, text.piece) if capture else (None, ())
                emit(TokenEvent(released, token, piece, logprob, top))
                if stopped:
                    finish = "stop"
                    break
                if produced >= params.max_tokens:
                    break
        finally:
            tokens.close()
        if finish == "length" or not params.stop:
            tail, _ = stopper.feed(detokenizer.flush())
            tail += stopper.flush()[0]
            if tail:
                emit(TokenEvent(tail, -1))
        return Finished(finish, len(prompt), produced, cached)

    async def embed(self, inputs: Sequence[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised embeddings from a dedicated embedding context."""
        return await self._embeddings.embed(inputs)

    @property
    def embeddings_enabled(self) -> bool:
        """Whether this model serves ``/v1/embeddings``."""
        return self._embeddings.enabled

    def close(self) -> None:
        """Stop the slot threads (after their current token) and free the contexts."""
        for worker in self._workers:
            worker.shutdown(wait=True, cancel_futures=True)
        self._embeddings.close()
        for llm in self._contexts:
            llm.close()
        self._contexts.clear()
        self._workers.clear()
