"""The cache key: every output-affecting field counts, nothing else does; determinism; per-request policy."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cache.key import CacheOptions, CachePolicy, cache_key, cache_policy, is_deterministic


def options(body: dict[str, Any]) -> CacheOptions:
    """The body ``cache`` extension as the request Struct carries it (either spelling of no-store)."""
    return CacheOptions(ttl=body.get("ttl"), no_store=bool(body.get("no-store", body.get("no_store", False))))


text = st.text(max_size=12)
small_float = st.floats(min_value=0, max_value=2, allow_nan=False).map(lambda x: round(x, 3))
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": text})
OUTPUT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "messages": st.lists(message, min_size=1, max_size=3),
    "temperature": small_float,
    "top_p": small_float,
    "top_k": st.integers(0, 100),
    "min_p": small_float,
    "seed": st.integers(-(2**40), 2**40),
    "max_tokens": st.integers(1, 4096),
    "stop": st.one_of(text, st.lists(text, max_size=3)),
    "presence_penalty": small_float,
    "frequency_penalty": small_float,
    "repeat_penalty": small_float,
    "logit_bias": st.dictionaries(st.integers(0, 50000).map(str), st.integers(-100, 100), max_size=3),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "n": st.integers(1, 4),
    "response_format": st.one_of(
        st.just({"type": "json_object"}),
        st.builds(lambda name: {"type": "json_schema", "json_schema": {"name": name or "x"}}, text),
    ),
}
requests = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": OUTPUT_FIELDS["messages"]},
    optional={k: v for k, v in OUTPUT_FIELDS.items() if k != "messages"},
)


def key(request: dict[str, Any], scope: str = "user:1", model: str = "m", digest: str = "d1") -> str:
    return cache_key(scope, model, digest, request)


def reordered(value: Any) -> Any:
    """The same data with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {k: reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reordered(v) for v in value]
    return value


@settings(max_examples=150, deadline=None)
@given(requests, st.data())
def test_any_output_field_change_changes_the_key(request: dict[str, Any], data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(sorted(OUTPUT_FIELDS)))
    value = data.draw(OUTPUT_FIELDS[field].filter(lambda v: v != request.get(field)))
    assert key({**request, field: value}) != key(request)
    if field in request and field != "messages":
        assert key({k: v for k, v in request.items() if k != field}) != key(request)


@settings(max_examples=150, deadline=None)
@given(requests, st.integers(0, 4))
def test_order_whitespace_and_non_output_fields_do_not(request: dict[str, Any], indent: int) -> None:
    again = json.loads(json.dumps(reordered(request), indent=indent, separators=(" , ", " :  ")))
    assert key(again) == key(request)
    extras = {"stream": True, "stream_options": {"include_usage": True}, "user": "x", "cache": {"ttl": 5}}
    assert key({**request, **extras}) == key(request)
    assert key({**request, "model": "an-alias"}) == key(request)


def test_scope_model_and_digest_are_part_of_the_key() -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    keys = {key(request), key(request, scope="user:2"), key(request, model="m2"), key(request, digest="d2")}
    assert len(keys) == 4
    assert key({**request, "temperature": 0.0}) == key(request)  # 0 and 0.0 are the same value
    assert key({**request, "seed": None}) == key(request)  # null is absent
    assert len(key(request)) == 64


def test_deterministic_requests() -> None:
    base = {"model": "m", "messages": []}
    assert is_deterministic({**base, "temperature": 0})
    assert is_deterministic({**base, "temperature": 0.0, "n": 1})
    assert is_deterministic({**base, "temperature": 0.8, "seed": 7})
    assert not is_deterministic(base)  # default temperature samples
    assert not is_deterministic({**base, "temperature": 0.7})
    assert not is_deterministic({**base, "temperature": 0, "n": 2})
    assert not is_deterministic({**base, "seed": 1, "best_of": 2})
    assert not is_deterministic({**base, "temperature": False})


def test_cache_policy() -> None:
    assert cache_policy() == CachePolicy()
    assert cache_policy("no-cache") == CachePolicy(read=False)
    assert cache_policy("No-Store") == CachePolicy(store=False)
    assert cache_policy("no-cache, no-store") == CachePolicy(read=False, store=False)
    assert cache_policy(["max-age=0", "no-store"]) == CachePolicy(store=False)
    assert cache_policy(None, options({"ttl": 30})) == CachePolicy(ttl_s=30.0, opt_in=True)
    assert cache_policy(None, options({"no-store": True})) == CachePolicy(store=False)
    assert cache_policy(None, options({"no_store": True, "ttl": 5})).store is False
    assert cache_policy("no-store", options({"ttl": 30})).opt_in is False
    assert cache_policy(None, options({"ttl": -1, "no-store": False})) == CachePolicy(opt_in=True)
