"""DynamicBatcher: dispatch rule, splitting, padding, limits, failures, shutdown.

Batches run in a `ManualExecutor` that holds every submitted batch until the
test runs it, so "a batch is running" is a state the test controls; the loop
is advanced with bounded `asyncio.sleep(0)` rounds and time is a fake clock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convserve.server import errors
from convserve.server.batch_runs import AwaitedRuns, BatchRuns, ThreadRuns
from convserve.server.batcher import DynamicBatcher, SummingObserver, default_pad_sizes


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ManualExecutor(concurrent.futures.Executor):
    """Holds submitted calls until `run_next` runs them on the caller's thread."""

    def __init__(self) -> None:
        self.pending: list[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple]] = []
        self.submitted = asyncio.Event()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.pending.append((future, fn, args))
        self.submitted.set()
        return future

    def run_next(self) -> None:
        future, fn, args = self.pending.pop(0)
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)


class Recorder:
    """run_batch = rows * 2, recording every batch it is given."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.copy())
        return batch * 2


class Observer:
    def __init__(self) -> None:
        self.depths: list[int] = []
        self.batches: list[tuple[int, int, list[float], float]] = []

    def on_queue_depth(self, items: int) -> None:
        self.depths.append(items)

    def on_batch(
        self, size: int, padded_size: int, queue_waits_s: Sequence[float], run_s: float
    ) -> None:
        self.batches.append((size, padded_size, list(queue_waits_s), run_s))


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def rows(start: int, n: int, width: int = 3) -> np.ndarray:
    """n rows whose values identify them: row i holds start+i everywhere."""
    return np.repeat(np.arange(start, start + n, dtype=np.float64)[:, None], width, axis=1)


# What `make` hands to the runs rather than to the batcher.
RUNS_OPTIONS = ("prepare", "inline_max_rows", "run_batch_async", "loop_busy")


def make(
    run_batch: Callable[[np.ndarray], np.ndarray] | None = None, **kwargs: Any
) -> tuple[DynamicBatcher, ManualExecutor, Recorder, FakeClock]:
    """A batcher whose batches run in a ManualExecutor (or, with `run_batch_async`, are
    awaited, with `run_batch` inline), on a fake clock."""
    executor = ManualExecutor()
    recorder = Recorder()
    clock = FakeClock()
    runs_options = {key: kwargs.pop(key) for key in RUNS_OPTIONS if key in kwargs}
    model = run_batch or recorder
    run_batch_async = runs_options.pop("run_batch_async", None)
    runs: BatchRuns
    if run_batch_async is not None:
        runs = AwaitedRuns(run_batch_async, run_batch=model, clock=clock, **runs_options)
    else:
        runs = ThreadRuns(model, name="test", executor=executor, clock=clock, **runs_options)
    options: dict[str, Any] = {
        "name": "test",
        "max_batch_size": 8,
        "batch_timeout_s": 1000.0,
        "max_queued_items": 100,
        "clock": clock,
    }
    options.update(kwargs)
    batcher = DynamicBatcher(runs, **options)
    return batcher, executor, recorder, clock


async def run_all(executor: ManualExecutor, limit: int = 100) -> None:
    """Run batches (including ones dispatched as earlier ones finish) until none is left."""
    for _ in range(limit):
        await settle()
        if not executor.pending:
            return
        executor.run_next()
    raise AssertionError("batches kept coming")


def test_default_pad_sizes() -> None:
    assert default_pad_sizes(1) == [1]
    assert default_pad_sizes(8) == [1, 2, 4, 8]
    assert default_pad_sizes(12) == [1, 2, 4, 8, 12]


async def test_lone_request_runs_at_once_as_a_batch_of_one() -> None:
    batcher, executor, recorder, _ = make()
    task = asyncio.create_task(batcher.submit(rows(5, 1)))
    await settle()
    assert len(executor.pending) == 1  # dispatched without waiting for the timeout
    assert batcher.running_batches == 1
    executor.run_next()
    np.testing.assert_array_equal(await task, rows(5, 1) * 2)
    assert [b.shape[0] for b in recorder.batches] == [1]


async def test_lone_request_with_the_default_thread_pool() -> None:
    started = threading.Event()
    release = threading.Event()

    def run_batch(batch: np.ndarray) -> np.ndarray:
        started.set()
        assert release.wait(10)
        return batch + 1

    runs = ThreadRuns(run_batch, name="pool", clock=time.monotonic)
    batcher = DynamicBatcher(
        runs, name="pool", max_batch_size=4, batch_timeout_s=0.0, max_queued_items=8
    )
    task = asyncio.create_task(batcher.submit(rows(0, 3)))
    # The event loop stays free while the model runs in the pool.
    assert await asyncio.to_thread(started.wait, 10)
    assert not task.done()
    release.set()
    result = await asyncio.wait_for(task, 10)
    np.testing.assert_array_equal(result, rows(0, 3) + 1)
    await batcher.close()


async def test_requests_arriving_during_a_batch_are_merged_into_the_next() -> None:
    batcher, executor, recorder, _ = make(max_batch_size=8)
    first = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    assert len(executor.pending) == 1
    later = [asyncio.create_task(batcher.submit(rows(10 * (i + 1), 2))) for i in range(3)]
    await settle()
    assert len(executor.pending) == 1  # one slot: the others wait
    assert batcher.queued_items == 6
    executor.run_next()
    await settle()
    assert first.done()
    assert len(executor.pending) == 1  # all three merged into one batch
    assert batcher.queued_items == 0
    executor.run_next()
    results = await asyncio.gather(*later)
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, rows(10 * (i + 1), 2) * 2)
    assert [b.shape[0] for b in recorder.batches] == [1, 8]  # 6 rows padded to 8


async def test_max_batch_size_is_respected() -> None:
    batcher, executor, recorder, _ = make(max_batch_size=4)
    blocker = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    tasks = [asyncio.create_task(batcher.submit(rows(100 + i, 1))) for i in range(10)]
    await run_all(executor)
    await blocker
    results = await asyncio.gather(*tasks)
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, rows(100 + i, 1) * 2)
    assert [b.shape[0] for b in recorder.batches] == [1, 4, 4, 2]


async def test_oversized_request_is_split_and_reassembled_in_order() -> None:
    batcher, executor, recorder, _ = make(max_batch_size=4)
    task = asyncio.create_task(batcher.submit(rows(0, 11)))
    await run_all(executor)
    np.testing.assert_array_equal(await task, rows(0, 11) * 2)
    assert [b.shape[0] for b in recorder.batches] == [4, 4, 4]  # 4 + 4 + 3 padded to 4
    np.testing.assert_array_equal(recorder.batches[0], rows(0, 4))
    np.testing.assert_array_equal(recorder.batches[2][:3], rows(8, 3))


async def test_split_request_shares_batches_with_others() -> None:
    batcher, executor, _, _ = make(max_batch_size=4, max_concurrent_batches=2)
    blocker = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    big = asyncio.create_task(batcher.submit(rows(100, 6)))
    small = asyncio.create_task(batcher.submit(rows(200, 1)))
    await run_all(executor)
    await blocker
    np.testing.assert_array_equal(await big, rows(100, 6) * 2)
    np.testing.assert_array_equal(await small, rows(200, 1) * 2)


async def test_padding_repeats_the_last_row_and_never_leaks() -> None:
    batcher, executor, recorder, _ = make(max_batch_size=16, pad_sizes=[4, 16])
    assert batcher.pad_sizes == (4, 16)
    blocker = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    a = asyncio.create_task(batcher.submit(rows(10, 2)))
    b = asyncio.create_task(batcher.submit(rows(20, 3)))
    await run_all(executor)
    assert [x.shape[0] for x in recorder.batches] == [4, 16]
    batch = recorder.batches[1]
    np.testing.assert_array_equal(batch[:5], np.concatenate([rows(10, 2), rows(20, 3)]))
    np.testing.assert_array_equal(batch[5:], np.repeat(rows(22, 1), 11, axis=0))
    np.testing.assert_array_equal(await blocker, rows(0, 1) * 2)
    result_a, result_b = await a, await b
    assert result_a.shape == (2, 3)
    assert result_b.shape == (3, 3)
    np.testing.assert_array_equal(result_a, rows(10, 2) * 2)
    np.testing.assert_array_equal(result_b, rows(20, 3) * 2)


async def test_queue_full_raises_at_once_without_affecting_others() -> None:
    batcher, executor, _, _ = make(max_batch_size=4, max_queued_items=5)
    running = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    queued = asyncio.create_task(batcher.submit(rows(10, 4)))
    await settle()
    assert batcher.queued_items == 4
    with pytest.raises(errors.ResourceExhausted, match="queue is full"):
        await batcher.submit(rows(20, 2))
    assert batcher.queued_items == 4
    fits = asyncio.create_task(batcher.submit(rows(30, 1)))
    await run_all(executor)
    np.testing.assert_array_equal(await running, rows(0, 1) * 2)
    np.testing.assert_array_equal(await queued, rows(10, 4) * 2)
    np.testing.assert_array_equal(await fits, rows(30, 1) * 2)


async def test_expired_deadline_fails_before_reaching_the_model() -> None:
    batcher, executor, recorder, clock = make()
    running = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    doomed = asyncio.create_task(batcher.submit(rows(50, 2), deadline=5.0))
    fine = asyncio.create_task(batcher.submit(rows(60, 1), deadline=50.0))
    await settle()
    clock.now = 10.0
    await run_all(executor)
    with pytest.raises(errors.DeadlineExceeded):
        await doomed
    np.testing.assert_array_equal(await fine, rows(60, 1) * 2)
    await running
    seen = np.concatenate(recorder.batches)
    assert not np.any((seen == 50) | (seen == 51))
    assert batcher.queued_items == 0


async def test_deadline_not_yet_passed_runs() -> None:
    batcher, executor, _, clock = make()
    clock.now = 3.0
    task = asyncio.create_task(batcher.submit(rows(1, 1), deadline=3.5))
    await run_all(executor)
    np.testing.assert_array_equal(await task, rows(1, 1) * 2)


async def test_cancelled_request_is_dropped_and_its_items_freed() -> None:
    batcher, executor, recorder, _ = make(max_queued_items=6)
    running = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    cancelled = asyncio.create_task(batcher.submit(rows(70, 5)))
    await settle()
    assert batcher.queued_items == 5
    cancelled.cancel()
    await settle()
    assert cancelled.cancelled()
    assert batcher.queued_items == 0
    kept = asyncio.create_task(batcher.submit(rows(80, 5)))  # fits only because 5 were freed
    await run_all(executor)
    np.testing.assert_array_equal(await kept, rows(80, 5) * 2)
    await running
    seen = np.concatenate(recorder.batches)
    assert not np.any((seen >= 70) & (seen < 75))


async def test_cancelled_split_request_drops_its_remaining_parts() -> None:
    batcher, executor, recorder, _ = make(max_batch_size=2)
    task = asyncio.create_task(batcher.submit(rows(0, 6)))
    await settle()
    assert len(executor.pending) == 1
    task.cancel()
    await settle()
    assert batcher.queued_items == 0
    await run_all(executor)
    assert len(recorder.batches) == 1  # only the part already running


async def test_failure_reaches_every_waiter_and_the_batcher_keeps_working() -> None:
    calls = {"n": 0}

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("model exploded")
        return batch * 2

    batcher, executor, _, _ = make(flaky)
    first = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    mates = [asyncio.create_task(batcher.submit(rows(10 + i, 1))) for i in range(3)]
    await run_all(executor)
    await first
    for mate in mates:
        with pytest.raises(RuntimeError, match="model exploded"):
            await mate
    after = asyncio.create_task(batcher.submit(rows(40, 2)))
    await run_all(executor)
    np.testing.assert_array_equal(await after, rows(40, 2) * 2)


async def test_wrong_output_length_is_internal_for_the_whole_batch() -> None:
    batcher, executor, _, _ = make(lambda batch: batch[:-1])
    first = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    mates = [asyncio.create_task(batcher.submit(rows(10 + i, 1))) for i in range(2)]
    await run_all(executor)
    for task in [first, *mates]:
        with pytest.raises(errors.Internal):
            await task


async def test_timeout_dispatch_with_two_slots() -> None:
    batcher, executor, _, clock = make(max_batch_size=8, max_concurrent_batches=2)
    first = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    assert len(executor.pending) == 1
    clock.now = 1.0
    second = asyncio.create_task(batcher.submit(rows(10, 1)))  # forming batch starts at t=1
    await settle()
    assert len(executor.pending) == 1  # a slot is free, but neither full nor timed out
    clock.now = 1000.5
    third = asyncio.create_task(batcher.submit(rows(20, 1)))
    await settle()
    assert len(executor.pending) == 1  # 999.5 s since the forming batch began: still waiting
    clock.now = 1001.0
    fourth = asyncio.create_task(batcher.submit(rows(30, 1)))
    await settle()
    assert len(executor.pending) == 2  # timed out: the second slot takes all three
    assert batcher.queued_items == 0
    await run_all(executor)
    for task, start in [(first, 0), (second, 10), (third, 20), (fourth, 30)]:
        np.testing.assert_array_equal(await task, rows(start, 1) * 2)


async def test_full_batch_dispatches_into_a_free_slot_before_the_timeout() -> None:
    batcher, executor, recorder, _ = make(max_batch_size=4, max_concurrent_batches=2)
    first = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    more = [asyncio.create_task(batcher.submit(rows(10 + i, 1))) for i in range(3)]
    await settle()
    assert len(executor.pending) == 1
    last = asyncio.create_task(batcher.submit(rows(20, 1)))
    await settle()
    assert len(executor.pending) == 2
    await run_all(executor)
    assert [b.shape[0] for b in recorder.batches] == [1, 4]
    await asyncio.gather(first, last, *more)


async def test_timer_dispatches_when_nothing_else_happens() -> None:
    batcher, executor, _, _ = make(
        max_concurrent_batches=2, batch_timeout_s=0.001, clock=time.monotonic
    )
    first = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    executor.submitted.clear()
    second = asyncio.create_task(batcher.submit(rows(10, 1)))
    await asyncio.wait_for(executor.submitted.wait(), 10)
    assert len(executor.pending) == 2
    await run_all(executor)
    await asyncio.gather(first, second)


async def test_requests_of_different_shapes_never_share_a_batch() -> None:
    batcher, executor, recorder, _ = make()
    first = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    wide = asyncio.create_task(batcher.submit(rows(10, 2, width=5)))
    narrow = asyncio.create_task(batcher.submit(rows(20, 2)))
    await run_all(executor)
    np.testing.assert_array_equal(await wide, rows(10, 2, width=5) * 2)
    np.testing.assert_array_equal(await narrow, rows(20, 2) * 2)
    await first
    assert [b.shape for b in recorder.batches] == [(1, 3), (2, 5), (2, 3)]


async def test_without_prepare_dtypes_never_share_a_batch() -> None:
    batcher, executor, recorder, _ = make()
    first = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    small = asyncio.create_task(batcher.submit(rows(10, 2).astype(np.uint8)))
    wide = asyncio.create_task(batcher.submit(rows(20, 2)))
    await run_all(executor)
    await asyncio.gather(first, small, wide)
    assert [(b.shape[0], b.dtype) for b in recorder.batches] == [
        (1, np.float64),
        (2, np.uint8),
        (2, np.float64),
    ]


async def test_prepare_runs_in_the_executor_and_lets_dtypes_share_a_batch() -> None:
    loop_thread = threading.get_ident()
    prepared_on: list[int] = []

    def prepare(piece: np.ndarray) -> np.ndarray:
        prepared_on.append(threading.get_ident())
        return piece.astype(np.float64) / 10 if piece.dtype == np.uint8 else piece

    recorder = Recorder()
    release = threading.Event()

    def run_batch(batch: np.ndarray) -> np.ndarray:
        # The first batch is held until the next two requests have queued up.
        assert release.wait(10)
        return recorder(batch)

    batcher = DynamicBatcher(
        ThreadRuns(run_batch, name="prepare", prepare=prepare, clock=time.monotonic),
        name="prepare",
        max_batch_size=8,
        batch_timeout_s=0.0,
        max_queued_items=100,
        max_concurrent_batches=1,
    )
    first = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    small = asyncio.create_task(batcher.submit((rows(10, 2) * 10).astype(np.uint8)))
    wide = asyncio.create_task(batcher.submit(rows(20, 2)))
    await settle()
    release.set()
    results = await asyncio.wait_for(asyncio.gather(first, small, wide), 10)
    np.testing.assert_array_equal(results[1], rows(10, 2) * 2)
    np.testing.assert_array_equal(results[2], rows(20, 2) * 2)
    # The uint8 and float64 requests were merged into one float64 batch (padded to 4).
    assert [(b.shape[0], b.dtype) for b in recorder.batches] == [(1, np.float64), (4, np.float64)]
    assert prepared_on
    assert loop_thread not in prepared_on
    await batcher.close()


async def test_small_batch_on_an_idle_model_runs_inline_on_the_loop() -> None:
    loop_thread = threading.get_ident()
    ran_on: list[int] = []

    def run_batch(batch: np.ndarray) -> np.ndarray:
        ran_on.append(threading.get_ident())
        return batch * 2

    batcher, executor, _, _ = make(run_batch, inline_max_rows=4)
    result = await batcher.submit(rows(0, 3))
    np.testing.assert_array_equal(result, rows(0, 3) * 2)
    assert ran_on == [loop_thread]
    assert executor.pending == []
    # Over the inline limit: the batch goes to the executor.
    big = asyncio.create_task(batcher.submit(rows(10, 5)))
    await executor.submitted.wait()
    assert len(executor.pending) == 1
    await run_all(executor)
    np.testing.assert_array_equal(await big, rows(10, 5) * 2)


async def test_while_a_batch_runs_small_requests_queue_instead_of_running_inline() -> None:
    batcher, executor, recorder, _ = make(inline_max_rows=4, max_batch_size=8)
    big = asyncio.create_task(batcher.submit(rows(0, 6)))
    await executor.submitted.wait()
    small = [asyncio.create_task(batcher.submit(rows(10 + 2 * i, 2))) for i in range(2)]
    await settle()
    assert not any(t.done() for t in small)  # the model is busy: nothing ran inline
    executor.run_next()  # the big batch finishes; the two small ones form the next batch
    await settle()
    # That next batch (4 rows) found the model idle, so it ran inline at once.
    assert executor.pending == []
    results = await asyncio.gather(big, *small)
    np.testing.assert_array_equal(results[1], rows(10, 2) * 2)
    np.testing.assert_array_equal(results[2], rows(12, 2) * 2)
    assert [b.shape[0] for b in recorder.batches] == [8, 4]  # 6 padded to 8, then 2 + 2


async def test_only_a_batch_that_empties_the_queue_runs_inline() -> None:
    batcher, executor, recorder, _ = make(inline_max_rows=4, max_batch_size=4)
    task = asyncio.create_task(batcher.submit(rows(0, 10)))
    await settle()
    # 4 + 4 + 2 rows: while parts remain queued, each goes to the executor ...
    for _ in range(2):
        assert len(executor.pending) == 1
        executor.run_next()
        await settle()
    # ... and the last one, which leaves the queue empty, ran inline.
    assert executor.pending == []
    np.testing.assert_array_equal(await task, rows(0, 10) * 2)
    assert [b.shape[0] for b in recorder.batches] == [4, 4, 2]


async def test_inline_calls_still_give_the_loop_a_turn() -> None:
    batcher, executor, _, _ = make(inline_max_rows=4)
    other_work = asyncio.Event()
    asyncio.get_running_loop().call_soon(other_work.set)
    for n in range(3):
        np.testing.assert_array_equal(await batcher.submit(rows(n, 1)), rows(n, 1) * 2)
    assert executor.pending == []
    assert other_work.is_set()


async def test_an_inline_failure_reaches_only_its_batch() -> None:
    calls = 0

    def run_batch(batch: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("model exploded")
        return batch * 2

    batcher, executor, _, _ = make(run_batch, inline_max_rows=4)
    with pytest.raises(RuntimeError, match="model exploded"):
        await batcher.submit(rows(0, 2))
    np.testing.assert_array_equal(await batcher.submit(rows(5, 1)), rows(5, 1) * 2)
    assert batcher.queued_items == 0
    assert executor.pending == []
    await batcher.close()


async def test_observer_sees_depths_and_batches() -> None:
    observer = Observer()
    batcher, executor, _, clock = make(observer=observer)
    first = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    second = asyncio.create_task(batcher.submit(rows(10, 3)))
    await settle()
    clock.now = 2.5
    await run_all(executor)
    await asyncio.gather(first, second)
    assert observer.depths == [3, 0]  # the first ran as a batch of its own, never queued
    assert [(b[0], b[1], b[2]) for b in observer.batches] == [(1, 1, [0.0]), (3, 4, [2.5])]


async def test_close_with_drain_finishes_queued_work() -> None:
    batcher, executor, _, _ = make()
    first = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    second = asyncio.create_task(batcher.submit(rows(10, 2)))
    await settle()
    closing = asyncio.create_task(batcher.close(drain=True))
    await settle()
    with pytest.raises(errors.Unavailable):
        await batcher.submit(rows(20, 1))
    assert not closing.done()
    await run_all(executor)
    await asyncio.wait_for(closing, 10)
    np.testing.assert_array_equal(await first, rows(0, 1) * 2)
    np.testing.assert_array_equal(await second, rows(10, 2) * 2)


async def test_close_without_drain_fails_queued_work() -> None:
    batcher, executor, recorder, _ = make()
    first = asyncio.create_task(batcher.submit(rows(0, 1)))
    await settle()
    second = asyncio.create_task(batcher.submit(rows(10, 2)))
    await settle()
    closing = asyncio.create_task(batcher.close(drain=False))
    await settle()
    with pytest.raises(errors.Unavailable):
        await second
    assert not closing.done()  # the running batch still finishes
    await run_all(executor)
    await asyncio.wait_for(closing, 10)
    np.testing.assert_array_equal(await first, rows(0, 1) * 2)
    assert len(recorder.batches) == 1
    with pytest.raises(errors.Unavailable):
        await batcher.submit(rows(20, 1))


def test_rejects_bad_configuration() -> None:
    identity = AwaitedRuns(AsyncModel(), clock=time.monotonic)  # never called
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(identity, name="x", max_batch_size=0, batch_timeout_s=0, max_queued_items=1)
    with pytest.raises(ValueError, match="pad_sizes"):
        DynamicBatcher(
            identity,
            name="x",
            max_batch_size=4,
            batch_timeout_s=0,
            max_queued_items=1,
            pad_sizes=[0, 4],
        )


@settings(deadline=None, max_examples=40)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=12),
    max_batch_size=st.integers(1, 9),
    slots=st.integers(1, 3),
    cancel=st.sets(st.integers(0, 11), max_size=3),
    inline_max_rows=st.sampled_from([0, 2, 16]),
)
def test_every_waiter_gets_exactly_its_own_rows(
    sizes: list[int], max_batch_size: int, slots: int, cancel: set[int], inline_max_rows: int
) -> None:
    async def scenario() -> None:
        observer = Observer()
        batcher, executor, recorder, _ = make(
            max_batch_size=max_batch_size,
            max_concurrent_batches=slots,
            max_queued_items=1000,
            observer=observer,
            inline_max_rows=inline_max_rows,
        )
        starts = np.cumsum([0, *sizes])[:-1] * 1.0
        tasks = []
        for i, (start, n) in enumerate(zip(starts, sizes, strict=True)):
            tasks.append(asyncio.create_task(batcher.submit(rows(int(start), n))))
            if i % 3 == 0:
                await settle(2)
        await settle(2)
        for i in cancel:
            if i < len(tasks):
                tasks[i].cancel()
        await run_all(executor, limit=1000)
        for i, (task, start, n) in enumerate(zip(tasks, starts, sizes, strict=True)):
            if task.cancelled():
                assert i in cancel
                continue
            np.testing.assert_array_equal(await task, rows(int(start), n) * 2)
        for batch, (size, padded, _, _) in zip(recorder.batches, observer.batches, strict=True):
            assert size <= max_batch_size
            assert batch.shape[0] == padded == batcher.padded_size(size)
            assert padded in batcher.pad_sizes
        assert batcher.queued_items == 0
        assert batcher.running_batches == 0
        await batcher.close()

    asyncio.run(scenario())


# -- run_batch_async: the model call awaited on the event loop ------------------------


class AsyncModel:
    """run_batch_async whose calls wait until the test answers them (rows * 2 by default)."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        self.deadlines: list[float | None] = []
        self.tasks: list[asyncio.Task[Any] | None] = []
        # What computes the batches run inline (`make_async` sets it).
        self.inline = Recorder()

    async def __call__(self, batch: np.ndarray, deadline: float | None) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.calls.append((batch.copy(), future))
        self.deadlines.append(deadline)
        self.tasks.append(asyncio.current_task())
        return await future

    def answer(self, index: int = 0, result: np.ndarray | BaseException | None = None) -> None:
        batch, future = self.calls.pop(index)
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(batch * 2 if result is None else result)


