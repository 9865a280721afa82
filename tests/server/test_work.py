"""The work pool: admission by estimated seconds, slots held until threads stop, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from convserve.server import costs, errors
from convserve.server.work import Work, WorkPool


class Recorder:
    def __init__(self) -> None:
        self.admitted: dict[str, float] = {}
        self.stopped: list[tuple[str, str]] = []
        self.finished: list[tuple[str, float]] = []

    def on_admitted_seconds(self, rpc: str, seconds: float) -> None:
        self.admitted[rpc] = seconds

    def on_work_stopped(self, rpc: str, reason: str) -> None:
        self.stopped.append((rpc, reason))

    def on_work_finished(self, rpc: str, estimate_s: float, ran_s: float) -> None:
        self.finished.append((rpc, estimate_s))


def pool_for(recorder: Recorder, **overrides: Any) -> WorkPool:
    values: dict[str, Any] = {
        "slots": 1,
        "max_waiting": 8,
        "max_waiting_elements": 1000,
        "max_waiting_s": 10.0,
        "observer": recorder,
    }
    values.update(overrides)
    return WorkPool(**values)


def units_until_stopped(
    release: threading.Event, entered: threading.Event
) -> Callable[[Work], int]:
    """A computation of many units that checks between them; counts the units it ran."""

    def compute(work: Work) -> int:
        entered.set()
        units = 0
        while not release.wait(0.001):
            work.check()
            units += 1
        return units

    return compute


async def test_a_caller_that_leaves_frees_nothing_until_the_thread_stops() -> None:
    recorder = Recorder()
    pool = pool_for(recorder)
    entered = threading.Event()
    never = threading.Event()
    first = asyncio.create_task(
        pool.run(Work("Convolve", 1.5, None), 10, units_until_stopped(never, entered))
    )
    await asyncio.to_thread(entered.wait, 10)
    assert pool.admitted_s() == 1.5
    assert recorder.admitted["Convolve"] == 1.5
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    # The thread stops at its next check; only then are its slot and seconds free.
    assert await pool.drain(10)
    assert pool.admitted_s() == 0.0
    assert recorder.stopped == [("Convolve", "cancelled")]
    assert recorder.finished == [("Convolve", 1.5)]
    assert await pool.run(Work("Convolve", 0.1, None), 10, lambda work: 7) == 7
    assert await pool.close(0)


async def test_a_queued_request_waits_for_the_slot_of_abandoned_work() -> None:
    pool = pool_for(Recorder())
    entered, release = threading.Event(), threading.Event()
    first = asyncio.create_task(
        pool.run(Work("FitKernel", 1.0, None), 1, units_until_stopped(release, entered))
    )
    await asyncio.to_thread(entered.wait, 10)
    second = asyncio.create_task(pool.run(Work("FitKernel", 1.0, None), 1, lambda work: "two"))
    await asyncio.sleep(0)
    assert pool.waiting == 1
    release.set()
    assert isinstance(await first, int)
    assert await second == "two"
    assert await pool.close(0)


async def test_deadlines_stop_queued_and_running_work() -> None:
    recorder = Recorder()
    pool = pool_for(recorder)
    entered, never = threading.Event(), threading.Event()
    deadline = time.monotonic() + 0.3
    running = asyncio.create_task(
        pool.run(Work("Convolve", 5.0, deadline), 1, units_until_stopped(never, entered))
    )
    queued = asyncio.create_task(pool.run(Work("Convolve", 0.1, deadline), 1, lambda w: 1))
    with pytest.raises(errors.DeadlineExceeded, match="queued"):
        await queued
    with pytest.raises(errors.DeadlineExceeded, match="during the work"):
        await running
    assert await pool.drain(10)
    assert recorder.stopped == [("Convolve", "deadline")]
    with pytest.raises(errors.DeadlineExceeded):
        await pool.run(Work("Convolve", 0.1, time.monotonic() - 1), 1, lambda w: 1)
    assert await pool.close(0)


async def test_admission_bounds_the_seconds_count_and_elements_waiting() -> None:
    pool = pool_for(Recorder(), max_waiting=3, max_waiting_elements=100, max_waiting_s=5.0)
    entered, release = threading.Event(), threading.Event()
    busy = asyncio.create_task(
        pool.run(Work("Convolve", 1.0, None), 1, units_until_stopped(release, entered))
    )
    await asyncio.to_thread(entered.wait, 10)
    waiting = [
        asyncio.create_task(pool.run(Work("Convolve", 2.0, None), 10, lambda w: "ok"))
        for _ in range(2)
    ]
    await asyncio.sleep(0)
    # 4 s wait already; 2 s more would pass the 5 s bound.
    with pytest.raises(errors.ResourceExhausted, match="waiting"):
        await pool.run(Work("Convolve", 2.0, None), 1, lambda w: "no")
    # Cheap work still fits; elements are bounded separately.
    with pytest.raises(errors.ResourceExhausted):
        await pool.run(Work("Convolve", 0.1, None), 90, lambda w: "no")
    cheap = asyncio.create_task(pool.run(Work("Convolve", 0.1, None), 1, lambda w: "cheap"))
    await asyncio.sleep(0)
    with pytest.raises(errors.ResourceExhausted):  # three waiting: the count bound
        await pool.run(Work("Convolve", 0.1, None), 1, lambda w: "no")
    release.set()
    await busy
    assert [await t for t in waiting] == ["ok", "ok"]
    assert await cheap == "cheap"
    assert await pool.close(0)


async def test_work_far_past_its_estimate_is_stopped() -> None:
    now = [100.0]
    recorder = Recorder()
    pool = pool_for(recorder, clock=lambda: now[0])
    work = Work("Convolve", 0.5, None, clock=lambda: now[0])
    limit = work.limit_s
    assert limit == max(costs.OVERRUN_FACTOR * 0.5, 0.5 + costs.MIN_OVERRUN_S)

    def compute(work: Work) -> str:
        now[0] += limit - 0.01
        work.check()  # still within its limit
        now[0] += 0.02
        work.check()
        return "never"

    with pytest.raises(errors.ResourceExhausted, match="estimated"):
        await pool.run(work, 1, compute)
    assert await pool.drain(10)
    assert recorder.stopped == [("Convolve", "overrun")]
    assert await pool.close(0)


async def test_close_stops_running_work_and_reports_threads_that_would_not_stop() -> None:
    recorder = Recorder()
    pool = pool_for(recorder, slots=2)
    entered, never = threading.Event(), threading.Event()
    checking = asyncio.create_task(
        pool.run(Work("Convolve", 1.0, None), 1, units_until_stopped(never, entered))
    )
    await asyncio.to_thread(entered.wait, 10)
    stuck_entered, unstick = threading.Event(), threading.Event()

    def stuck(work: Work) -> str:  # never checks: e.g. one long TensorFlow call
        stuck_entered.set()
        unstick.wait(30)
        return "late"

    ignoring = asyncio.create_task(pool.run(Work("Convolve", 1.0, None), 1, stuck))
    await asyncio.to_thread(stuck_entered.wait, 10)
    assert not await pool.close(0)  # the stuck thread outlived the stop
    with pytest.raises(errors.Unavailable, match="shutting down"):
        await checking
    assert ("Convolve", "shutdown") in recorder.stopped
    with pytest.raises(errors.Unavailable):
        await pool.run(Work("Convolve", 0.1, None), 1, lambda w: 1)
    unstick.set()
    assert await ignoring == "late"


@pytest.mark.parametrize(
    ("cancelled_at", "reason", "raised"),
    [
        (101.5, "deadline", errors.DeadlineExceeded),
        # gRPC's cancellation at the deadline often comes before our clock reaches it,
        # by up to tens of milliseconds on a busy server (see `work.DEADLINE_SLACK_S`).
        (100.998, "deadline", errors.DeadlineExceeded),
        (100.95, "deadline", errors.DeadlineExceeded),
        (100.5, "cancelled", errors.Cancelled),  # the caller went away well before
    ],
)
async def test_a_caller_cancelled_about_at_its_deadline_counts_as_a_deadline_stop(
    cancelled_at: float, reason: str, raised: type[errors.ServeError]
) -> None:
    # gRPC cancels a handler whose deadline passed before the thread's next check.
    now = [100.0]
    recorder = Recorder()
    pool = pool_for(recorder, clock=lambda: now[0])
    entered, release = threading.Event(), threading.Event()
    seen: list[Exception] = []

    def compute(work: Work) -> int:
        entered.set()
        release.wait(30)
        try:
            work.check()  # the first check after the cancellation
        except Exception as exc:
            seen.append(exc)
            raise
        return 1

    work = Work("Convolve", 1.0, 101.0, clock=lambda: now[0])
    task = asyncio.create_task(pool.run(work, 1, compute))
    await asyncio.to_thread(entered.wait, 10)
    now[0] = cancelled_at
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert work.stop_reason == reason
    release.set()
    assert await pool.drain(10)
    assert recorder.stopped == [("Convolve", reason)]
    assert [type(exc) for exc in seen] == [raised]
    assert await pool.close(0)


def test_the_first_stop_reason_holds_and_is_the_one_raised() -> None:
    # The event loop stops the work while its thread is finding the deadline passed.
    work: Work

    def clock() -> float:
        work.cancel("shutdown")
        return 101.0

    work = Work("Convolve", 1.0, 100.0, clock=clock, granted_s=1.0)
    with pytest.raises(errors.Unavailable, match="shutting down"):
        work.check()
    assert work.stop_reason == "shutdown"
    work.cancel("cancelled")
    assert work.stop_reason == "shutdown"
