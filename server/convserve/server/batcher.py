"""Dynamic batching: merges concurrent requests into few model calls.

One `DynamicBatcher` serves one model call (e.g. Predict on one model). Each
`submit` puts its rows in a bounded queue (counted in rows, i.e. images) and
awaits a future. Batches are dispatched without idle waiting:

* no batch running: dispatch at once with whatever is queued (a lone request
  on an idle batcher runs immediately, as a batch of one);
* a batch running and a slot free (``max_concurrent_batches > 1``): dispatch
  when ``max_batch_size`` rows are queued, or when ``batch_timeout_s`` has
  passed since the first queued row of the forming batch arrived;
* every slot busy but a spare one free (``spare_batches``): dispatch only a
  full batch (``max_batch_size`` rows queued). A model served by worker
  processes gets one process per spare slot: it computes while the event
  loop hands back another batch's answers and forms the next one, without
  splitting a light load into smaller batches;
* no slot free: wait; requests arriving meanwhile form the next batch.

A request that would be dispatched as a batch of its own (nothing queued, and
no batch running or the request fills one) skips the queue: its caller's task
runs the model call itself, which saves the queue's future, task and
bookkeeping for each large request and for every request on an idle model.

A request larger than ``max_batch_size`` is split across batches and
reassembled in order. Batches are padded (by repeating their last row) to a
size from ``pad_sizes`` so that TensorFlow sees few distinct shapes and does
not retrace; padding rows are dropped before results are handed out.

How a batch is computed (a model call in threads, or awaited in worker
processes, and small batches inline on the event loop) is the `BatchRuns`
given to the batcher (`convserve.server.batch_runs`); the batcher only decides
when a batch starts and which rows it holds. Only requests whose rows have
the same trailing shape (and dtype, unless the runs prepare rows of mixed
dtypes) share a batch. A batch's deadline is the latest deadline among its
requests, on ``clock``'s scale, or None if any of them has none: once it
passes, nobody waits for the batch any more, so the model may give up on it
(requests already past their deadline never reach a batch).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from convserve.server import errors
from convserve.server.batch_runs import BatchRuns, Timed

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    """Receives batching figures; the server's metrics implement this."""

    def on_queue_depth(self, items: int) -> None:
        """The number of rows now queued (not yet in a batch)."""

    def on_batch(
        self, size: int, padded_size: int, queue_waits_s: Sequence[float], run_s: float
    ) -> None:
        """One model call finished: real rows, rows after padding, each part's
        wait from enqueue to batch start, and the duration of `run_batch`."""


class SummingObserver:
    """Passes batches on to `inner` but reports the queue depth as `total()`: the items
    queued in several batchers that share one set of metrics (a model's versions, the
    merged Convolve groups)."""

    def __init__(self, inner: BatchObserver, total: Callable[[], int]) -> None:
        self._inner = inner
        self._total = total

    def on_queue_depth(self, items: int) -> None:
        self._inner.on_queue_depth(self._total())

    def on_batch(
        self, size: int, padded_size: int, queue_waits_s: Sequence[float], run_s: float
    ) -> None:
        self._inner.on_batch(size, padded_size, queue_waits_s, run_s)


@dataclass(eq=False)
class _Request:
    items: np.ndarray
    future: asyncio.Future[np.ndarray]
    deadline: float | None
    enqueued_at: float
    taken: int = 0  # rows already handed to batches
    done: int = 0  # rows whose results arrived
    parts: list[tuple[int, np.ndarray]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.items.shape[0])

    @property
    def untaken(self) -> int:
        return self.size - self.taken

    def compatible(self, other: _Request, *, same_dtype: bool) -> bool:
        if self.items.shape[1:] != other.items.shape[1:]:
            return False
        return not same_dtype or self.items.dtype == other.items.dtype


@dataclass(frozen=True)
class _Slice:
    request: _Request
    start: int
    stop: int
    wait_s: float


def _latest_deadline(slices: Sequence[_Slice]) -> float | None:
    """When the last caller of a batch stops waiting for it (None: some caller never does)."""
    latest: float | None = None
    for part in slices:
        deadline = part.request.deadline
        if deadline is None:
            return None
        if latest is None or deadline > latest:
            latest = deadline
    return latest


def _pieces(slices: Sequence[_Slice]) -> list[np.ndarray]:
    """The rows of a batch's slices, in order (views, no copies)."""
    return [part.request.items[part.start : part.stop] for part in slices]


