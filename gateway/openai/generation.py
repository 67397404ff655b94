"""From a validated OpenAI request to engine runs: prompt building, parameter mapping, checks, running.

Chat and text completions (and the PocketLLM chat routes, which are chat completions) share this. Engine
errors propagate as they are; the edges (exception handlers, the SSE writer) map them in one table.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import msgspec

from engine.base import CacheScope, Cancellation, Engine, Finished, GenerationParams, GrammarError, TokenEvent
from engine.kvcache import system_prefix
from engine.models import ModelRuntime
from engine.pool import Reservation, SlotPool
from engine.tools import ArgumentsDelta, ToolCallStart, ToolRequest
from engine.upstream.model import UpstreamFinish, UpstreamModel, UpstreamWaiting, estimate_tokens
from gateway.errors import ContextLengthError, InvalidRequestError, NotFoundError
from gateway.openai.chat_request import (
    calls_allowed,
    engine_messages,
    legacy_functions,
    refuse_unsupported,
    tool_request,
    uses_tool_turns,
)
from gateway.openai.protocol.chat import ChatCompletionRequest
from gateway.openai.protocol.completions import CompletionRequest
from gateway.openai.protocol.embeddings import EmbeddingRequest
from gateway.settings import LimitsSettings
from telemetry.requests import current_request

# Sampling defaults where the request is silent: OpenAI's temperature/top_p, llama.cpp's top_k/min_p.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_TOKENIZE_OFF_LOOP_CHARS = 8192


@dataclass(frozen=True, slots=True)
class Shape:
    """What an answer looks like, known without rendering or tokenizing anything: enough to build its
    frames, and to answer it from the response cache."""

    runtime: ModelRuntime
    prompts: int
    """How many prompts (chat: one)."""
    n: int
    logprobs: bool
    echo_texts: tuple[str, ...] = ()
    """Text completions with ``echo``: each prompt's text, written before its choices."""
    tool_calls: bool = False
    """Chat with tools offered (and not ``tool_choice: none``): the answer may hold calls, so its text
    passes through ``engine.tools.ToolCallParser``."""
    legacy_functions: bool = False
    """The request used the legacy ``functions``: a call is answered as ``function_call``."""

    @property
    def choices(self) -> int:
        """Number of choices in the response."""
        return self.prompts * self.n


@dataclass(slots=True)
class ShapedJob:
    """What every job has: the answer's shape, and through it the model and the number of choices."""

    shape: Shape

    @property
    def runtime(self) -> ModelRuntime:
        """The model."""
        return self.shape.runtime

    @property
    def n(self) -> int:
        """Choices per prompt."""
        return self.shape.n

    @property
    def choices(self) -> int:
        """Number of choices in the response."""
        return self.shape.choices


@dataclass(slots=True)
class Job(ShapedJob):
    """Everything needed to run one request on one model."""

    engine: Engine
    pool: SlotPool
    prompts: list[list[int]]
    params: GenerationParams
    session: str | None = None
    scope: CacheScope | None = None
    """Whose cached KV state the prompts may reuse (the caller's, and the shared system prefix)."""

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens across every prompt."""
        return sum(len(p) for p in self.prompts)

    @property
    def reserved_tokens(self) -> int:
        """What admission reserves against TPM: every prompt token and every choice's budget."""
        return self.prompt_tokens + self.params.max_tokens * self.choices


@dataclass(slots=True)
class UpstreamJob(ShapedJob):
    """One request for an upstream model: the request as the upstream takes it (JSON, one body per
    prompt), since the template and tokenizer live there, not here."""

    upstream: UpstreamModel
    path: str
    """``chat/completions`` or ``completions`` (under each replica's base URL)."""
    bodies: list[dict[str, Any]]
    """One request body per prompt (chat: one), without ``model``/``stream`` (the upstream adds them)."""
    prompt_estimates: list[int]
    """Each prompt's tokens as estimated here (``estimate_tokens``), corrected by the upstream's usage."""
    max_tokens: int
    seed: int | None = None
    session: str | None = None
    """Affinity: requests of one session go to the same replica (its KV cache holds the conversation)."""

    @property
    def prompt_tokens(self) -> int:
        """Estimated prompt tokens across every prompt."""
        return sum(self.prompt_estimates)

    @property
    def reserved_tokens(self) -> int:
        """What admission reserves against TPM (corrected with the upstream's usage when it ends)."""
        return self.prompt_tokens + self.max_tokens * self.choices


