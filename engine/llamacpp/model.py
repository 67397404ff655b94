"""What every llama.cpp engine shares: opening a GGUF, its metadata, tokenizer, chat template, grammars.

This package is the only place that imports ``llama_cpp``.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import llama_cpp
from jinja2 import TemplateError as JinjaTemplateError
from llama_cpp import Llama
from llama_cpp._internals import LlamaModel
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF

from engine.base import GrammarError, ModelInfo, ModelLoadError, TemplateError, ToolPrompt
from engine.llamacpp.grammar import json_schema_grammar, tool_call_grammar
from engine.tools import CALL_OPEN, FunctionTool, ToolRequest, generic_messages, template_messages

logger = logging.getLogger("pocketllm.engine")

GGUF_MAGIC = b"GGUF"

# A ChatML template for GGUFs that carry none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def check_gguf(path: Path) -> int:
    """Fail early and clearly on a missing or non-GGUF file; return its size in bytes."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelLoadError(f"model file {path} does not exist") from None
    except OSError as exc:
        raise ModelLoadError(f"model file {path} cannot be read: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"model file {path} is not a GGUF file (bad magic {magic!r})")
    return size


def open_llama(
    path: Path,
    *,
    n_ctx: int,
    n_threads: int,
    n_batch: int,
    embedding: bool = False,
    flash_attention: bool = False,
) -> Llama:
    """Load a llama.cpp context over ``path``; raises ``ModelLoadError`` naming the file."""
    check_gguf(path)
    try:
        return Llama(
            str(path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_batch=n_batch,
            n_ubatch=n_batch,
            embedding=embedding,
            flash_attn=flash_attention and not embedding,
            verbose=os.environ.get("POCKETLLM_LLAMA_VERBOSE") == "1",
        )
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"model file {path} could not be loaded (corrupt or unsupported): {exc}"
        ) from None


class ModelText:
    """Tokenizer, detokenizer and chat template of one loaded model (thread-safe: no context is touched)."""

    def __init__(
        self, model: LlamaModel, path: Path, size_bytes: int, chat_template: str | None, n_ctx: int
    ) -> None:
        self._model = model
        self._vocab = model.vocab
        self._pieces: dict[int, bytes] = {}
        metadata: dict[str, str] = dict(model.metadata())
        self.eos_id = model.token_eos()
        self.bos_id = model.token_bos()
        template_source = "override" if chat_template else "gguf"
        template = chat_template or metadata.get("tokenizer.chat_template")
        if not template:
            template, template_source = CHATML_TEMPLATE, "builtin-chatml"
        self.template_source = template_source
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._piece_text(self.eos_id),
            bos_token=self._piece_text(self.bos_id),
            add_generation_prompt=True,
        )
        self._formatter_no_prompt = Jinja2ChatFormatter(
            template=template,
            eos_token=self._piece_text(self.eos_id),
            bos_token=self._piece_text(self.bos_id),
            add_generation_prompt=False,
        )
        self.info = ModelInfo(
            n_ctx=n_ctx,
            n_ctx_train=model.n_ctx_train(),
            n_vocab=model.n_vocab(),
            n_params=model.n_params(),
            size_bytes=size_bytes,
            chat_template=template,
            description=model.desc(),
            metadata={k: v for k, v in metadata.items() if not k.startswith("tokenizer.ggml.")},
            max_token_bytes=self._longest_token(model.n_vocab()),
        )
        self.path = path
        self.tool_format = self._tool_format(template)

    def _tool_format(self, template: str) -> Literal["hermes", "generic"]:
        """``hermes`` if the template renders ``tools`` and writes calls as ``<tool_call>`` blocks."""
        if CALL_OPEN.strip() not in template:
            return "generic"
        probe = FunctionTool("probe_function_5f3a", "probe", {"type": "object", "properties": {}})
        try:
            text = self.render_chat([{"role": "user", "content": "hi"}], tools=[probe])
        except TemplateError:
            return "generic"
        return "hermes" if probe.name in text else "generic"

    def _longest_token(self, n_vocab: int) -> int:
        buffer = ctypes.create_string_buffer(1024)
        longest = 1
        for token in range(n_vocab):
            length = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
            longest = max(longest, abs(length))
        return longest

    def _piece_text(self, token: int) -> str:
        if token < 0:
            return ""
        return str(self._model.token_get_text(token))

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokenize; special tokens in ``text`` (``<|im_start|>``) are parsed when ``add_special``."""
        # errors="replace": a lone surrogate (valid in JSON escapes, not in UTF-8) becomes "?"
        data = text.encode("utf-8", errors="replace")
        return list(self._model.tokenize(data, add_bos=add_special, special=add_special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Tokens back to text (invalid UTF-8 replaced)."""
        return bytes(self._model.detokenize(list(tokens))).decode("utf-8", errors="replace")

    def piece(self, token: int) -> bytes:
        """The bytes of one token as it appears in output text (special tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is None:
            buffer = ctypes.create_string_buffer(256)
            length = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
            cached = buffer.raw[: max(0, length)]
            self._pieces[token] = cached
        return cached

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ``<|im_end|>``...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[FunctionTool] = (),
        add_generation_prompt: bool = True,
    ) -> str:
        """Render messages (and ``tools``, for templates that render them) with the chat template.

        Raises:
            TemplateError: the template failed on these messages.
        """
        formatter = self._formatter if add_generation_prompt else self._formatter_no_prompt
        openai_tools = [tool.openai() for tool in tools] or None
        try:
            return formatter(messages=list(messages), tools=openai_tools).prompt  # type: ignore[arg-type]
        except (JinjaTemplateError, ValueError, TypeError, KeyError) as exc:
            raise TemplateError(str(exc)) from None

    def tool_prompt(self, messages: Sequence[Mapping[str, Any]], request: ToolRequest) -> ToolPrompt:
        """The prompt and grammar for a chat request with tools (or with tool turns in its history).

        Template-native (``tool_format == "hermes"``): the template renders the tools and the
        history's calls and results. Generic: the tools are described in the system turn and the
        history's calls and results are rendered as text (``engine.tools.generic_messages``).
        ``tool_choice: none`` describes no tools and adds no grammar.

        Raises:
            TemplateError: the template failed on these messages.
            GrammarError: a function's parameters cannot be turned into a grammar.
        """
        grammar = tool_call_grammar(request) if request.calls_allowed else None
        if grammar is not None:
            self.check_grammar(grammar)
        if self.tool_format == "hermes":
            tools = request.tools if request.calls_allowed else ()
            text = self.render_chat(template_messages(messages), tools=tools)
        else:
            text = self.render_chat(generic_messages(messages, request))
        return ToolPrompt(text, grammar, request.calls_allowed, self.tool_format)

    def check_grammar(self, grammar: str) -> None:
        """Compile ``grammar`` against the vocabulary once; raises ``GrammarError`` if it does not parse."""
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise GrammarError("the grammar does not parse")
        llama_cpp.llama_sampler_free(sampler)


def grammar_for_response_format(kind: str, schema: dict[str, Any] | None) -> str | None:
    """GBNF text enforcing a ``response_format``: ``json_object`` or ``json_schema``; ``None`` for text."""
    if kind == "json_object":
        return JSON_GBNF
    if kind == "json_schema":
        return json_schema_grammar(schema) if schema else JSON_GBNF
    return None
