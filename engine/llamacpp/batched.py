"""Continuous batching: every slot is a sequence of one llama.cpp context, driven by one thread.

Each decode step carries one token for every running sequence plus prompt chunks of newly admitted
ones, so a request starts at the next step instead of waiting for others to finish, and the weights
are read once per step for all sequences (on a CPU, decoding is memory-bound: that is the win).
Every sequence keeps its own sampler chain (its temperature, penalties, seed, grammar, logit bias).
Each slot's sequence keeps its KV cache after a request; the next request on that slot only decodes
what differs from the cached tokens (the same chat session, the same system prompt). A sequence that
loses its slot to another request is kept in a bounded host-memory cache (``engine.kvcache``) and
restored into whichever slot its next request gets; when the engine is idle, the slots' sequences
are copied there ahead of time, so a request that replaces one does not wait for the copy.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaContext, LlamaModel, LlamaSampler
from llama_cpp._logger import set_verbose as set_llama_verbose

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
    GrammarError,
    KVCacheStats,
    ModelLoadError,
    TokenEvent,
    TopLogprob,
)
from engine.kvcache import DEFAULT_POOL_MIB, Entry, HostKVCache, State
from engine.llamacpp.common import Embedder, EventChannel, Outbox, TextFacade, relay
from engine.llamacpp.cpu import model_params
from engine.llamacpp.model import ModelText, check_gguf
from engine.llamacpp.threadpool import Threadpool
from engine.text import IncrementalDetokenizer, StopMatcher

logger = logging.getLogger("pocketllm.engine")

MIN_PROMPT_SUFFIX = 2
"""Prompt tokens always decoded, however much of the prompt a slot caches (see sequential.py)."""
PENALTY_LAST_N = 64
MIN_RESTORE_GAIN = 16
"""A kept sequence is restored only when it supplies at least this many more tokens than the slot."""
DEFAULT_KV_CACHE_MIB = DEFAULT_POOL_MIB


@dataclass(eq=False)
class _Job:
    """One sequence from admission to its last token."""

    slot: int
    prompt: list[int]
    params: GenerationParams
    cancel: Cancellation
    channel: EventChannel
    scope: CacheScope = field(default_factory=CacheScope)
    sampler: LlamaSampler | None = None
    """``None`` for plain greedy: the best logit is picked in numpy (see ``_argmax``)."""
    pending: list[int] = field(default_factory=list)
    """Prompt tokens not decoded yet."""
    next_token: int | None = None
    """The last sampled token, decoded at the next step."""
    row: int = -1
    """Where this sequence's logits are in the current batch (-1: none this step)."""
    produced: int = 0
    cached: int = 0
    detokenizer: IncrementalDetokenizer = field(default_factory=IncrementalDetokenizer)
    stopper: StopMatcher | None = None


def _is_plain_greedy(params: GenerationParams) -> bool:
    """Greedy with nothing that needs a sampler's state: no grammar, no repetition penalties."""
    return (
        params.temperature <= 0.0
        and not params.grammar
        and params.repeat_penalty == 1.0
        and params.frequency_penalty == 0.0
        and params.presence_penalty == 0.0
    )


def plan_step(running: dict[int, _Job], n_batch: int) -> list[tuple[_Job, list[int]]]:
    """What each running sequence puts into the next decode step, in slot (sequence id) order.

    A generating sequence puts its last sampled token; a sequence still reading its prompt puts the
    next chunk of it (taken off ``pending``), within what the generating ones leave of ``n_batch``.

    The order matters: with one KV stream per slot, llama.cpp splits a batch into micro-batches of
    *consecutive* sequence ids, each a full pass over the weights. Slots 0-1-2-3 in that order take
    one pass; the same four as 2-0-3-1 take two and as 3-2-1-0 four (measured on this model: 30
    against 42 and 47 ms per step), which is what admission order made of the batch before.
    """
    jobs = [running[slot] for slot in sorted(running)]
    budget = n_batch - sum(job.next_token is not None for job in jobs)
    plan: list[tuple[_Job, list[int]]] = []
    for job in jobs:
        if job.next_token is not None:
            plan.append((job, [job.next_token]))
        elif job.pending and budget > 0:
            chunk, job.pending = job.pending[:budget], job.pending[budget:]
            budget -= len(chunk)
            plan.append((job, chunk))
    return plan