AnyJob = Job | UpstreamJob


@dataclass(frozen=True, slots=True)
class ChoiceToken:
    """A streamed token of choice ``index``."""

    index: int
    event: TokenEvent


@dataclass(frozen=True, slots=True)
class ChoiceFinished:
    """Choice ``index`` ended."""

    index: int
    event: Finished


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """An upstream chunk of choice ``index``: text and tool-call fragments, as the upstream streamed them."""

    index: int
    text: str
    tool_calls: tuple[ToolCallStart | ArgumentsDelta, ...] = ()


@dataclass(frozen=True, slots=True)
class ChoiceEnd:
    """An upstream choice ended, with the usage the upstream reported (or the estimate)."""

    index: int
    finish_reason: str
    completion_tokens: int
    prompt_correction: int = 0
    """What to add to the estimated prompt tokens to get the upstream's count (first choice of a prompt)."""
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ChoiceWaiting:
    """Choice ``index`` still waits for room on a replica of its upstream (a stream sends a ping)."""

    index: int


def check_fits(engine: Engine, text: str, n_ctx: int, param: str) -> None:
    """Refuse, without tokenizing it, a text that cannot fit into ``n_ctx`` tokens whatever it holds.

    No token is longer than ``max_token_bytes``, so a longer text needs more tokens than the context
    has. Tokenizing is not linear (a text full of special tokens such as ``<|im_end|>`` takes minutes
    of a core for a megabyte), so a body of the maximum size must never reach the tokenizer.
    """
    longest = engine.info.max_token_bytes
    if longest and len(text) > n_ctx * longest:
        raise ContextLengthError(
            f"This model's maximum context length is {n_ctx} tokens. However, your {param} "
            f"({len(text)} characters) is longer than {n_ctx} tokens could be. Please reduce its length.",
            param=param,
        )


async def tokenize_checked(engine: Engine, text: str, n_ctx: int, param: str) -> list[int]:
    """``check_fits``, then tokenize (off the event loop when the text is long)."""
    check_fits(engine, text, n_ctx, param)
    return await _tokenize(engine, text)


async def _tokenize(engine: Engine, text: str, *, add_special: bool = True) -> list[int]:
    if len(text) > _TOKENIZE_OFF_LOOP_CHARS:
        return await asyncio.to_thread(engine.tokenize, text, add_special=add_special)
    return engine.tokenize(text, add_special=add_special)


def _stops(stop: str | list[str] | None, limits: LimitsSettings) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > limits.max_stop:
        raise InvalidRequestError(f"`stop` may hold at most {limits.max_stop} strings", param="stop")
    if any(len(s) > 512 for s in stops):
        raise InvalidRequestError("each `stop` string may be at most 512 characters", param="stop")
    return tuple(s for s in stops if s)


def _logit_bias(bias: dict[str, float] | None, n_vocab: int) -> dict[int, float]:
    if not bias:
        return {}
    if len(bias) > 1024:
        raise InvalidRequestError("`logit_bias` may hold at most 1024 tokens", param="logit_bias")
    result = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequestError(
                f"`logit_bias` key {key[:32]!r} is not a token id", param="logit_bias"
            ) from None
        if not 0 <= token < n_vocab:
            raise InvalidRequestError(
                f"`logit_bias` token {token} is outside the vocabulary", param="logit_bias"
            )
        result[token] = value
    return result


