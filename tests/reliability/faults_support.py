"""A fault-injecting engine: the real engine, except that marked requests fail mid-generation.

The one scripted part the suites allow: a real model cannot be made to fail on demand. Everything but
``generate`` of a marked prompt goes to the real engine untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from engine.base import CacheScope, Cancellation, Engine, GenerationEvent, GenerationParams

FAULT_MARKER = "FAULT-INJECT"


class FaultyEngine:
    """Wraps a real engine; a prompt containing ``FAULT_MARKER`` fails after ``after`` tokens."""

    def __init__(self, real: Engine, error: Exception, after: int = 3) -> None:
        self.real = real
        self.error = error
        self.after = after
        self.injected = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def generate(
        self,
        slot: int,
        prompt: list[int],
        params: GenerationParams,
        cancel: Cancellation,
        scope: CacheScope | None = None,
    ) -> AsyncIterator[GenerationEvent]:
        """The real generation; for a marked prompt, ``error`` is raised after ``after`` tokens."""
        faulty = FAULT_MARKER in self.real.detokenize(prompt)
        events = self.real.generate(slot, prompt, params, cancel, scope)
        produced = 0
        try:
            async for event in events:
                yield event
                produced += 1
                if faulty and produced >= self.after:
                    self.injected += 1
                    raise self.error
        finally:
            await events.aclose()  # type: ignore[attr-defined]