def default_pad_sizes(max_batch_size: int) -> list[int]:
    """Powers of two below ``max_batch_size``, then ``max_batch_size`` itself."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch_size)
    return sizes


class DynamicBatcher:
    """Queues row batches and runs them, merged, through `runs` (see `BatchRuns`).

    The model must return ``[B, ...]`` for a batch ``[B, ...]`` (one output row
    per input row, in order). Deadlines passed to `submit` are absolute times
    on `clock`'s scale (``time.monotonic`` by default).
    """

    def __init__(
        self,
        runs: BatchRuns,
        *,
        name: str,
        max_batch_size: int,
        batch_timeout_s: float,
        max_queued_items: int,
        max_concurrent_batches: int = 1,
        spare_batches: int = 0,
        pad_sizes: Sequence[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_concurrent_batches < 1:
            raise ValueError(
                f"max_concurrent_batches must be at least 1, got {max_concurrent_batches}"
            )
        if max_queued_items < 1:
            raise ValueError(f"max_queued_items must be at least 1, got {max_queued_items}")
        if batch_timeout_s < 0:
            raise ValueError(f"batch_timeout_s must not be negative, got {batch_timeout_s}")
        if pad_sizes is None:
            sizes = default_pad_sizes(max_batch_size)
        else:
            if any(s < 1 for s in pad_sizes):
                raise ValueError(f"pad_sizes must be positive, got {list(pad_sizes)}")
            # A batch never exceeds max_batch_size, so larger sizes would never be used.
            sizes = sorted({s for s in pad_sizes if s <= max_batch_size} | {max_batch_size})
        self._runs = runs
        self.name = name
        self.max_batch_size = max_batch_size
        self.batch_timeout_s = batch_timeout_s
        self.max_queued_items = max_queued_items
        self.max_concurrent_batches = max_concurrent_batches
        self.spare_batches = max(0, spare_batches)
        self.pad_sizes: tuple[int, ...] = tuple(sizes)
        self._clock = clock
        self._observer = observer
        self._queue: list[_Request] = []
        self._queued_items = 0
        # What holds a slot: the task running a queued batch, or a token for a request
        # running as a batch of its own in its caller's task.
        self._running: set[object] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._draining = False
        self._idle: asyncio.Event | None = None

    @property
    def queued_items(self) -> int:
        """Rows waiting in the queue (not yet handed to a batch)."""
        return self._queued_items

    @property
    def running_batches(self) -> int:
        return len(self._running)

    def padded_size(self, size: int) -> int:
        """The batch size `run_batch` sees for `size` real rows."""
        for padded in self.pad_sizes:
            if padded >= size:
                return padded
        return size

    async def submit(self, items: np.ndarray, *, deadline: float | None = None) -> np.ndarray:
        """Run `items` ([n, ...], n >= 1) through the model; returns its n output rows.

        Raises errors.ResourceExhausted at once if the queue cannot take n more
        rows, errors.DeadlineExceeded if `deadline` passes before a batch holding
        the rows starts, errors.Unavailable once the batcher is closed, and
        whatever `run_batch` raised for a batch holding the rows.
        """
        if self._closed:
            raise errors.Unavailable(f"{self.name}: the server is shutting down")
        if items.ndim < 1 or items.shape[0] < 1:
            raise ValueError(f"{self.name}: submit needs at least one row, got {items.shape}")
        n = int(items.shape[0])
        if self._queued_items + n > self.max_queued_items:
            raise errors.ResourceExhausted(
                f"{self.name}: the queue is full ({self._queued_items} of "
                f"{self.max_queued_items} images queued, this request has {n}); retry later"
            )
        if self._alone(n):
            return await self._run_alone(items, deadline)
        loop = asyncio.get_running_loop()
        request = _Request(
            items=items, future=loop.create_future(), deadline=deadline, enqueued_at=self._clock()
        )
        self._queue.append(request)
        self._set_queued(self._queued_items + n)
        self._maybe_dispatch()
        try:
            if request.future.done():
                # It ran inline: still give the loop a turn, or a caller awaiting
                # submit in a loop would never let anything else run.
                await asyncio.sleep(0)
            return await request.future
        finally:
            # Cancelled or failed: whatever was not yet handed to a batch is dropped.
            self._remove(request)

    async def close(self, drain: bool = True) -> None:
        """Stop accepting work.

        drain=True: finish everything queued and running. drain=False: fail
        queued work with errors.Unavailable and wait only for running batches.
        """
        self._closed = True
        if drain:
            self._draining = True
            self._maybe_dispatch()
        else:
            for request in list(self._queue):
                self._fail(request, errors.Unavailable(f"{self.name}: the server is shutting down"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue or self._running:
            self._idle = asyncio.Event()
            await self._idle.wait()
        self._runs.close()

    # -- internals ------------------------------------------------------------

    def _set_queued(self, items: int) -> None:
        self._queued_items = items
        if self._observer is not None:
            try:
                self._observer.on_queue_depth(items)
            except Exception:
                log.exception("batch observer failed")

    def _remove(self, request: _Request) -> None:
        if request in self._queue:
            self._queue.remove(request)
            self._set_queued(self._queued_items - request.untaken)
            request.taken = request.size
            self._check_idle()

    def _fail(self, request: _Request, exc: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
        self._remove(request)

    def _check_idle(self) -> None:
        if self._idle is not None and not self._queue and not self._running:
            self._idle.set()

    def _maybe_dispatch(self) -> None:
        """Start every batch the dispatch rule allows now; arm a timer for the next."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue and self._slot_free():
            if self._running and not self._draining:
                waited = self._clock() - self._queue[0].enqueued_at
                if self._queued_items < self.max_batch_size and waited < self.batch_timeout_s:
                    loop = asyncio.get_running_loop()
                    self._timer = loop.call_later(
                        self.batch_timeout_s - waited, self._maybe_dispatch
                    )
                    return
            self._dispatch_one()

    def _alone(self, rows: int) -> bool:
        """Whether a request of `rows` rows would now be dispatched as a batch of its own
        (nothing queued, a slot free, and no reason to wait for more rows)."""
        if self._queue or rows > self.max_batch_size:
            return False
        running = len(self._running)
        if running == 0:
            return True
        if rows < self.max_batch_size:
            return False  # a batch runs: wait to merge with the requests to come
        return running < self.max_concurrent_batches + self.spare_batches

    async def _run_alone(self, items: np.ndarray, deadline: float | None) -> np.ndarray:
        """Run a request that makes a batch on its own in the caller's task.

        The same batch the queue would have formed, without a future, a task and
        the queue's bookkeeping; a caller cancelled meanwhile stops waiting for
        its batch at once (the model call is cancelled unless the runs compute on,
        `BatchRuns.computes_after_cancel`: then its slot stays taken until it ends).
        """
        if deadline is not None and self._clock() >= deadline:
            raise errors.DeadlineExceeded(
                f"{self.name}: the deadline passed while the request was queued"
            )
        rows = int(items.shape[0])
        padded = self.padded_size(rows)
        if self._inline_allowed(rows):
            output, run_s = self._checked(self._runs.call([items], padded), padded)
            self._observe(rows, padded, [0.0], run_s)
            # Still give the loop a turn, or a caller awaiting submit in a loop would
            # never let anything else run.
            await asyncio.sleep(0)
            return output[:rows] if padded > rows else output
        slot: object | None = object()
        self._running.add(slot)
        try:
            job = self._runs.start([items], padded, deadline)
            if self._runs.computes_after_cancel:
                running = asyncio.ensure_future(job)
                try:
                    timed = await asyncio.shield(running)
                except asyncio.CancelledError:
                    running.add_done_callback(
                        functools.partial(self._ran_alone, slot, rows, padded)
                    )
                    slot = None
                    raise
            else:
                timed = await job
            output, run_s = self._checked(timed, padded)
            # Before the slot is freed, and with it the next batch started.
            self._observe(rows, padded, [0.0], run_s)
        finally:
            if slot is not None:
                self._free_slot(slot)
        return output[:rows] if padded > rows else output

    def _inline_allowed(self, rows: int) -> bool:
        """A batch of `rows` may run on the loop: small, the model idle, the runs willing."""
        return rows <= self._runs.inline_max_rows and not self._running and self._runs.inline_now()

    def _ran_alone(self, slot: object, rows: int, padded: int, job: asyncio.Future[Timed]) -> None:
        """A batch of its own whose caller went away has finished in its thread."""
        if not job.cancelled() and job.exception() is None:
            self._observe(rows, padded, [0.0], job.result()[1])
        self._free_slot(slot)

    def _free_slot(self, slot: object) -> None:
        self._running.discard(slot)
        self._maybe_dispatch()
        self._check_idle()

    def _slot_free(self) -> bool:
        running = len(self._running)
        if running < self.max_concurrent_batches:
            return True
        spare = running < self.max_concurrent_batches + self.spare_batches
        return spare and self._queued_items >= self.max_batch_size

    def _dispatch_one(self) -> None:
        now = self._clock()
        slices: list[_Slice] = []
        rows = 0
        head: _Request | None = None
        for request in list(self._queue):
            if rows >= self.max_batch_size:
                break
            if request.deadline is not None and now >= request.deadline:
                self._fail(
                    request,
                    errors.DeadlineExceeded(
                        f"{self.name}: the deadline passed while the request was queued"
                    ),
                )
                continue
            if head is None:
                head = request
            elif not request.compatible(head, same_dtype=not self._runs.mixes_dtypes):
                continue
            take = min(request.untaken, self.max_batch_size - rows)
            start = request.taken
            slices.append(_Slice(request, start, start + take, now - request.enqueued_at))
            request.taken += take
            rows += take
            if request.untaken == 0:
                self._queue.remove(request)
        if not slices:
            self._check_idle()
            return
        self._set_queued(self._queued_items - rows)
        # Inline only what empties the queue: the parts of a split request, or
        # requests queued behind, would otherwise run one after another inline.
        if not self._queue and self._inline_allowed(rows):
            self._run_inline(slices, rows)
            return
        task = asyncio.get_running_loop().create_task(self._run(slices, rows))
        self._running.add(task)

    def _run_inline(self, slices: list[_Slice], rows: int) -> None:
        """Run a small batch on the calling (event loop) thread.

        For a model call of a tenth of a millisecond, handing the batch to a
        worker thread and the result back costs more than the call itself.
        Only done when no batch is running (the model is idle) and the batch
        takes everything queued, so the loop is held for one small call at most.
        """
        padded = self.padded_size(rows)
        try:
            output, run_s = self._checked(self._runs.call(_pieces(slices), padded), padded)
        except Exception as exc:
            for part in slices:
                self._fail(part.request, exc)
        else:
            self._finish(slices, rows, output, run_s)
        self._check_idle()

    async def _run(self, slices: list[_Slice], rows: int) -> None:
        padded = self.padded_size(rows)
        try:
            try:
                timed = await self._runs.start(_pieces(slices), padded, _latest_deadline(slices))
                output, run_s = self._checked(timed, padded)
            except Exception as exc:
                for part in slices:
                    self._fail(part.request, exc)
                return
            self._finish(slices, rows, output, run_s)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._running.discard(task)
            self._maybe_dispatch()
            self._check_idle()

    def _observe(self, rows: int, padded: int, waits_s: list[float], run_s: float) -> None:
        if self._observer is not None:
            try:
                self._observer.on_batch(rows, padded, waits_s, run_s)
            except Exception:
                log.exception("batch observer failed")

    def _finish(self, slices: list[_Slice], rows: int, output: np.ndarray, run_s: float) -> None:
        self._observe(rows, self.padded_size(rows), [s.wait_s for s in slices], run_s)
        offset = 0
        for part in slices:
            length = part.stop - part.start
            self._deliver(part, output[offset : offset + length])
            offset += length

    def _check_output(self, output: np.ndarray, padded: int) -> None:
        if output.ndim < 1 or output.shape[0] != padded:
            log.error(
                "%s: the model returned shape %s for a batch of %d rows",
                self.name,
                output.shape,
                padded,
            )
            raise errors.Internal(
                f"{self.name}: the model returned a wrong number of rows; see the server log"
            )

    def _checked(self, timed: Timed, padded: int) -> Timed:
        self._check_output(timed[0], padded)
        return timed

    def _deliver(self, part: _Slice, rows: np.ndarray) -> None:
        request = part.request
        if request.future.done():  # failed or cancelled meanwhile: drop the rows
            return
        request.parts.append((part.start, rows))
        request.done += part.stop - part.start
        if request.done == request.size:
            if len(request.parts) == 1:
                result = request.parts[0][1]
            else:
                result = np.concatenate([r for _, r in sorted(request.parts, key=lambda p: p[0])])
            request.parts.clear()
            request.future.set_result(result)