def make_async(**kwargs: Any) -> tuple[DynamicBatcher, ManualExecutor, AsyncModel, Observer]:
    batcher, executor, model, observer, _ = make_async_with_clock(**kwargs)
    return batcher, executor, model, observer


def make_async_with_clock(
    **kwargs: Any,
) -> tuple[DynamicBatcher, ManualExecutor, AsyncModel, Observer, FakeClock]:
    model, observer = AsyncModel(), Observer()
    kwargs.setdefault("inline_max_rows", 0)
    batcher, executor, model.inline, clock = make(
        run_batch_async=model, observer=observer, **kwargs
    )
    return batcher, executor, model, observer, clock


async def test_an_idle_model_answers_a_small_batch_inline_even_with_worker_processes() -> None:
    """With `run_batch_async` (worker processes), a small batch for an idle model still
    runs through `run_batch` on the loop; while a batch runs, requests go the async way."""
    busy = False
    batcher, executor, model, _ = make_async(
        max_concurrent_batches=2, inline_max_rows=2, loop_busy=lambda: busy
    )
    recorder = model.inline
    np.testing.assert_array_equal(await batcher.submit(rows(0, 2)), rows(0, 2) * 2)
    assert [b.shape[0] for b in recorder.batches] == [2]
    assert model.calls == []
    # Other work waiting on the loop (e.g. other calls' messages): no batch runs inline.
    busy = True
    waiting = asyncio.ensure_future(batcher.submit(rows(5, 1)))
    await settle()
    assert [b.shape[0] for b, _ in model.calls] == [1]
    model.answer()
    np.testing.assert_array_equal(await waiting, rows(5, 1) * 2)
    busy = False
    big = asyncio.ensure_future(batcher.submit(rows(10, 3)))  # over the inline limit
    await settle()
    assert [b.shape[0] for b, _ in model.calls] == [4]  # 3 rows padded to 4
    small = asyncio.ensure_future(batcher.submit(rows(20, 1)))  # a batch runs: not inline
    await settle()
    assert not small.done()
    assert len(recorder.batches) == 1
    model.answer()
    np.testing.assert_array_equal(await big, rows(10, 3) * 2)
    # The model is idle again: the queued small batch ran inline.
    np.testing.assert_array_equal(await small, rows(20, 1) * 2)
    assert [b.shape[0] for b in recorder.batches] == [2, 1]
    assert model.calls == []
    assert executor.pending == []


