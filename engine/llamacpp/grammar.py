"""JSON Schema to GBNF for ``response_format`` and tool calls, on llama-cpp-python's converter.

llama-cpp-python's ``SchemaConverter`` (a copy of llama.cpp's ``json-schema-to-grammar.py``) has two
gaps that let it produce output a client cannot use, both closed here:

* its string character rule is ``[^"\\\\]``, which admits raw control characters (U+0000-U+001F)
  that JSON forbids inside strings, so ``json.loads`` fails on the answer;
* it ignores ``minimum``/``maximum`` (and their exclusive forms) on numbers and integers.
"""

from __future__ import annotations

import json
import math
from typing import Any

from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, SchemaConverter

from engine.base import GrammarError
from engine.tools import CALL_CLOSE, CALL_OPEN, CALL_SEPARATOR, FunctionChoice, ToolRequest

# JSON's own rule (RFC 8259 section 7): a string character is any code point but '"', '\' and
# U+0000-U+001F; DEL is excluded too, as in llama-cpp-python's json_object grammar.
_UNSAFE_CHAR = PRIMITIVE_RULES["char"].content
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
# The converter's "." of a regex ``pattern``: one JSON string character, not any byte but a newline.
_UNSAFE_DOT = "[^\\x0A\\x0D]"
_JSON_DOT = r'[^"\\\x7F\x00-\x1F]'
_MAX_DIGITS = 15


class JsonSchemaConverter(SchemaConverter):
    """llama-cpp-python's converter with JSON-safe strings and bounded numbers."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

    def _add_rule(self, name: str, rule: str) -> str:
        if rule == _UNSAFE_CHAR:
            rule = _JSON_CHAR
        key: str = super()._add_rule(name, rule.replace(_UNSAFE_DOT, _JSON_DOT))
        return key

    def visit(self, schema: dict[str, Any], name: str) -> str:
        """Add the rules for ``schema`` under ``name``; return the rule name that matches it."""
        kind = schema.get("type")
        if kind in ("integer", "number") and _has_bounds(schema):
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            key: str = self._add_rule(rule_name, _bounded_number(schema, integer=kind == "integer"))
            return key
        inherited: str = super().visit(schema, name)
        return inherited

    def add_schema(self, schema: dict[str, Any], name: str) -> str:
        """Resolve ``schema``'s local ``$ref``s (scoped by ``name``) and add it; return its rule name."""
        resolved = self.resolve_refs(json.loads(json.dumps(schema)), f"{name}:")
        return self.visit(resolved, name)

    def add_rule(self, name: str, rule: str) -> str:
        """Add a hand-written rule; return its (possibly de-duplicated) name."""
        return self._add_rule(name, rule)

    def grammar(self) -> str:
        """The GBNF text of every rule added so far."""
        text: str = self.format_grammar()
        return text


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """GBNF accepting exactly the JSON documents valid under ``schema`` (as far as it is supported).

    Raises:
        GrammarError: the schema uses something the converter cannot express.
    """
    converter = JsonSchemaConverter()
    try:
        converter.add_schema(schema, "")
    except Exception as exc:  # the converter is third-party and fails in many ways (asserts, too)
        raise GrammarError(f"the JSON schema cannot be turned into a grammar: {exc}") from None
    return converter.grammar()


def literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    return json.dumps(text, ensure_ascii=False)


def tool_call_grammar(request: ToolRequest) -> str | None:
    """GBNF for the answer to a chat request with tools, in the ``<tool_call>`` syntax.

    ``auto``: a plain reply (anything not starting with the call marker) or one or more calls;
    ``required`` and a named function: calls only (the named one only); ``none``: no grammar.
    Each call is ``<tool_call>\\n{"name": "<function>", "arguments": <object valid under its schema>}
    \\n</tool_call>``; with ``parallel_tool_calls`` false there is exactly one.

    Raises:
        GrammarError: a function's ``parameters`` cannot be turned into a grammar.
    """
    if request.choice == "none":
        return None
    converter = JsonSchemaConverter()
    offered = request.tools
    if isinstance(request.choice, FunctionChoice):
        offered = tuple(tool for tool in request.tools if tool.name == request.choice.name)
    alternatives = []
    for index, tool in enumerate(offered):
        parameters = tool.parameters or {"type": "object"}
        try:
            arguments = converter.add_schema(parameters, f"fn{index}-arguments")
        except Exception as exc:  # the converter is third-party and fails in many ways (asserts, too)
            raise GrammarError(
                f"the parameters of function {tool.name!r} cannot be turned into a grammar: {exc}"
            ) from None
        head = literal(CALL_OPEN + '{"name": ' + json.dumps(tool.name) + ', "arguments": ')
        tail = literal("}" + CALL_CLOSE)
        alternatives.append(converter.add_rule(f"fn{index}-call", f"{head} {arguments} {tail}"))
    call = converter.add_rule("tool-call", " | ".join(alternatives))
    calls = f"{call} ({literal(CALL_SEPARATOR)} {call})*" if request.parallel else call
    if request.choice == "auto":
        converter.add_rule("tool-calls", calls)
        converter.add_rule("reply-char", "[^\\x00]")
        converter.add_rule("root", f"tool-calls | {_not_prefixed_by(CALL_OPEN.rstrip())}")
    else:
        converter.add_rule("root", calls)
    return converter.grammar()


