"""What both llama.cpp engines share: the text facade, the event relay, the embedding context."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import llama_cpp
from llama_cpp import Llama

from engine.base import Cancellation, Finished, GenerationEvent, ModelInfo, ToolPrompt
from engine.llamacpp.model import ModelText, grammar_for_response_format
from engine.tools import FunctionTool, ToolRequest

Emit = Callable[[GenerationEvent | BaseException], None]
logger = logging.getLogger("pocketllm.engine")
_Item = tuple["EventChannel", GenerationEvent | BaseException]


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

    @property
    def tool_format(self) -> Literal["hermes", "generic"]:
        """How tools reach the model: the template's own ``<tool_call>`` format or the generic one."""
        return self._text.tool_format

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[FunctionTool] = (),
        add_generation_prompt: bool = True,
    ) -> str:
        """Apply the chat template."""
        return self._text.render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt)

    def tool_prompt(self, messages: Sequence[Mapping[str, Any]], request: ToolRequest) -> ToolPrompt:
        """Prompt and grammar for a chat request with tools."""
        return self._text.tool_prompt(messages, request)

    def grammar_for(self, kind: str, schema: dict[str, Any] | None) -> str | None:
        """GBNF for a ``response_format``."""
        grammar = grammar_for_response_format(kind, schema)
        if grammar is not None:
            self._text.check_grammar(grammar)
        return grammar


class EventChannel:
    """The path of one generation's events from a worker thread to the event loop that consumes them.

    Calling it (``Emit``) hands one event over at once; an ``Outbox`` collects the events of a whole
    decode step and hands them over together.
    """

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()

    def __call__(self, event: GenerationEvent | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _deliver(items: list[_Item]) -> None:
    for channel, event in items:
        channel.queue.put_nowait(event)


class Outbox:
    """Events a worker thread produced in one step, handed to their event loops with one wake-up each.

    The batched engine emits one token per running sequence per step; waking the event loop once per
    step instead of once per token cuts its wake-ups (four to one with four slots) and lets it do
    that work while the worker is back inside ``llama_decode`` (which releases the GIL) rather than
    between two samples, where the worker waited for the GIL.
    """

    def __init__(self) -> None:
        self._items: list[_Item] = []

    def put(self, channel: EventChannel, event: GenerationEvent | BaseException) -> None:
        """Queue ``event`` for ``channel`` until the next ``flush``."""
        self._items.append((channel, event))

    def flush(self) -> None:
        """Hand every queued event over, one ``call_soon_threadsafe`` per event loop."""
        if not self._items:
            return
        items, self._items = self._items, []
        loops: dict[asyncio.AbstractEventLoop, list[_Item]] = {}
        for item in items:
            loops.setdefault(item[0].loop, []).append(item)
        for loop, batch in loops.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: nobody is left to read these events
                logger.debug("dropped %d events for a closed event loop", len(batch))


async def relay(
    submit: Callable[[EventChannel], None], cancel: Cancellation
) -> AsyncIterator[GenerationEvent]:
    """Hand ``submit`` a channel for a worker thread and yield what it emits on the event loop.

    Ends after ``Finished``; raises an emitted exception; sets ``cancel`` however the iteration ends,
    so closing the iterator early stops the sequence at the worker's next token.
    """
    channel = EventChannel(asyncio.get_running_loop())
    submit(channel)
    try:
        while True:
            event = await channel.queue.get()
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
        # One decode per input: in a batch of several sequences llama.cpp computes some of them
        # (which ones depends on their offsets in the batch) along another kernel path, and their
        # vectors differ from the same text embedded alone by up to 1.6e-3 (issue 15 item 6).
        vectors, total = [], 0
        for text in inputs:
            vector, count = self._llama.embed([text], normalize=True, truncate=False, return_count=True)
            vectors.append(list(map(float, vector[0])))
            total += int(count)
        return vectors, total

    def close(self) -> None:
        """Stop the thread and free the context."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        if self._llama is not None:
            self._llama.close()
            self._llama = None
