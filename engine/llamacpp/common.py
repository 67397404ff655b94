"""What both llama.cpp engines share: the text facade, the event relay, the embedding context."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import Llama

from engine.base import Cancellation, Finished, GenerationEvent, ModelInfo
from engine.llamacpp.model import ModelText, grammar_for_response_format

Emit = Callable[[GenerationEvent | BaseException], None]


class TextFacade:
    """The engine methods that only need the model's vocabulary and chat template."""

    _text: ModelText

    @property
    def info(self) -> ModelInfo:
        """Facts about the loaded model."""
        return self._text.info

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


async def relay(submit: Callable[[Emit], None], cancel: Cancellation) -> AsyncIterator[GenerationEvent]:
    """Hand ``submit`` an ``emit`` callback for a worker thread and yield what it emits on the event loop.

    Ends after ``Finished``; raises an emitted exception; sets ``cancel`` however the iteration ends,
    so closing the iterator early stops the sequence at the worker's next token.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()

    def emit(event: GenerationEvent | BaseException) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    submit(emit)
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


class Embedder:
    """Mean-pooled, L2-normalised embeddings from an embedding-mode context, created on first use."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int, enabled: bool) -> None:
        self._path = path
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self.enabled = enabled
        self._llama: Llama | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"llama-{path.stem}-embed")

    async def embed(self, inputs: Sequence[str]) -> tuple[list[list[float]], int]:
        """One vector per input and the tokens they used."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._embed, list(inputs))

    def _embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        if self._llama is None:
            self._llama = Llama(
                str(self._path),
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                n_ctx=self._n_ctx,
                n_batch=self._n_ctx,
                n_ubatch=self._n_ctx,
                n_threads=self._n_threads,
                verbose=False,
            )
        vectors, count = self._llama.embed(inputs, normalize=True, truncate=False, return_count=True)
        return [list(map(float, vector)) for vector in vectors], int(count)

    def close(self) -> None:
        """Stop the thread and free the context."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        if self._llama is not None:
            self._llama.close()
            self._llama = None