async def test_a_spare_slot_takes_only_full_batches() -> None:
    """Every regular slot busy: a partial batch waits (for its timeout or a free slot),
    a full one starts at once in the spare slot."""
    batcher, _, model, observer, clock = make_async_with_clock(
        max_concurrent_batches=1, spare_batches=1, max_batch_size=4
    )
    first = asyncio.ensure_future(batcher.submit(rows(0, 4)))
    await settle()
    partial = asyncio.ensure_future(batcher.submit(rows(10, 2)))
    await settle()
    assert [b.shape[0] for b, _ in model.calls] == [4]  # the 2 rows wait
    more = asyncio.ensure_future(batcher.submit(rows(20, 2)))  # now a full batch is queued
    await settle()
    assert [b.shape[0] for b, _ in model.calls] == [4, 4]
    assert batcher.running_batches == 2
    third = asyncio.ensure_future(batcher.submit(rows(30, 4)))  # no slot at all: waits
    await settle()
    assert len(model.calls) == 2
    model.answer()
    await settle()
    assert [b.shape[0] for b, _ in model.calls] == [4, 4]  # the third took the free slot
    model.answer()
    model.answer()
    np.testing.assert_array_equal(await first, rows(0, 4) * 2)
    np.testing.assert_array_equal(await partial, rows(10, 2) * 2)
    np.testing.assert_array_equal(await more, rows(20, 2) * 2)
    np.testing.assert_array_equal(await third, rows(30, 4) * 2)
    assert [size for size, _, _, _ in observer.batches] == [4, 4, 4]
    assert clock.now == 0.0  # nothing waited for the batch timeout


