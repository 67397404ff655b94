"""The single-sequence engine: one llama.cpp context per slot, each driven by its own thread.

Simple and obviously correct; the reference the batched engine is compared with. Each slot keeps
the KV cache of its last sequence, and llama-cpp-python's ``generate`` reuses the longest common
prefix, so the next turn of a chat on the same slot only processes the new suffix.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import Llama, LogitsProcessorList
from llama_cpp.llama_grammar import LlamaGrammar

from engine.base import (
    Cancellation,
    ContextOverflowError,
    EngineCrashedError,
    EngineError,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationParams,
    ModelInfo,
    TokenEvent,
)
from engine.llamacpp.model import ModelText, check_gguf, grammar_for_response_format, open_llama
from engine.llamacpp.sampling import LogitsProcessor, LogprobCapture, logit_bias_processor
from engine.text import IncrementalDetokenizer, StopMatcher

logger = logging.getLogger("pocketllm.engine")

MIN_PROMPT_SUFFIX = 2
"""Prompt tokens always decoded, however much of the prompt the KV cache holds."""

_Emit = Callable[[GenerationEvent | BaseException], None]


class SequentialEngine:
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
        self._n_threads = n_threads
        self._n_batch = n_batch
        self._contexts: list[Llama] = []
        self._workers: list[ThreadPoolExecutor] = []
        self._embedder: Llama | None = None
        self._embed_worker = ThreadPoolExecutor(1, thread_name_prefix=f"llama-{path.stem}-embed")
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
        first = self._contexts[0]
        self._text = ModelText(first._model, path, size, chat_template, first.n_ctx())
        self._embeddings_enabled = embeddings

    @property
    def info(self) -> ModelInfo:
        """Facts about the loaded model."""
        return self._text.info

    @property
    def slots(self) -> int:
        """Parallel sequences."""
        return len(self._contexts)

    @property
    def template_source(self) -> str:
        """Where the chat template came from: ``gguf``, ``override`` or ``builtin-chatml``."""
        return self._text.template_source

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokenize ``text``."""
        return self._text.tokenize(text, add_special=add_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Tokens back to text."""
        return self._text.detokenize(tokens)

    def render_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Apply the chat template."""
        return self._text.render_chat(messages, add_generation_prompt=add_generation_prompt)

    def check_grammar(self, grammar: str) -> None:
        """Raise ``GrammarError`` if the grammar does not compile."""
        self._text.check_grammar(grammar)

    def grammar_for(self, kind: str, schema: dict[str, Any] | None) -> str | None:
        """GBNF for a ``response_format``."""
        grammar = grammar_for_response_format(kind, schema)
        if grammar is not None:
            self._text.check_grammar(grammar)
        return grammar

    def prefix_match(self, slot: int, prompt: Sequence[int]) -> int:
        """Leading prompt tokens already in the slot's KV cache (read without locking: a hint only)."""
        cached = self._contexts[slot]._input_ids
        limit = min(len(cached), len(prompt))
        matched = 0
        while matched < limit and cached[matched] == prompt[matched]:
            matched += 1
        return matched

    async def generate(
        self, slot: int, prompt: list[int], params: GenerationParams, cancel: Cancellation
    ) -> AsyncIterator[GenerationEvent]:
        """Run one sequence on ``slot``'s thread, relaying its events to the event loop."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()

        def emit(event: GenerationEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        loop.run_in_executor(self._workers[slot], self._run, slot, prompt, params, cancel, emit)
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            cancel.cancel()

    def _run(
        self, slot: int, prompt: list[int], params: GenerationParams, cancel: Cancellation, emit: _Emit
    ) -> None:
        if cancel.cancelled:
            return
        try:
            emit(self._generate(self._contexts[slot], slot, prompt, params, cancel, emit))
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
        emit: _Emit,
    ) -> Finished:
        n_ctx = llm.n_ctx()
        if len(prompt) + params.max_tokens > n_ctx:
            raise ContextOverflowError(len(prompt), params.max_tokens, n_ctx)
        cached = self.prefix_match(slot, prompt)
        if cached > len(prompt) - MIN_PROMPT_SUFFIX:
            # llama.cpp's kernels for a one-token batch round differently from larger batches, so a
            # fully cached prompt re-decodes its last few tokens: greedy output then equals a cold run.
            cached = max(0, len(prompt) - MIN_PROMPT_SUFFIX)
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
            tail += stopper.flush()
            if tail:
                emit(TokenEvent(tail, -1))
        return Finished(finish, len(prompt), produced, cached)

    async def embed(self, inputs: Sequence[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised embeddings from a dedicated embedding context."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._embed_worker, self._embed, list(inputs))

    def _embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        if self._embedder is None:
            self._embedder = Llama(
                str(self._path),
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                n_ctx=self._contexts[0].n_ctx(),
                n_batch=self._contexts[0].n_ctx(),
                n_ubatch=self._contexts[0].n_ctx(),
                n_threads=self._n_threads,
                verbose=False,
            )
        vectors, count = self._embedder.embed(inputs, normalize=True, truncate=False, return_count=True)
        return [list(map(float, vector)) for vector in vectors], int(count)

    @property
    def embeddings_enabled(self) -> bool:
        """Whether this model serves ``/v1/embeddings``."""
        return self._embeddings_enabled

    def close(self) -> None:
        """Stop the slot threads (after their current token) and free the contexts."""
        for worker in self._workers:
            worker.shutdown(wait=True, cancel_futures=True)
        self._embed_worker.shutdown(wait=True, cancel_futures=True)
        for llm in self._contexts:
            llm.close()
        if self._embedder is not None:
            self._embedder.close()
        self._contexts.clear()
        self._workers.clear()