def split_inputs(raw: str | list[str | int | list[int]], param: str) -> list[str | list[int]]:
    """Normalise OpenAI's prompt/input shapes (string, strings, token ids, token-id lists) to a list."""
    if isinstance(raw, str):
        return [raw]
    if all(isinstance(item, int) for item in raw):
        return [[int(item) for item in raw]]  # type: ignore[arg-type]
    if all(isinstance(item, str) for item in raw):
        return [str(item) for item in raw]
    if all(isinstance(item, list) and item for item in raw):
        return [list(item) for item in raw]  # type: ignore[arg-type]
    raise InvalidRequestError(
        f"`{param}` must be a string, a list of strings, a list of token ids or a list of non-empty "
        "token-id lists (not a mix)",
        param=param,
    )


def check_token_ids(ids: list[int], n_vocab: int, param: str) -> list[int]:
    """Refuse token ids outside the vocabulary."""
    if any(not 0 <= t < n_vocab for t in ids):
        raise InvalidRequestError(f"`{param}` holds a token id outside the vocabulary", param=param)
    return ids


def _check_n(n: int | None, limits: LimitsSettings) -> int:
    n = n or 1
    if n > limits.max_n:
        raise InvalidRequestError(f"`n` may be at most {limits.max_n}", param="n")
    return n


def _budget(
    runtime: ModelRuntime, prompt_tokens: int, requested: int | None, default: int, param: str
) -> int:
    n_ctx = runtime.n_ctx_per_slot
    if requested is not None:
        if prompt_tokens + requested > n_ctx:
            raise ContextLengthError(
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} in the "
                f"completion). Please reduce the length of the prompt or completion.",
                param=param,
            )
        return requested
    if prompt_tokens >= n_ctx:
        raise ContextLengthError(
            f"This model's maximum context length is {n_ctx} tokens. However, your prompt has "
            f"{prompt_tokens} tokens. Please reduce the length of the prompt.",
            param=param,
        )
    return min(default, n_ctx - prompt_tokens)


def sampling_params(
    max_tokens: int,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    stop: tuple[str, ...] = (),
    seed: int | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    repeat_penalty: float | None = None,
    logit_bias: dict[int, float] | None = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    grammar: str | None = None,
) -> GenerationParams:
    """The engine's sampling parameters, with the gateway's defaults where the request is silent (``None``).

    The one place ``GenerationParams`` is made: chat, text completions and ``/v1/responses`` all come here.
    """
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=temperature if temperature is not None else DEFAULT_TEMPERATURE,
        top_p=top_p if top_p is not None else 1.0,
        top_k=top_k if top_k is not None else DEFAULT_TOP_K,
        min_p=min_p if min_p is not None else DEFAULT_MIN_P,
        stop=stop,
        seed=seed,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
        repeat_penalty=repeat_penalty if repeat_penalty is not None else 1.0,
        logit_bias=logit_bias or {},
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        grammar=grammar,
    )


def _params(
    request: ChatCompletionRequest | CompletionRequest,
    engine: Engine,
    limits: LimitsSettings,
    max_tokens: int,
    *,
    logprobs: bool,
    top_logprobs: int,
    grammar: str | None = None,
) -> GenerationParams:
    """A chat or text-completion request's sampling parameters (``stop`` and ``logit_bias`` checked)."""
    return sampling_params(
        max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        stop=_stops(request.stop, limits),
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repeat_penalty=request.repeat_penalty,
        logit_bias=_logit_bias(request.logit_bias, engine.info.n_vocab),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        grammar=grammar,
    )


def chat_shape(request: ChatCompletionRequest, runtime: ModelRuntime, limits: LimitsSettings) -> Shape:
    """The shape of a chat answer (``n``, tools and unsupported features checked; 503 when the model is
    not loaded)."""
    runtime.check_ready()
    refuse_unsupported(request)
    if runtime.is_upstream and (request.logprobs or request.top_logprobs):
        raise InvalidRequestError(
            f"`logprobs` are not supported for the upstream model {request.model}",
            param="logprobs",
            code="unsupported_parameter",
        )
    return Shape(
        runtime,
        1,
        _check_n(request.n, limits),
        bool(request.logprobs),
        tool_calls=calls_allowed(request),
        legacy_functions=legacy_functions(request),
    )