def _not_prefixed_by(marker: str) -> str:
    """Any text (``reply-char*``) that does not start with ``marker``, as a GBNF expression."""
    options = ['""']
    for length, char in enumerate(marker):
        head = literal(marker[:length]) + " " if length else ""
        options.append(f"{head}[^{_class_escape(char)}] reply-char*")
        if length:
            options.append(literal(marker[:length]))
    return "(" + " | ".join(options) + ")"


def _class_escape(char: str) -> str:
    return "\\" + char if char in "]\\^-" else char


# -- numbers with bounds --------------------------------------------------------------------------------


def _has_bounds(schema: dict[str, Any]) -> bool:
    return any(key in schema for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))


def _bounds(schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
    """``(low, low_exclusive, high, high_exclusive)`` from both JSON Schema drafts' spellings."""
    low, high = schema.get("minimum"), schema.get("maximum")
    low_exclusive = high_exclusive = False
    exclusive_low, exclusive_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(exclusive_low, bool):  # draft 4: a flag on minimum
        low_exclusive = exclusive_low and low is not None
    elif exclusive_low is not None and (low is None or exclusive_low >= low):
        low, low_exclusive = exclusive_low, True
    if isinstance(exclusive_high, bool):
        high_exclusive = exclusive_high and high is not None
    elif exclusive_high is not None and (high is None or exclusive_high <= high):
        high, high_exclusive = exclusive_high, True
    return low, low_exclusive, high, high_exclusive


def _bounded_number(schema: dict[str, Any], *, integer: bool) -> str:
    """GBNF for the integers (and, for ``number``, decimals) within the schema's bounds.

    A decimal ``k.f`` (k >= 0) lies in [k, k+1), ``-m.f`` in (-m-1, -m]: a fraction is offered for
    an integer part whose whole unit interval is inside the bounds, so every output validates.
    Exponents are not offered.
    """
    low, low_exclusive, high, high_exclusive = _bounds(schema)
    first = None if low is None else (math.floor(low) + 1 if low_exclusive else math.ceil(low))
    last = None if high is None else (math.ceil(high) - 1 if high_exclusive else math.floor(high))
    options = _integer_range(first, last)
    if not integer:
        fraction = f'"." [0-9] {_optional_digits(_MAX_DIGITS - 1)}'
        # k.f with k >= 0: needs k >= low (k > low if exclusive) and k + 1 <= high
        positive = _natural_range(
            max(0, first if first is not None else 0), None if high is None else math.floor(high) - 1
        )
        if positive:
            options.append(f"({positive}) {fraction}")
        # -m.f: needs -m <= high (-m < high if exclusive) and -m - 1 >= low
        smallest = 0 if last is None else max(0, -last)
        negative = _natural_range(smallest, None if low is None else math.floor(-low) - 1)
        if negative:
            options.append(f'"-" ({negative}) {fraction}')
    if not options:  # no integer and no whole unit interval fits: offer one valid value
        middle = ((low or 0) + (high or 0)) / 2  # only reachable with both bounds
        options.append(literal(json.dumps(middle)))
    return "(" + " | ".join(options) + ") space"


def _integer_range(first: int | None, last: int | None) -> list[str]:
    """Alternatives for the integers in [first, last] (``None``: unbounded)."""
    if first is not None and last is not None and first > last:
        return []
    options = []
    if last is None or last >= 0:
        natural = _natural_range(max(0, first) if first is not None else 0, last)
        if natural:
            options.append(natural)
    if first is None or first < 0:
        smallest = max(1, -last) if last is not None else 1
        magnitude = _natural_range(smallest, None if first is None else -first)
        if magnitude:
            options.append(f'"-" ({magnitude})')
    return options


def _natural_range(first: int, last: int | None) -> str:
    """GBNF for the decimal spellings (no leading zeros) of the naturals in [first, last]."""
    if last is not None and first > last:
        return ""
    if last is None:
        width = len(str(first))
        options = [_same_width(str(first), "9" * width)]
        if width < _MAX_DIGITS:
            options.append(f"[1-9] {' '.join(['[0-9]'] * width)} {_optional_digits(_MAX_DIGITS - width - 1)}")
        return " | ".join(options)
    options = []
    low = first
    while low <= last:
        width = len(str(low))
        high = min(last, 10**width - 1)
        options.append(_same_width(str(low), str(high)))
        low = high + 1
    return " | ".join(options)


def _same_width(low: str, high: str) -> str:
    """GBNF for the numbers between two digit strings of the same width (the usual regex construction)."""
    if not low:
        return ""
    if low == high:
        return literal(low)
    if len(low) == 1:
        return f"[{low}-{high}]"
    rest = len(low) - 1
    if low[0] == high[0]:
        return f'"{low[0]}" ({_same_width(low[1:], high[1:])})'
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        return f"[{low[0]}-{high[0]}] " + " ".join(["[0-9]"] * rest)
    options = [f'"{low[0]}" ({_same_width(low[1:], "9" * rest)})']
    if int(high[0]) - int(low[0]) >= 2:
        options.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}] " + " ".join(["[0-9]"] * rest))
    options.append(f'"{high[0]}" ({_same_width("0" * rest, high[1:])})')
    return " | ".join(options)


def _optional_digits(count: int) -> str:
    """Up to ``count`` more digits."""
    return "".join("([0-9] " for _ in range(count)).rstrip() + ")?" * count if count > 0 else ""
