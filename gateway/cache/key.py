"""What makes two requests the same answer: the cache key, determinism, and per-request cache controls."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

KEY_VERSION = 2
"""Bump when the canonical form changes, so old entries are never read with a new meaning."""

NON_OUTPUT_FIELDS = frozenset({"stream", "stream_options", "user", "cache", "model"})
"""Request fields that never change the generated output.

``model`` is here because the caller passes the resolved model id and the model file's digest instead
(an alias and its model share entries; a new file under the same name does not).
"""

_encoder = msgspec.json.Encoder(order="sorted")


def _canonical(value: Any) -> Any:
    """Integral floats become ints (``0`` and ``0.0`` mean the same to every OpenAI field)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def canonical_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """The output-affecting part of a request body in canonical form.

    Fields in ``NON_OUTPUT_FIELDS`` and top-level ``null`` fields (the same as absent) are dropped;
    integral floats are written as ints. Key order is fixed later by the sorted encoder.
    """
    return {
        key: _canonical(value)
        for key, value in request.items()
        if key not in NON_OUTPUT_FIELDS and value is not None
    }


def cache_key(scope: str, model_id: str, model_digest: str, request: Mapping[str, Any]) -> str:
    """The response-cache key of a request.

    Args:
        scope: whose entry it is: ``"user:<id>"`` for a tenant, ``"shared"`` for a shared cache.
        model_id: the resolved model id (not the alias the client sent).
        model_digest: digest of the model file, so a replaced file never serves old answers.
        request: the request body as plain data (decoded JSON or ``msgspec.to_builtins`` of the Struct),
            after the gateway has filled in its defaults (e.g. ``max_tokens``), so that changing a
            default in settings changes the key.

    Returns:
        A sha256 hex digest over the sorted-key, whitespace-free JSON of every output-affecting field.
    """
    document = {
        "v": KEY_VERSION,
        "scope": scope,
        "model": model_id,
        "digest": model_digest,
        "request": canonical_request(request),
    }
    return hashlib.sha256(_encoder.encode(document)).hexdigest()


def is_deterministic(request: Mapping[str, Any]) -> bool:
    """Whether a request always produces the same output: greedy or seeded, and one choice.

    ``temperature`` must be explicitly ``0`` (absent means the default, which samples) or ``seed`` set;
    ``n`` and ``best_of`` absent or ``1``.
    """
    if request.get("n") not in (None, 1) or request.get("best_of") not in (None, 1):
        return False
    temperature = request.get("temperature")
    greedy = temperature is not None and not isinstance(temperature, bool) and temperature == 0
    return greedy or request.get("seed") is not None


class CacheOptions(Struct, forbid_unknown_fields=True, rename={"no_store": "no-store"}):
    """PocketLLM extension: ``cache`` in a request body controls the response cache for this call."""

    ttl: Annotated[float, Meta(gt=0)] | None = None
    no_store: bool = False


class CachePolicy(Struct, frozen=True, kw_only=True):
    """What one request allows the cache to do."""

    read: bool = True
    """``False`` with ``Cache-Control: no-cache``: never answer from the cache (the answer may be stored)."""
    store: bool = True
    """``False`` with ``Cache-Control: no-store`` or body ``cache: {"no-store": true}``."""
    ttl_s: float | None = None
    """Body ``cache.ttl``: this entry's lifetime instead of the default."""
    opt_in: bool = False
    """The body carried a ``cache`` object that allows storing: cache even a sampled request."""


def _directives(cache_control: str | Iterable[str] | None) -> set[str]:
    if cache_control is None:
        return set()
    values = [cache_control] if isinstance(cache_control, str) else list(cache_control)
    directives = set()
    for value in values:
        for part in value.split(","):
            name = part.split("=", 1)[0].strip().lower()
            if name:
                directives.add(name)
    return directives


def cache_policy(
    cache_control: str | Iterable[str] | None = None, body: CacheOptions | None = None
) -> CachePolicy:
    """The cache policy of one request.

    Args:
        cache_control: the ``Cache-Control`` request header value(s); ``no-cache`` and ``no-store`` are
            understood (both may appear), other directives are ignored.
        body: the request body's ``cache`` extension; ``None`` when absent.

    Returns:
        The policy; a body ``cache`` object without ``no-store`` opts the request in.
    """
    directives = _directives(cache_control)
    store = "no-store" not in directives and not (body is not None and body.no_store)
    return CachePolicy(
        read="no-cache" not in directives,
        store=store,
        ttl_s=body.ttl if body is not None and body.ttl is not None and body.ttl > 0 else None,
        opt_in=body is not None and store,
    )