def completion_shape(request: CompletionRequest, runtime: ModelRuntime, limits: LimitsSettings) -> Shape:
    """The shape of a text-completion answer (``n`` and the number of prompts checked)."""
    n = _check_n(request.n, limits)
    items = split_inputs(request.prompt, "prompt")
    if len(items) > limits.max_n * 4:
        raise InvalidRequestError(f"`prompt` may hold at most {limits.max_n * 4} prompts", param="prompt")
    if runtime.is_upstream:
        runtime.check_ready()
        texts = [item for item in items if isinstance(item, str)]
        if len(texts) != len(items):
            raise InvalidRequestError(
                f"token-id prompts are not supported for the upstream model {request.model} (its tokenizer "
                "is not here); send text",
                param="prompt",
                code="unsupported_value",
            )
        if request.logprobs is not None:
            raise InvalidRequestError(
                f"`logprobs` are not supported for the upstream model {request.model}",
                param="logprobs",
                code="unsupported_parameter",
            )
        return Shape(runtime, len(texts), n, False, tuple(texts) if request.echo else ())
    engine, _ = runtime.ready()
    echo: tuple[str, ...] = ()
    if request.echo:
        echo = tuple(item if isinstance(item, str) else engine.detokenize(item) for item in items)
    return Shape(runtime, len(items), n, request.logprobs is not None, echo)


async def prepare_chat(
    request: ChatCompletionRequest,
    runtime: ModelRuntime,
    limits: LimitsSettings,
    session: str | None = None,
    tenant: str | None = None,
) -> AnyJob:
    """Validate a chat request against the model and build its job (``tenant``: the caller's user id)."""
    if runtime.is_upstream:
        return prepare_upstream_chat(request, runtime, limits, session)
    engine, pool = runtime.ready()
    shape = chat_shape(request, runtime, limits)
    if request.top_logprobs and not request.logprobs:
        raise InvalidRequestError("`top_logprobs` requires `logprobs` to be true", param="top_logprobs")
    if len(request.messages) > runtime.n_ctx_per_slot:  # every message takes at least one token
        raise ContextLengthError(
            f"This model's maximum context length is {runtime.n_ctx_per_slot} tokens. However, you sent "
            f"{len(request.messages)} messages. Please reduce the number of messages.",
            param="messages",
        )
    prompt_text, grammar = await _chat_prompt(request, engine)
    if request.response_format is not None and request.response_format.type != "text":
        if shape.tool_calls:
            raise InvalidRequestError(
                "`response_format` together with tools is not supported (the answer is either text or "
                "calls); use tool_choice 'none', or offer the output as a tool",
                param="response_format",
            )
        schema_spec = request.response_format.json_schema
        if request.response_format.type == "json_schema" and not schema_spec:
            raise InvalidRequestError(
                "`response_format.json_schema` is required for type json_schema",
                param="response_format.json_schema",
            )
        schema = schema_spec.schema if schema_spec and isinstance(schema_spec.schema, dict) else None
        grammar = await asyncio.to_thread(engine.grammar_for, request.response_format.type, schema)
    prompt = await tokenize_checked(engine, prompt_text, runtime.n_ctx_per_slot, "messages")
    requested = request.max_completion_tokens or request.max_tokens
    max_tokens = _budget(runtime, len(prompt), requested, limits.max_tokens_default, "messages")
    params = _params(
        request,
        engine,
        limits,
        max_tokens,
        logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs or 0,
        grammar=grammar,
    )

    plain = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
    ]
    scope = await chat_scope(engine, plain, prompt_text, prompt, tenant)
    return Job(shape, engine, pool, [prompt], params, session=session, scope=scope)


async def chat_scope(
    engine: Engine,
    messages: Sequence[dict[str, Any]],
    prompt_text: str,
    prompt: Sequence[int],
    tenant: str | None,
) -> CacheScope:
    """Whose kept KV state a chat prompt may reuse: all of ``tenant``'s (the caller's user id), another
    tenant's only up to the rendering of the leading system messages (the part that is the same for
    everyone by construction). ``messages`` are the chat messages ``prompt_text`` was rendered from."""

    def shared() -> int:
        render = partial(engine.render_chat, add_generation_prompt=False)
        return system_prefix(render, engine.tokenize, messages, prompt)

    long = len(prompt_text) > _TOKENIZE_OFF_LOOP_CHARS
    return CacheScope(tenant, await asyncio.to_thread(shared) if long else shared())