async def test_async_model_calls_batch_on_the_loop_without_threads() -> None:
    batcher, executor, model, observer = make_async(max_concurrent_batches=1)
    first = asyncio.ensure_future(batcher.submit(rows(0, 1)))
    await settle()
    assert [b.shape[0] for b, _ in model.calls] == [1]
    # While it runs, the next requests queue and then go out as one padded batch.
    later = [asyncio.ensure_future(batcher.submit(rows(10 * i, 2))) for i in range(1, 4)]
    await settle()
    assert len(model.calls) == 1
    model.answer()
    await settle()
    np.testing.assert_array_equal(await first, rows(0, 1) * 2)
    assert [b.shape[0] for b, _ in model.calls] == [8]  # 6 rows padded to 8
    padded = model.calls[0][0]
    np.testing.assert_array_equal(padded[6:], np.repeat(padded[5:6], 2, axis=0))
    model.answer()
    for i, task in enumerate(later, start=1):
        np.testing.assert_array_equal(await task, rows(10 * i, 2) * 2)
    assert executor.pending == []
    assert [(size, padded) for size, padded, _, _ in observer.batches] == [(1, 1), (6, 8)]


async def test_async_model_prepares_only_batches_of_mixed_dtypes() -> None:
    prepared: list[np.dtype] = []

    def prepare(piece: np.ndarray) -> np.ndarray:
        prepared.append(piece.dtype)
        return piece.astype(np.float32) / 2

    batcher, _, model, _ = make_async(max_concurrent_batches=1, prepare=prepare)
    blocker = asyncio.ensure_future(batcher.submit(np.ones((1, 3), np.uint8)))
    await settle()
    # Alone, uint8 rows reach the model as they are (it scales them itself).
    assert model.calls[0][0].dtype == np.uint8
    assert prepared == []
    same = [asyncio.ensure_future(batcher.submit(np.full((1, 3), 4, np.uint8))) for _ in range(2)]
    mixed = asyncio.ensure_future(batcher.submit(np.full((1, 3), 0.5, np.float32)))
    await settle()
    model.answer()
    await settle()
    # uint8 and float32 rows in one batch: every piece goes through prepare.
    assert model.calls[0][0].dtype == np.float32
    assert prepared == [np.uint8, np.uint8, np.float32]
    model.answer()
    await asyncio.gather(blocker, *same, mixed)
    np.testing.assert_array_equal(await mixed, np.full((1, 3), 0.5, np.float32))


