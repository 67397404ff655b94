"""A bounded host-memory pool of KV states for sequences that lost their slot (LRU, per tenant).

When a slot's sequence is replaced by a request that keeps less than half of it, the engine copies
the sequence's KV state out of the llama.cpp context into this pool; a later request whose prompt
starts with a kept sequence has the state copied back into its slot and only decodes the rest.
The pool holds opaque state blobs and the tokens they cover; the engine does the llama.cpp calls.

Scoping rule: an entry is restored in full only into a request of the same tenant. Another
tenant's entry may supply at most the request's ``shared_prefix`` leading tokens, which the gateway
sets to the part of the prompt that is the chat template's rendering of the system messages (see
``system_prefix``); 0, the default, means no sharing across tenants at all.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engine.base import CacheScope, KVCacheStats

Tokens = npt.NDArray[np.int32]
State = npt.NDArray[np.uint8]

LLAMA_SERVER_CACHE_RAM_MIB = 8192
"""llama-server's default ``--cache-ram``: the bound this pool takes by default, where RAM allows."""


def default_pool_mib(total_mib: int | None = None) -> int:
    """The default bound of the pool: llama-server's 8 GiB, capped at a quarter of the machine's RAM.

    The bound is a ceiling, not an allocation: memory is used only for sequences actually kept. A
    quarter of RAM leaves room for the model, its slots and the rest of the process on small machines.
    """
    if total_mib is None:
        try:
            total_mib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)
        except (ValueError, OSError, AttributeError):  # not a POSIX system that tells
            return 1024
    return max(0, min(LLAMA_SERVER_CACHE_RAM_MIB, total_mib // 4))


DEFAULT_POOL_MIB = default_pool_mib()


def common_prefix(a: Tokens, b: Tokens) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass(eq=False, slots=True)
class Entry:
    """One kept sequence: whose it is, the tokens its KV state covers, the state itself."""

    tenant: str | None
    tokens: Tokens
    state: State

    @property
    def size(self) -> int:
        """Bytes of host memory the state takes."""
        return len(self.state)


class HostKVCache:
    """Kept KV states, least recently used first, within ``capacity`` bytes.

    Mutated only by the engine's decode thread; ``stats`` may be read from any thread.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next_id = 0
        self._size = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def stats(self) -> KVCacheStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return KVCacheStats(
                capacity_bytes=self.capacity,
                size_bytes=self._size,
                entries=len(self._entries),
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )

    def lookup(self, prompt: Tokens, scope: CacheScope, better_than: int) -> tuple[Entry, int] | None:
        """The entry that supplies most of ``prompt``'s leading tokens to ``scope``, and how many.

        Counts a miss and returns ``None`` unless some entry supplies more than ``better_than``
        tokens (what the slot already offers). Ties go to the most recently used entry.
        """
        best: tuple[Entry, int] | None = None
        for entry in reversed(self._entries.values()):
            usable = common_prefix(entry.tokens, prompt)
            if entry.tenant != scope.tenant:
                usable = min(usable, scope.shared_prefix)
            if usable > better_than and (best is None or usable > best[1]):
                best = (entry, usable)
        if best is None:
            with self._lock:
                self._misses += 1
        return best

    def restored(self, entry: Entry, usable: int, tenant: str | None) -> None:
        """Count a hit on ``entry``; drop it when its whole sequence went back into a slot of its
        tenant (the slot holds it now and hands it back here when it is replaced), else mark it used."""
        key = self._key(entry)
        with self._lock:
            self._hits += 1
            if key is None:
                return
            if entry.tenant == tenant and usable == len(entry.tokens):
                del self._entries[key]
                self._size -= entry.size
            else:
                self._entries.move_to_end(key)

    def keep(
        self, tenant: str | None, tokens: Sequence[int], size: int, fill: Callable[[State], bool]
    ) -> bool:
        """Keep a sequence of ``size`` state bytes; ``fill`` copies the state into a buffer.

        Nothing is stored when the tenant already has an entry that starts with these tokens (it is
        marked used instead) or when the state exceeds the whole capacity. The tenant's entries that
        are a prefix of ``tokens`` are dropped as obsolete; least recently used entries go until the
        new one fits. Returns whether the sequence is (now) kept.
        """
        array = np.asarray(tokens, dtype=np.int32)
        for key, entry in list(self._entries.items()):
            if entry.tenant != tenant:
                continue
            shared = common_prefix(entry.tokens, array)
            if shared == len(array):
                with self._lock:
                    self._entries.move_to_end(key)
                return True
            if shared == len(entry.tokens):
                self._remove(key)
        if size > self.capacity:
            return False
        while self._size + size > self.capacity:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            with self._lock:
                self._evictions += 1
        state = np.empty(size, dtype=np.uint8)  # not zeroed: ``fill`` writes every byte, once
        if not fill(state):
            return False
        with self._lock:
            self._entries[self._next_id] = Entry(tenant, array, state)
            self._next_id += 1
            self._size += size
        return True

    def clear(self) -> None:
        """Drop every entry (counters stay)."""
        with self._lock:
            self._entries.clear()
            self._size = 0

    def _key(self, entry: Entry) -> int | None:
        return next((k for k, e in self._entries.items() if e is entry), None)

    def _remove(self, key: int) -> None:
        with self._lock:
            entry = self._entries.pop(key)
            self._size -= entry.size


def system_prefix(
    render: Callable[[Sequence[dict[str, str]]], str],
    tokenize: Callable[[str], list[int]],
    messages: Sequence[dict[str, str]],
    prompt: Sequence[int],
) -> int:
    """How many leading ``prompt`` tokens are the chat template's rendering of the leading system
    messages: the part of a chat prompt that may be shared across tenants (``CacheScope.shared_prefix``).

    ``render`` renders messages without a generation prompt (``engine.render_chat(...,
    add_generation_prompt=False)``). Only tokens equal to that rendering's tokens count, so the
    result never covers a user or assistant message, whatever the template does at the boundary.
    """
    system = []
    for message in messages:
        if message.get("role") not in ("system", "developer"):
            break
        system.append(message)
    if not system:
        return 0
    rendered = np.asarray(tokenize(render(system)), dtype=np.int32)
    return common_prefix(rendered, np.asarray(prompt, dtype=np.int32))