async def _chat_prompt(request: ChatCompletionRequest, engine: Engine) -> tuple[str, str | None]:
    """The rendered prompt and, with tools, the grammar that holds the answer to text or valid calls.

    A request without tools and without tool turns in its history renders plain ``role``/``content``
    messages; otherwise ``Engine.tool_prompt`` renders the tools and the history's calls and results.
    """
    tools = tool_request(request)
    if tools is None and not uses_tool_turns(request):
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in request.messages
        ]
        return engine.render_chat(messages), None
    history = engine_messages(request.messages)
    try:
        prompt = await asyncio.to_thread(engine.tool_prompt, history, tools or ToolRequest(()))
    except GrammarError as exc:
        param = "functions" if legacy_functions(request) else "tools"
        raise InvalidRequestError(str(exc), param=param) from None
    return prompt.text, prompt.grammar


async def prepare_completion(
    request: CompletionRequest, runtime: ModelRuntime, limits: LimitsSettings, tenant: str | None = None
) -> AnyJob:
    """Validate a text-completion request against the model and build its job (``tenant``: the
    caller's user id)."""
    if runtime.is_upstream:
        return prepare_upstream_completion(request, runtime, limits)
    engine, pool = runtime.ready()
    shape = completion_shape(request, runtime, limits)
    items = split_inputs(request.prompt, "prompt")
    prompts: list[list[int]] = []
    for item in items:
        if isinstance(item, str):
            prompts.append(await tokenize_checked(engine, item, runtime.n_ctx_per_slot, "prompt"))
        else:
            prompts.append(check_token_ids(item, engine.info.n_vocab, "prompt"))
    if any(not p for p in prompts):
        raise InvalidRequestError("`prompt` must not be empty", param="prompt")
    requested = request.max_tokens if request.max_tokens is not None else None
    longest = max(len(p) for p in prompts)
    max_tokens = _budget(
        runtime,
        longest,
        requested if requested is not None else None,
        COMPLETIONS_DEFAULT_MAX_TOKENS,
        "prompt",
    )
    params = _params(
        request,
        engine,
        limits,
        max_tokens,
        logprobs=request.logprobs is not None,
        top_logprobs=request.logprobs or 0,
    )
    return Job(shape, engine, pool, prompts, params, scope=CacheScope(tenant))


@dataclass(slots=True)
class EmbeddingJob:
    """The inputs of one ``/v1/embeddings`` request, in turns that share the embedding context fairly."""

    runtime: ModelRuntime
    engine: Engine
    pool: SlotPool
    texts: list[str]
    tokens: list[int]
    """Each input's token count."""

    @property
    def total_tokens(self) -> int:
        """Input tokens of every input."""
        return sum(self.tokens)

    def turns(self, budget: int) -> list[range]:
        """Consecutive inputs grouped into turns of at most ``budget`` tokens (an input longer than that is
        a turn of its own); between turns, other requests waiting for the context go first."""
        turns, start, used = [], 0, 0
        for index, count in enumerate(self.tokens):
            if index > start and used + count > budget:
                turns.append(range(start, index))
                start, used = index, 0
            used += count
        turns.append(range(start, len(self.tokens)))
        return turns