async def test_async_model_failures_and_wrong_row_counts_reach_every_waiter() -> None:
    batcher, _, model, _ = make_async(max_concurrent_batches=1)
    blocker = asyncio.ensure_future(batcher.submit(rows(0, 1)))
    await settle()
    waiting = [asyncio.ensure_future(batcher.submit(rows(i, 1))) for i in range(3)]
    await settle()
    model.answer(result=RuntimeError("worker gone"))
    await settle()
    with pytest.raises(RuntimeError, match="worker gone"):
        await blocker
    model.answer(result=np.zeros((3, 3)))  # the batch of three padded to 4 rows
    for task in waiting:
        with pytest.raises(errors.Internal, match="wrong number of rows"):
            await task
    # Nothing is left behind: the batcher takes new work.
    after = asyncio.ensure_future(batcher.submit(rows(7, 1)))
    await settle()
    model.answer()
    np.testing.assert_array_equal(await after, rows(7, 1) * 2)
    assert batcher.queued_items == 0
    await batcher.close()


async def test_async_model_gets_the_latest_deadline_of_its_batch() -> None:
    batcher, _, model, _, clock = make_async_with_clock(max_concurrent_batches=1)
    clock.now = 100.0
    blocker = asyncio.ensure_future(batcher.submit(rows(0, 1), deadline=150.0))
    await settle()
    # A lone request: its own deadline.
    assert model.deadlines == [150.0]
    # The next batch holds requests with deadlines 120, 130 and 110: the model
    # may give up only when the last of its callers has stopped waiting.
    timed = [
        asyncio.ensure_future(batcher.submit(rows(10 * i, 1), deadline=d))
        for i, d in enumerate((120.0, 130.0, 110.0), start=1)
    ]
    await settle()
    model.answer()
    await settle()
    assert model.deadlines == [150.0, 130.0]
    # One caller without a deadline waits for as long as the batch takes: no deadline.
    untimed = [
        asyncio.ensure_future(batcher.submit(rows(50, 1), deadline=140.0)),
        asyncio.ensure_future(batcher.submit(rows(60, 1))),
    ]
    await settle()
    model.answer()
    await settle()
    assert model.deadlines == [150.0, 130.0, None]
    model.answer()
    await asyncio.gather(blocker, *timed, *untimed)
    # A request whose deadline passed while it was queued never reaches the model.
    held = asyncio.ensure_future(batcher.submit(rows(70, 1), deadline=200.0))
    await settle()
    late = asyncio.ensure_future(batcher.submit(rows(80, 1), deadline=201.0))
    kept = asyncio.ensure_future(batcher.submit(rows(90, 1), deadline=300.0))
    await settle()
    clock.now = 250.0
    model.answer()
    with pytest.raises(errors.DeadlineExceeded, match="queued"):
        await late
    await settle()
    assert model.deadlines[-1] == 300.0
    assert model.calls[0][0].shape[0] == 1  # only the request still in time
    model.answer()
    np.testing.assert_array_equal(await kept, rows(90, 1) * 2)
    await held
    await batcher.close()


