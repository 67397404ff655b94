"""The engine contract: what the gateway asks of anything that runs a model.

An *engine* serves one loaded model. It owns its own worker thread(s); every llama.cpp call happens
there, never on the event loop, and no llama context is ever touched by two threads at once.
The pool (``engine.pool``) decides *when* a request may run and on which slot; the engine only runs it.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from engine.tools import FunctionTool, ToolRequest

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Sampling and stopping parameters of one sequence (already validated by the gateway)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str | None = None
    """GBNF text that constrains the output (``response_format``), or ``None``."""


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One alternative token and its log-probability."""

    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """Text released by the engine for one sampled token (may be empty while UTF-8 or a stop is held back)."""

    text: str
    token_id: int
    piece: bytes = b""
    """The token's own bytes (for logprobs), independent of what ``text`` released."""
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of every generation."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose KV state was reused instead of recomputed."""


GenerationEvent = TokenEvent | Finished


@dataclass(frozen=True, slots=True)
class CacheScope:
    """Whose KV state a sequence may reuse, and under whose name its own is kept.

    KV state left by a request of the same ``tenant`` is reused in full (in its slot or from the
    host-memory cache); another tenant's only for the first ``shared_prefix`` prompt tokens, the part
    that is the same for everyone by construction (``engine.kvcache.system_prefix``).
    """

    tenant: str | None = None
    """The user the request runs for; ``None`` is one anonymous tenant."""
    shared_prefix: int = 0


@dataclass(frozen=True, slots=True)
class KVCacheStats:
    """The host-memory KV cache of one model (all zero where the engine has none)."""

    capacity_bytes: int = 0
    size_bytes: int = 0
    entries: int = 0
    hits: int = 0
    """Requests that had a kept sequence restored into their slot."""
    misses: int = 0
    """Requests whose slot did not hold their prompt and that found no kept sequence sharing more of it."""
    evictions: int = 0
    """Entries dropped to make room (least recently used first)."""


class Cancellation:
    """A flag the event loop sets and the engine thread polls between tokens."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to stop this generation at the next token boundary."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether cancellation was requested."""
        return self._event.is_set()


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What is known about a loaded model file."""

    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    n_params: int
    size_bytes: int
    chat_template: str | None
    description: str
    metadata: dict[str, str] = field(default_factory=dict)
    max_token_bytes: int = 0
    """The longest token's text in bytes (special tokens included); 0 if unknown. A text longer than
    ``n_ctx * max_token_bytes`` cannot fit into ``n_ctx`` tokens, whatever it holds."""


@dataclass(frozen=True, slots=True)
class ToolPrompt:
    """What a chat request with tools runs: its prompt text and the grammar its answer follows."""

    text: str
    """The rendered prompt (tokenize it with ``add_special=True``, like ``render_chat``'s output)."""
    grammar: str | None
    """GBNF for ``GenerationParams.grammar``; ``None`` for ``tool_choice: none``."""
    calls_allowed: bool
    """Pass to ``engine.tools.ToolCallParser(calls_allowed=...)``."""
    tool_format: Literal["hermes", "generic"]
    """How the tools reached the model: the template's own rendering or the generic system text."""


class EngineError(Exception):
    """A failure inside an engine. Subclasses are mapped to API errors in one table in the gateway."""

    retry_after: int = 1
    """Seconds a client should wait before trying again, where the failure is temporary."""


class ModelLoadError(EngineError):
    """The model file is missing, unreadable or not a valid GGUF."""


class ContextOverflowError(EngineError):
    """Prompt plus requested tokens do not fit into the context window."""

    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or completion."
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx


class GrammarError(EngineError):
    """A grammar (from ``response_format``) could not be compiled."""


class TemplateError(EngineError):
    """The chat template failed to render the messages."""


class EngineCrashedError(EngineError):
    """The engine failed while generating; the sequence was aborted and its slot freed."""


@runtime_checkable
class Engine(Protocol):
    """One loaded model with ``slots`` parallel sequences."""

    @property
    def info(self) -> ModelInfo:
        """Facts about the loaded model."""
        ...

    @property
    def slots(self) -> int:
        """How many sequences may run at once."""
        ...

    @property
    def embeddings_enabled(self) -> bool:
        """Whether ``embed`` may be called."""
        ...

    @property
    def template_source(self) -> str:
        """Where the chat template came from: ``gguf``, ``override`` or ``builtin-chatml``."""
        ...

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokenize ``text`` (thread-safe; does not touch a context)."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Turn tokens back into text (thread-safe)."""
        ...

    @property
    def tool_format(self) -> Literal["hermes", "generic"]:
        """``hermes``: the chat template renders tools and ``<tool_call>`` calls; else ``generic``."""
        ...

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[FunctionTool] = (),
        add_generation_prompt: bool = True,
    ) -> str:
        """Apply the model's chat template (``tools`` go to templates that render them); ``TemplateError``."""
        ...

    def tool_prompt(self, messages: Sequence[Mapping[str, Any]], request: ToolRequest) -> ToolPrompt:
        """Prompt and grammar for a request with tools; ``TemplateError``, ``GrammarError``."""
        ...

    def generate(
        self,
        slot: int,
        prompt: list[int],
        params: GenerationParams,
        cancel: Cancellation,
        scope: CacheScope | None = None,
    ) -> AsyncIterator[GenerationEvent]:
        """Run one sequence on ``slot``; yields token events then exactly one ``Finished``.

        ``scope`` says whose cached KV state the prompt may reuse (``None``: the anonymous tenant).
        Closing the iterator early (or setting ``cancel``) stops the sequence within one token and
        frees the slot's compute. Raises ``EngineError`` subclasses only.
        """
        ...

    async def embed(self, inputs: Sequence[str]) -> tuple[list[list[float]], int]:
        """Return one L2-normalised embedding per input and the number of tokens they used."""
        ...

    def grammar_for(self, kind: str, schema: dict[str, Any] | None) -> str | None:
        """GBNF enforcing a ``response_format`` kind (``json_object``/``json_schema``); ``GrammarError``."""
        ...

    def prefix_match(self, slot: int, prompt: Sequence[int]) -> int:
        """How many leading tokens of ``prompt`` the slot already holds in its KV cache (0 if none)."""
        ...

    def kv_cache_stats(self) -> KVCacheStats:
        """Size and counters of the host-memory KV cache (thread-safe)."""
        ...

    def close(self) -> None:
        """Stop worker threads and free the model; idempotent."""
        ...