class BatchedEngine(TextFacade):
    """All slots of one model in one llama.cpp context, stepped together by one worker thread."""

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
        kv_cache_mib: int = DEFAULT_KV_CACHE_MIB,
    ) -> None:
        """Load the model; ``kv_cache_mib`` bounds the host-memory KV cache (0 turns it off)."""
        size = check_gguf(path)
        set_llama_verbose(os.environ.get("POCKETLLM_LLAMA_VERBOSE") == "1")
        self._path = path
        self._n_ctx_per_slot = n_ctx_per_slot
        self._n_batch = n_batch
        self._slots = slots
        try:
            self._model = LlamaModel(path_model=str(path), params=model_params(), verbose=False)
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = slots * n_ctx_per_slot
            params.n_batch = n_batch
            params.n_ubatch = n_batch
            params.n_seq_max = slots
            params.n_threads = n_threads
            params.n_threads_batch = n_threads
            params.kv_unified = False  # one KV stream per slot: no fragmentation across slots
            params.no_perf = True
            params.flash_attn_type = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if flash_attention
                else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            self._ctx = LlamaContext(model=self._model, params=params, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(
                f"model file {path} could not be loaded (corrupt or unsupported): {exc}"
            ) from None
        self._threadpool = Threadpool(self._ctx.ctx, n_threads)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._n_vocab = self._model.n_vocab()
        self._text = ModelText(self._model, path, size, chat_template, n_ctx_per_slot)
        self._cache: list[list[int]] = [[] for _ in range(slots)]
        self._owner: list[str | None] = [None] * slots
        """The tenant whose request last ran on each slot (its sequence is that tenant's)."""
        self._host = HostKVCache(kv_cache_mib * 1024 * 1024) if kv_cache_mib > 0 else None
        self._unsaved: set[int] = set()
        """Slots whose sequence grew since the host cache last got a copy of it."""
        self._cache_lock = threading.Lock()
        self._running: dict[int, _Job] = {}
        self._deferred: dict[int, list[_Job]] = {}
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._outbox = Outbox()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=f"llama-{path.stem}-batch", daemon=True)
        self._worker.start()
        self._embeddings = Embedder(path, n_ctx=n_ctx_per_slot, n_threads=n_threads, enabled=embeddings)

    # -- facts and text ------------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        """Parallel sequences."""
        return self._slots

    @property
    def embeddings_enabled(self) -> bool:
        """Whether this model serves embeddings."""
        return self._embeddings.enabled

    def prefix_match(self, slot: int, prompt: Sequence[int]) -> int:
        """Leading prompt tokens the slot's sequence holds in the KV cache."""
        with self._cache_lock:
            cached = self._cache[slot]
            limit = min(len(cached), len(prompt))
            matched = 0
            while matched < limit and cached[matched] == prompt[matched]:
                matched += 1
        return matched

    # -- generation ----------------------------------------------------------------------------------

    def kv_cache_stats(self) -> KVCacheStats:
        """Size and counters of the host-memory KV cache."""
        return self._host.stats() if self._host is not None else KVCacheStats()

    def generate(
        self,
        slot: int,
        prompt: list[int],
        params: GenerationParams,
        cancel: Cancellation,
        scope: CacheScope | None = None,
    ) -> AsyncIterator[GenerationEvent]:
        """Queue a sequence for the decode loop and relay its events to the event loop."""
        if self._closed:
            raise EngineCrashedError("the engine is closed")
        scope = scope or CacheScope()
        return relay(
            lambda channel: self._inbox.put(_Job(slot, prompt, params, cancel, channel, scope)), cancel
        )

    def _loop(self) -> None:
        try:
            while True:
                block = not self._running
                if block and self._unsaved and self._inbox.empty():
                    self._keep(self._unsaved.pop())  # one slot at a time: a new request waits for one copy
                    continue
                while True:
                    try:
                        job = self._inbox.get(block=block)
                    except queue.Empty:
                        break
                    if job is None:
                        return
                    self._accept(job)
                    block = False
                self._reap_cancelled()
                if self._running:
                    self._step()
                self._outbox.flush()
        except Exception:
            logger.exception("the decode loop of %s died", self._path.name)
            for job in list(self._running.values()):
                self._outbox.put(job.channel, EngineCrashedError("the decode loop failed"))
            self._running.clear()
            self._outbox.flush()

    def _accept(self, job: _Job) -> None:
        if job.cancel.cancelled:
            return
        if job.slot in self._running:  # the previous request on this slot is still winding down
            self._deferred.setdefault(job.slot, []).append(job)
            return
        try:
            self._admit(job)
        except EngineError as exc:
            self._drop(job, exc)
        except Exception as exc:
            logger.exception("admitting a sequence failed")
            self._drop(job, EngineCrashedError(str(exc)))

    def _admit(self, job: _Job) -> None:
        prompt, params = job.prompt, job.params
        if len(prompt) + params.max_tokens > self._n_ctx_per_slot:
            raise ContextOverflowError(len(prompt), params.max_tokens, self._n_ctx_per_slot)
        job.sampler = None if _is_plain_greedy(params) else self._sampler(params)
        job.stopper = StopMatcher(params.stop)
        cached = self._reuse(job)
        job.cached = cached
        job.pending = prompt[cached:]
        self._running[job.slot] = job

    def _reuse(self, job: _Job) -> int:
        """Prepare the slot's KV cache for ``job``; return how many leading prompt tokens it keeps.

        The slot keeps its common prefix with the prompt (another tenant's sequence only up to the
        shared prefix). When a kept sequence in the host cache offers more, the slot's sequence goes
        there and that one comes in; when the prompt keeps less than half of what the slot holds,
        the slot's sequence goes there too before it is cut. At least ``MIN_PROMPT_SUFFIX`` prompt
        tokens are always decoded (see sequential.py: that keeps greedy output equal to a cold run).
        """
        slot, prompt, scope = job.slot, job.prompt, job.scope
        limit = max(0, len(prompt) - MIN_PROMPT_SUFFIX)
        kept = self.prefix_match(slot, prompt)
        if self._owner[slot] != scope.tenant:
            kept = min(kept, scope.shared_prefix)
        kept = min(kept, limit)
        found: tuple[Entry, int] | None = None
        if self._host is not None and kept < limit:
            found = self._host.lookup(
                np.asarray(prompt[:limit], dtype=np.int32), scope, kept + MIN_RESTORE_GAIN - 1
            )
        self._unsaved.discard(slot)
        self._stash(slot, 0 if found is not None else kept)
        if found is not None:
            entry, usable = found
            kept = min(usable, limit) if self._restore(slot, entry, usable, scope) else 0
        if not self._ctx.kv_cache_seq_rm(slot, kept, -1):
            self._ctx.kv_cache_seq_rm(slot, 0, -1)
            kept = 0
        with self._cache_lock:
            del self._cache[slot][kept:]
        self._owner[slot] = scope.tenant
        return kept

    def _stash(self, slot: int, kept: int) -> None:
        """Copy the slot's sequence into the host cache if the next request keeps less than half of it."""
        if 2 * kept < len(self._cache[slot]):
            self._keep(slot)

    def _keep(self, slot: int) -> None:
        """Copy the slot's sequence into the host cache (nothing happens if it is there already)."""
        held = self._cache[slot]
        if self._host is None or len(held) < MIN_RESTORE_GAIN:
            return
        started = time.perf_counter()
        ctx = self._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, slot)

        def fill(state: State) -> bool:
            pointer = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
            return bool(llama_cpp.llama_state_seq_get_data(ctx, pointer, state.size, slot) == state.size)

        kept_it = self._host.keep(self._owner[slot], list(held), size, fill)
        logger.debug(
            "slot %d: %d tokens (%d bytes) %s the host cache in %.1f ms",
            slot,
            len(held),
            size,
            "kept in" if kept_it else "not kept in",
            (time.perf_counter() - started) * 1000,
        )

    def _restore(self, slot: int, entry: Entry, usable: int, scope: CacheScope) -> bool:
        """Copy a kept sequence's KV state into the slot (replacing what it held)."""
        assert self._host is not None
        started = time.perf_counter()
        self._ctx.kv_cache_seq_rm(slot, 0, -1)
        pointer = entry.state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        restored = llama_cpp.llama_state_seq_set_data(self._ctx.ctx, pointer, entry.size, slot) == entry.size
        with self._cache_lock:
            self._cache[slot] = entry.tokens.tolist() if restored else []
        if not restored:
            logger.warning("restoring %d tokens into slot %d failed", len(entry.tokens), slot)
            self._ctx.kv_cache_seq_rm(slot, 0, -1)
            return False
        self._host.restored(entry, usable, scope.tenant)
        logger.debug(
            "slot %d: %d of %d kept tokens restored in %.1f ms",
            slot,
            usable,
            len(entry.tokens),
            (time.perf_counter() - started) * 1000,
        )
        return True

    def _sampler(self, params: GenerationParams) -> LlamaSampler:
        sampler = LlamaSampler()
        if params.logit_bias:
            sampler.add_logit_bias(self._n_vocab, params.logit_bias)
        sampler.add_penalties(
            self._n_vocab,
            PENALTY_LAST_N,
            params.repeat_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        )
        if params.grammar:
            grammar = llama_cpp.llama_sampler_init_grammar(
                self._model.vocab, params.grammar.encode("utf-8"), b"root"
            )
            if not grammar:
                sampler.close()
                raise GrammarError("the grammar does not parse")
            llama_cpp.llama_sampler_chain_add(sampler.sampler, grammar)
        if params.temperature <= 0.0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(params.top_k)
            sampler.add_typical(1.0, 1)
            sampler.add_top_p(params.top_p, 1)
            sampler.add_min_p(params.min_p, 1)
            sampler.add_temp(params.temperature)
            sampler.add_dist(params.seed if params.seed is not None else random.getrandbits(32))
        return sampler

    def _reap_cancelled(self) -> None:
        for job in [j for j in self._running.values() if j.cancel.cancelled]:
            self._finish(job, None)

    def _step(self) -> None:
        batch = self._batch
        n = 0
        added = plan_step(self._running, self._n_batch)
        for job, tokens in added:
            start = len(self._cache[job.slot])
            wants_logits = job.next_token is not None or not job.pending  # generating, or prompt read
            for i, token in enumerate(tokens):
                self._put(n, token, start + i, job.slot, wants_logits and i == len(tokens) - 1)
                n += 1
            job.row = n - 1 if wants_logits else -1
            job.next_token = None
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if status != 0:
            logger.error(
                "llama_decode returned %d on %s; failing %d sequences", status, self._path.name, len(added)
            )
            for job, _ in added:
                self._ctx.kv_cache_seq_rm(job.slot, 0, -1)
                with self._cache_lock:
                    self._cache[job.slot].clear()
                self._finish(job, EngineCrashedError(f"llama_decode returned {status}"))
            return
        with self._cache_lock:
            for job, tokens in added:
                self._cache[job.slot].extend(tokens)
        for job, _ in added:
            if job.row >= 0:
                self._sample(job)

    def _put(self, index: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self._batch
        batch.token[index] = token
        batch.pos[index] = pos
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = seq
        batch.logits[index] = logits

    def _sample(self, job: _Job) -> None:
        assert job.stopper is not None
        token = self._argmax(job) if job.sampler is None else job.sampler.sample(self._ctx, job.row)
        if self._text.is_eog(token):
            self._finish(job, "stop")
            return
        job.produced += 1
        piece = self._text.piece(token)
        released, stopped = job.stopper.feed(job.detokenizer.feed(piece))
        logprob, top = self._logprobs(job, token) if job.params.logprobs else (None, ())
        self._outbox.put(job.channel, TokenEvent(released, token, piece, logprob, top))
        if stopped:
            self._finish(job, "stop")
        elif job.produced >= job.params.max_tokens:
            self._finish(job, "length")
        else:
            job.next_token = token

    def _logits(self, row: int) -> np.ndarray:
        """The logits of batch row ``row`` (a view into llama.cpp's buffer, valid until the next decode)."""
        pointer = llama_cpp.llama_get_logits_ith(self._ctx.ctx, row)
        return np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self._n_vocab,)
        )

    def _argmax(self, job: _Job) -> int:
        """Greedy choice without a sampler chain: the same token, a fraction of the time.

        llama.cpp's chain copies the whole vocabulary into a candidate array for every token (about
        0.35 ms here, a few percent of a 4-sequence step during which the other compute thread idles);
        ``np.argmax`` over the logits plus the float32 biases picks the same token (the first maximum,
        as llama.cpp's greedy sampler does).
        """
        logits = self._logits(job.row)
        bias = job.params.logit_bias
        if bias:
            logits = logits.copy()
            for token, value in bias.items():
                logits[token] += np.float32(value)
        return int(np.argmax(logits))

    def _logprobs(self, job: _Job, token: int) -> tuple[float | None, tuple[TopLogprob, ...]]:
        logits = self._logits(job.row).astype(np.float64)
        if job.params.logit_bias:
            for biased, bias in job.params.logit_bias.items():
                logits[biased] += bias
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        top: tuple[TopLogprob, ...] = ()
        if job.params.top_logprobs:
            best = np.argpartition(logprobs, -job.params.top_logprobs)[-job.params.top_logprobs :]
            best = best[np.argsort(-logprobs[best])]
            top = tuple(
                TopLogprob(
                    self._text.piece(int(t)).decode("utf-8", errors="replace"),
                    float(logprobs[t]),
                    list(self._text.piece(int(t))),
                )
                for t in best
            )
        return float(logprobs[token]), top

    def _finish(self, job: _Job, outcome: FinishReason | EngineError | None) -> None:
        """End a sequence: flush text, report, free its sampler and its slot (KV stays cached)."""
        self._running.pop(job.slot, None)
        if self._host is not None:
            self._unsaved.add(job.slot)
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        if isinstance(outcome, EngineError):
            self._outbox.put(job.channel, outcome)
        elif outcome is not None:
            if job.stopper is not None and (outcome == "length" or not job.params.stop):
                tail, _ = job.stopper.feed(job.detokenizer.flush())
                tail += job.stopper.flush()[0]
                if tail:
                    self._outbox.put(job.channel, TokenEvent(tail, -1))
            self._outbox.put(job.channel, Finished(outcome, len(job.prompt), job.produced, job.cached))
        waiting = self._deferred.get(job.slot)
        if waiting:
            self._accept(waiting.pop(0))

    def _drop(self, job: _Job, error: EngineError) -> None:
        self._running.pop(job.slot, None)
        self._outbox.put(job.channel, error)
        waiting = self._deferred.get(job.slot)
        if waiting:
            self._accept(waiting.pop(0))

    # -- embeddings and shutdown ------------------------------------------------------------------------

    async def embed(self, inputs: Sequence[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised embeddings from a dedicated embedding context."""
        return await self._embeddings.embed(inputs)

    def close(self) -> None:
        """Stop the decode loop (running sequences end with an error) and free everything; idempotent."""
        if self._closed:
            return
        self._closed = True
        for job in list(self._running.values()):
            job.cancel.cancel()
        self._inbox.put(None)
        self._worker.join(timeout=30)
        for job in list(self._running.values()):
            self._finish(job, EngineCrashedError("the engine was closed"))
        self._outbox.flush()
        self._embeddings.close()
        self._threadpool.close()
        if self._host is not None:
            self._host.clear()
        llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()
        self._model.close()