def test_a_summing_observer_reports_the_total_depth_and_passes_batches_on() -> None:
    inner = Observer()
    queued = {"v1": 3, "v2": 4}
    shared = SummingObserver(inner, lambda: sum(queued.values()))
    shared.on_queue_depth(3)  # one batcher's own depth is replaced by the total
    queued["v1"] = 0
    shared.on_queue_depth(0)
    shared.on_batch(5, 8, [0.25, 0.5], 0.125)
    assert inner.depths == [7, 4]
    assert inner.batches == [(5, 8, [0.25, 0.5], 0.125)]


async def test_a_request_that_makes_a_batch_of_its_own_runs_in_its_callers_task() -> None:
    """Nothing queued and no batch running, or a request that fills a batch: no queue,
    no batcher task; the caller's task calls the model (here with its deadline)."""
    batcher, _, model, observer = make_async(max_concurrent_batches=2, max_batch_size=4)
    lone = asyncio.ensure_future(batcher.submit(rows(0, 3), deadline=50.0))
    await settle()
    full = asyncio.ensure_future(batcher.submit(rows(10, 4)))  # a batch runs; this fills one
    await settle()
    assert [b.shape[0] for b, _ in model.calls] == [4, 4]
    assert model.tasks == [lone, full]
    assert model.deadlines == [50.0, None]
    assert batcher.running_batches == 2
    assert observer.depths == []  # neither was ever queued
    partial = asyncio.ensure_future(batcher.submit(rows(20, 2)))  # waits to merge
    await settle()
    assert len(model.calls) == 2
    assert batcher.queued_items == 2
    model.answer(0)
    model.answer(0)
    np.testing.assert_array_equal(await lone, rows(0, 3) * 2)
    np.testing.assert_array_equal(await full, rows(10, 4) * 2)
    await settle()
    # A slot came free: the queued request went out through the queue, in a task of its own.
    assert [b.shape[0] for b, _ in model.calls] == [2]
    assert model.tasks[-1] is not partial
    model.answer()
    np.testing.assert_array_equal(await partial, rows(20, 2) * 2)
    assert [(size, padded, waits) for size, padded, waits, _ in observer.batches] == [
        (3, 4, [0.0]),
        (4, 4, [0.0]),
        (2, 2, [0.0]),
    ]


