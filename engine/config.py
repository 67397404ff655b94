"""What the engine layer is configured with: one served model, and admission to its slots.

The gateway's settings tree holds these sections; the engine reads only them.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from msgspec import Meta, Struct

from engine.kvcache import DEFAULT_POOL_MIB
from engine.upstream.config import UpstreamSettings

PositiveInt = Annotated[int, Meta(ge=1)]
Seconds = Annotated[float, Meta(gt=0)]


class ModelSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """One served model."""

    id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]
    path: str | None = None
    """Local GGUF file. Relative paths are relative to ``models_dir``."""
    source: str | None = None
    """Registry name (see ``pocketllm models list``) to pull when ``path`` is absent."""
    n_ctx: PositiveInt = 8192
    """Total context across all slots; each slot gets ``n_ctx // slots`` tokens."""
    n_threads: PositiveInt = max(1, min(os.cpu_count() or 1, 8))
    n_batch: PositiveInt = 512
    slots: Annotated[int, Meta(ge=1, le=64)] = 4
    chat_template: str | None = None
    """Jinja chat template overriding the GGUF's own."""
    aliases: list[str] = []
    embeddings: bool = True
    """Also serve ``/v1/embeddings`` from this model (a second, embedding-mode context)."""
    embedding_token_ids: bool = False
    """Accept ``/v1/embeddings`` input given as token ids. Off by default: clients such as LangChain's
    ``OpenAIEmbeddings`` tokenize with OpenAI's vocabulary, and those ids read as this model's would give
    silently wrong vectors. Turn it on only for clients that tokenize with this model's own vocabulary."""
    flash_attention: bool = True
    """Faster decoding (~10% here). Off, greedy output is bit-identical whatever the KV cache holds;
    on, a reused prompt prefix can round differently from a cold run (as in llama-server)."""
    kv_cache_mib: Annotated[int, Meta(ge=0)] = DEFAULT_POOL_MIB
    """Host-memory KV cache of sequences pushed out of their slot (LRU; 0: none). Default: llama-server's
    8 GiB (``--cache-ram``), capped at a quarter of the machine's RAM; a ceiling, used only by sequences
    kept. SmolLM2-135M's KV state is about 22 KiB per token: 64 chat sessions of ~700 tokens need ~1 GiB
    to all come back warm, and with LRU a round-robin over more sessions than fit finds none warm."""
    upstream: UpstreamSettings | None = None
    """Served by remote OpenAI-compatible replicas instead of a local GGUF (then ``path``, ``source`` and
    the local engine's settings do not apply); see ``engine.upstream``."""
    engine: Literal["batched", "sequential"] = "batched"
    """``batched``: all slots in one context, decoded together (continuous batching);
    ``sequential``: one llama.cpp context and thread per slot (the reference engine)."""


class QueueSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """Admission to a model's slots."""

    max_queue: Annotated[int, Meta(ge=0)] = 64
    """Requests that may wait for a slot per model; beyond it a request gets 503."""
    max_wait_s: Seconds = 120.0
    """How long a request may wait for a slot before it gets 503."""
    ping_interval_s: Seconds = 5.0
    """SSE comment pings while a streaming request waits for a slot."""
