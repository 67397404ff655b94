"""What the batched engine puts into one decode step: slot order, prompt chunks, the batch budget."""

from __future__ import annotations

from engine.base import Cancellation, GenerationParams
from engine.llamacpp.batched import _Job, plan_step


def _job(slot: int, *, next_token: int | None = None, pending: list[int] | None = None) -> _Job:
    job = _Job(slot, [1, 2, 3], GenerationParams(max_tokens=8), Cancellation(), channel=None)  # type: ignore[arg-type]
    job.next_token = next_token
    job.pending = list(pending or [])
    return job


def _running(*jobs: _Job) -> dict[int, _Job]:
    """Keyed by slot in the order given: the order sequences were admitted in."""
    return {job.slot: job for job in jobs}


def test_sequences_go_in_slot_order_whatever_the_admission_order() -> None:
    running = _running(
        _job(3, next_token=30), _job(1, next_token=10), _job(2, next_token=20), _job(0, next_token=5)
    )

    plan = plan_step(running, 512)

    assert [(job.slot, tokens) for job, tokens in plan] == [(0, [5]), (1, [10]), (2, [20]), (3, [30])]


def test_a_prompt_chunk_sits_at_its_slot_between_generating_sequences() -> None:
    reading = _job(1, pending=[7, 8, 9])
    running = _running(_job(2, next_token=20), reading, _job(0, next_token=5))

    plan = plan_step(running, 512)

    assert [(job.slot, tokens) for job, tokens in plan] == [(0, [5]), (1, [7, 8, 9]), (2, [20])]
    assert reading.pending == []


def test_prompts_share_what_the_generating_sequences_leave_of_the_batch() -> None:
    first, second = _job(0, pending=list(range(5))), _job(2, pending=list(range(100, 105)))
    running = _running(second, _job(1, next_token=10), first, _job(3, next_token=30))

    plan = plan_step(running, 8)  # two generating tokens leave six for prompts

    assert [(job.slot, tokens) for job, tokens in plan] == [
        (0, [0, 1, 2, 3, 4]),
        (1, [10]),
        (2, [100]),
        (3, [30]),
    ]
    assert first.pending == [] and second.pending == [101, 102, 103, 104]
    assert sum(len(tokens) for _, tokens in plan) == 8


def test_a_prompt_with_no_room_left_waits_for_the_next_step() -> None:
    waiting = _job(1, pending=[7, 8])
    running = _running(_job(0, pending=list(range(4))), waiting)

    plan = plan_step(running, 4)

    assert [job.slot for job, _ in plan] == [0]
    assert waiting.pending == [7, 8]