async def test_a_caller_that_goes_away_frees_the_slot_of_its_own_batch() -> None:
    batcher, _, model, _ = make_async(max_concurrent_batches=1, max_batch_size=4)
    gone = asyncio.ensure_future(batcher.submit(rows(0, 4)))
    await settle()
    ((_, call),) = model.calls
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert call.cancelled()  # the model call was the caller's own: it stops too
    assert batcher.running_batches == 0
    model.calls.clear()
    after = asyncio.ensure_future(batcher.submit(rows(10, 1)))
    await settle()
    model.answer()
    np.testing.assert_array_equal(await after, rows(10, 1) * 2)


async def test_a_batch_of_its_own_in_a_thread_keeps_its_slot_until_the_thread_is_done() -> None:
    batcher, executor, recorder, _ = make(max_concurrent_batches=1, max_batch_size=4)
    gone = asyncio.ensure_future(batcher.submit(rows(0, 4)))
    await settle()
    assert len(executor.pending) == 1
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    # The thread still computes: a new request queues instead of taking a second thread.
    waiting = asyncio.ensure_future(batcher.submit(rows(10, 1)))
    await settle()
    assert len(executor.pending) == 1
    assert batcher.running_batches == 1
    executor.run_next()  # the abandoned batch ends; its rows reach nobody
    await run_all(executor)
    np.testing.assert_array_equal(await waiting, rows(10, 1) * 2)
    assert [b.shape[0] for b in recorder.batches] == [4, 1]