async def prepare_embeddings(
    request: EmbeddingRequest, runtime: ModelRuntime, limits: LimitsSettings
) -> EmbeddingJob | UpstreamEmbeddingJob:
    """Validate an embeddings request against the model: inputs, their count and tokens, dimensions."""
    if runtime.is_upstream:
        return prepare_upstream_embeddings(request, runtime, limits)
    engine, _ = runtime.ready()
    pool = runtime.embed_pool
    if not engine.embeddings_enabled or pool is None:
        raise NotFoundError(
            f"the model `{request.model}` does not serve embeddings", param="model", code="model_not_found"
        )
    architecture = engine.info.metadata.get("general.architecture", "")
    width = int(engine.info.metadata.get(f"{architecture}.embedding_length", 0))
    if request.dimensions is not None and request.dimensions != width:
        raise InvalidRequestError("`dimensions` cannot be changed for this model", param="dimensions")
    items = split_inputs(request.input, "input")
    if len(items) > limits.max_embedding_inputs:
        raise InvalidRequestError(
            f"`input` may hold at most {limits.max_embedding_inputs} items", param="input"
        )
    if not runtime.settings.embedding_token_ids and any(not isinstance(item, str) for item in items):
        raise InvalidRequestError(
            f"token-id input is not accepted by model `{request.model}`: ids from another tokenizer "
            "(OpenAI's, which LangChain's OpenAIEmbeddings uses by default) would give wrong vectors. "
            "Send text (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False)), or enable "
            "`embedding_token_ids` for this model if your ids come from its own tokenizer.",
            param="input",
            code="token_ids_not_supported",
        )
    texts = [
        item
        if isinstance(item, str)
        else engine.detokenize(check_token_ids(item, engine.info.n_vocab, "input"))
        for item in items
    ]
    if any(not text for text in texts):
        raise InvalidRequestError("`input` must not contain empty strings", param="input")
    tokens = []
    for text in texts:
        count = len(await tokenize_checked(engine, text, runtime.n_ctx_per_slot, "input"))
        if count > runtime.n_ctx_per_slot:
            raise ContextLengthError(
                f"an input is longer than the model's context of {runtime.n_ctx_per_slot} tokens",
                param="input",
            )
        tokens.append(count)
    if sum(tokens) > limits.max_embedding_tokens:
        raise InvalidRequestError(
            f"`input` holds {sum(tokens)} tokens; one request may hold at most {limits.max_embedding_tokens}",
            param="input",
        )
    return EmbeddingJob(runtime, engine, pool, texts, tokens)


def reserve(job: Job) -> Reservation:
    """Take a slot or a queue place now (``QueueFullError`` when neither is possible)."""
    current_request().queued(job.runtime.id)
    return job.pool.reserve(job.prompts[0], job.session)


def _choice_params(job: Job, choice: int) -> GenerationParams:
    if job.params.seed is not None and choice:
        return replace(job.params, seed=job.params.seed + choice)
    return job.params


async def run_choices(job: Job, slot: int) -> AsyncGenerator[ChoiceToken | ChoiceFinished]:
    """Run every choice of the job on ``slot`` one after another, yielding their events.

    Closing this early stops the engine within one token. The request's telemetry sees the slot taken,
    the first token and the token counts.
    """
    record = current_request()
    record.slot_acquired(job.prompt_tokens)
    if record.log_content:
        record.prompt_text = job.engine.detokenize(job.prompts[0])
    finished_tokens = running_tokens = 0
    try:
        for index in range(job.choices):
            prompt = job.prompts[index // job.n]
            params = _choice_params(job, index)
            if params.max_tokens == 0:
                yield ChoiceFinished(index, Finished("length", len(prompt), 0))
                continue
            cancel = Cancellation()
            events = job.engine.generate(slot, prompt, params, cancel, job.scope)
            try:
                async for event in events:
                    job.pool.raise_if_aborted()
                    if isinstance(event, Finished):
                        finished_tokens, running_tokens = finished_tokens + event.completion_tokens, 0
                        yield ChoiceFinished(index, event)
                        continue
                    record.first_token()
                    running_tokens += event.token_id >= 0
                    if index == 0:
                        record.add_completion_text(event.text)
                    yield ChoiceToken(index, event)
            finally:
                cancel.cancel()
                await events.aclose()  # type: ignore[attr-defined]
    finally:
        record.generated(job.prompt_tokens, finished_tokens + running_tokens)


# --- upstream models ---------------------------------------------------------------------------------
_UPSTREAM_SAMPLING = (
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "top_k",
    "min_p",
    "repeat_penalty",
)
"""Request fields passed to an upstream as they are, when sent (unset: the upstream's own default)."""
_MESSAGE_OVERHEAD_TOKENS = 4
"""Template tokens per chat message in the prompt estimate (role markers and separators)."""


def _upstream_sampling(
    request: ChatCompletionRequest | CompletionRequest, limits: LimitsSettings
) -> dict[str, Any]:
    sent: dict[str, Any] = msgspec.to_builtins(request)
    body = {name: sent[name] for name in _UPSTREAM_SAMPLING if sent.get(name) is not None}
    stops = _stops(request.stop, limits)
    if stops:
        body["stop"] = list(stops)
    return body


def prepare_upstream_chat(
    request: ChatCompletionRequest, runtime: ModelRuntime, limits: LimitsSettings, session: str | None = None
) -> UpstreamJob:
    """A chat request for an upstream model: its messages, sampling, ``response_format`` and tools as the
    upstream takes them (the legacy ``functions`` as ``tools``), and a prompt-token estimate to reserve.

    The context check is the upstream's (its 400 is passed on); ``max_tokens`` defaults as for a local
    model, so the reservation and the cache key are the same whatever the upstream's own default is.
    """
    upstream = runtime.ready_upstream()
    shape = chat_shape(request, runtime, limits)
    tools = tool_request(request)  # validates tools and tool_choice (400) as for a local model
    messages = engine_messages(request.messages)
    for message in messages:
        if message["role"] == "developer":
            message["role"] = "system"  # not every upstream knows OpenAI's newer name
    body: dict[str, Any] = {"messages": messages, **_upstream_sampling(request, limits)}
    requested = request.max_completion_tokens or request.max_tokens
    max_tokens = requested if requested is not None else limits.max_tokens_default
    body["max_tokens"] = max_tokens
    if request.response_format is not None:
        body["response_format"] = msgspec.to_builtins(request.response_format)
    if tools is not None:
        if request.tools is not None:
            body["tools"] = msgspec.to_builtins(request.tools)  # as sent (descriptions, `strict`)
        else:  # the legacy `functions`, as the tools they are
            functions = msgspec.to_builtins(request.functions or [])
            body["tools"] = [{"type": "function", "function": function} for function in functions]
        choice = tools.choice
        if isinstance(choice, str):
            body["tool_choice"] = choice
        else:
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        if not tools.parallel:
            body["parallel_tool_calls"] = False
    elif request.tool_choice == "none":
        body["tool_choice"] = "none"
    return upstream_chat_job(shape, upstream, body, max_tokens, request.seed, session)


def upstream_chat_job(
    shape: Shape,
    upstream: UpstreamModel,
    body: dict[str, Any],
    max_tokens: int,
    seed: int | None = None,
    session: str | None = None,
) -> UpstreamJob:
    """The job of one chat body for ``POST {base}/chat/completions`` (``messages``, sampling, tools as
    the upstream takes them), with a prompt-token estimate to reserve (messages, tool calls, tools)."""
    estimate = 0
    for message in body["messages"]:
        estimate += estimate_tokens(str(message.get("content") or "")) + _MESSAGE_OVERHEAD_TOKENS
        if message.get("tool_calls"):
            estimate += estimate_tokens(msgspec.json.encode(message["tool_calls"]).decode())
    if "tools" in body:
        estimate += estimate_tokens(msgspec.json.encode(body["tools"]).decode())
    return UpstreamJob(shape, upstream, "chat/completions", [body], [estimate], max_tokens, seed, session)


def prepare_upstream_completion(
    request: CompletionRequest, runtime: ModelRuntime, limits: LimitsSettings
) -> UpstreamJob:
    """A text-completion request for an upstream model: one body per prompt (text prompts only)."""
    upstream = runtime.ready_upstream()
    shape = completion_shape(request, runtime, limits)
    prompts = [item for item in split_inputs(request.prompt, "prompt") if isinstance(item, str)]
    if any(not prompt for prompt in prompts):
        raise InvalidRequestError("`prompt` must not be empty", param="prompt")
    max_tokens = request.max_tokens if request.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    sampling = _upstream_sampling(request, limits)
    bodies = [{"prompt": prompt, "max_tokens": max_tokens, **sampling} for prompt in prompts]
    estimates = [estimate_tokens(prompt) for prompt in prompts]
    return UpstreamJob(shape, upstream, "completions", bodies, estimates, max_tokens, request.seed)


async def run_upstream(
    job: UpstreamJob, notify_s: float | None = None
) -> AsyncGenerator[ChoiceDelta | ChoiceEnd | ChoiceWaiting]:
    """Run every choice of an upstream job one after another (one upstream stream each), yielding each
    upstream chunk as it comes, and a ``ChoiceWaiting`` every ``notify_s`` while a choice waits for room
    on a replica.

    Closing this early closes the upstream request (the upstream stops generating). The request's
    telemetry sees the start, the first token and the token counts (the upstream's where it reports them).
    """
    record = current_request()
    record.slot_acquired(job.prompt_tokens)
    prompt_tokens, finished_tokens, running_tokens = job.prompt_tokens, 0, 0
    try:
        for index in range(job.choices):
            prompt = index // job.n
            body = job.bodies[prompt]
            if job.seed is not None and index % job.n:
                body = {**body, "seed": job.seed + index % job.n}
            if job.max_tokens == 0:
                yield ChoiceEnd(index, "length", 0)
                continue
            events = job.upstream.stream(job.path, body, affinity=job.session, notify_s=notify_s)
            try:
                async for event in events:
                    if isinstance(event, UpstreamWaiting):
                        yield ChoiceWaiting(index)
                        continue
                    if isinstance(event, UpstreamFinish):
                        correction = 0
                        if event.prompt_tokens is not None and index % job.n == 0:
                            correction = event.prompt_tokens - job.prompt_estimates[prompt]
                        prompt_tokens += correction
                        finished_tokens, running_tokens = finished_tokens + event.completion_tokens, 0
                        yield ChoiceEnd(
                            index,
                            event.finish_reason,
                            event.completion_tokens,
                            correction,
                            event.cached_tokens,
                        )
                        continue
                    record.first_token()
                    running_tokens += 1
                    if index == 0:
                        record.add_completion_text(event.text)
                    yield ChoiceDelta(index, event.text, event.tool_calls)
            finally:
                await events.aclose()
    finally:
        record.generated(prompt_tokens, finished_tokens + running_tokens)


@dataclass(slots=True)
class UpstreamEmbeddingJob:
    """The inputs of one ``/v1/embeddings`` request for an upstream model."""

    runtime: ModelRuntime
    upstream: UpstreamModel
    texts: list[str]

    @property
    def total_tokens(self) -> int:
        """Estimated input tokens (corrected by the upstream's usage)."""
        return sum(estimate_tokens(text) for text in self.texts)


def prepare_upstream_embeddings(
    request: EmbeddingRequest, runtime: ModelRuntime, limits: LimitsSettings
) -> UpstreamEmbeddingJob:
    """Validate an embeddings request for an upstream model (text inputs only, no ``dimensions``)."""
    upstream = runtime.ready_upstream()
    items = split_inputs(request.input, "input")
    if len(items) > limits.max_embedding_inputs:
        raise InvalidRequestError(
            f"`input` may hold at most {limits.max_embedding_inputs} items", param="input"
        )
    texts = [item for item in items if isinstance(item, str)]
    if len(texts) != len(items):
        raise InvalidRequestError(
            f"token-id input is not supported for the upstream model {request.model}; send text",
            param="input",
            code="token_ids_not_supported",
        )
    if any(not text for text in texts):
        raise InvalidRequestError("`input` must not contain empty strings", param="input")
    if request.dimensions is not None:
        raise InvalidRequestError(
            f"`dimensions` is not supported for the upstream model {request.model}", param="dimensions"
        )
    return UpstreamEmbeddingJob(runtime, upstream, texts)
