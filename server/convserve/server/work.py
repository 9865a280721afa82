"""Operations in threads with a bounded cost: admission, cancellation, accounting.

Convolve, FitKernel and GetFeatureMaps run blocking TensorFlow work in a
thread pool. `WorkPool` admits an operation only while the work waiting for
a thread is within bounds (count, input elements, estimated CPU seconds),
runs at most `slots` at once, and keeps counting an operation (its slot and
its estimated seconds) until its thread has actually stopped: a caller that
gives up frees nothing that is still computing.

Each operation gets a `Work` ticket whose `check` the computation calls
between its units (tiles, gradient steps). `check` raises once the caller
has gone, its deadline has passed, the server is shutting down, or the work
has run far past its estimate, so abandoned work stops within one unit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from convserve.server import costs, errors

T = TypeVar("T")
# Why work was stopped before it finished (the `reason` label of the stop metric).
STOP_REASONS = ("cancelled", "deadline", "overrun", "shutdown")


class WorkObserver(Protocol):
    """Receives the pool's figures; the server's metrics implement this."""

    def on_admitted_seconds(self, rpc: str, seconds: float) -> None:
        """Estimated CPU seconds of `rpc` operations admitted and not yet stopped."""

    def on_work_stopped(self, rpc: str, reason: str) -> None:
        """An operation was stopped before it finished, for one of `STOP_REASONS`."""

    def on_work_finished(self, rpc: str, estimate_s: float, ran_s: float) -> None:
        """An operation's thread finished (or stopped) after `ran_s` seconds."""


@dataclass(eq=False)
class Work:
    """One admitted operation: what it may cost, and whether it must stop."""

    rpc: str
    estimate_s: float
    deadline: float | None
    clock: Callable[[], float] = time.monotonic
    started: float | None = None
    _stop: str | None = field(default=None, repr=False)
    _stopped: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def limit_s(self) -> float:
        """Seconds of computing after which the work is stopped as an overrun."""
        return max(costs.OVERRUN_FACTOR * self.estimate_s, self.estimate_s + costs.MIN_OVERRUN_S)

    def cancel(self, reason: str) -> None:
        """Ask the work to stop at its next `check` ("cancelled", "deadline" or "shutdown")."""
        if self._stop is None:
            self._stop = reason

    def check(self) -> None:
        """Raise if the work must stop; called by the computing thread between units."""
        reason = self._stop
        if reason == "cancelled":
            raise errors.Cancelled(f"{self.rpc}: the caller went away; the work was stopped")
        if reason == "deadline":
            raise errors.DeadlineExceeded(f"{self.rpc}: the deadline passed during the work")
        if reason == "shutdown":
            raise errors.Unavailable(f"{self.rpc}: the server is shutting down")
        now = self.clock()
        if self.deadline is not None and now >= self.deadline:
            self._stop = "deadline"
            raise errors.DeadlineExceeded(f"{self.rpc}: the deadline passed during the work")
        if self.started is not None and now - self.started > self.limit_s:
            self._stop = "overrun"
            raise errors.ResourceExhausted(
                f"{self.rpc}: stopped after {now - self.started:.3g} s of computing, over "
                f"{costs.OVERRUN_FACTOR:g} times its estimated {self.estimate_s:.3g} s"
            )

    @property
    def stop_reason(self) -> str | None:
        return self._stop


class WorkPool:
    """Runs blocking operations in `slots` threads with admission and cancellation."""

    def __init__(
        self,
        *,
        slots: int,
        max_waiting: int,
        max_waiting_elements: int,
        max_waiting_s: float,
        observer: WorkObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = max(1, slots)
        self.max_waiting = max_waiting
        self.max_waiting_elements = max_waiting_elements
        self.max_waiting_s = max_waiting_s
        self._observer = observer
        self._clock = clock
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.slots, thread_name_prefix="convserve-ops"
        )
        self._free = asyncio.Semaphore(self.slots)
        self._waiting = 0
        self._waiting_elements = 0
        self._waiting_s = 0.0
        self._admitted_s: dict[str, float] = {}
        self._active: set[Work] = set()
        self._threads: set[asyncio.Future[Any]] = set()
        self._closed = False

    @property
    def waiting(self) -> int:
        """Operations admitted and waiting for a thread."""
        return self._waiting

    @property
    def running(self) -> int:
        """Operations whose thread has not stopped yet (whether or not anyone waits)."""
        return len(self._threads)

    def admitted_s(self, rpc: str | None = None) -> float:
        """Estimated CPU seconds admitted and not yet stopped (of `rpc`, or all)."""
        if rpc is not None:
            return self._admitted_s.get(rpc, 0.0)
        return sum(self._admitted_s.values())

    async def run(self, work: Work, elements: int, fn: Callable[[Work], T]) -> T:
        """Run ``fn(work)`` in a thread once admitted and a slot is free; return its result.

        Raises errors.ResourceExhausted when too much work is waiting,
        DeadlineExceeded when the deadline passes first, Unavailable once
        closed, and whatever `fn` raised (e.g. from ``work.check()``).
        """
        if self._closed:
            raise errors.Unavailable(f"{work.rpc}: the server is shutting down")
        if (
            self._waiting >= self.max_waiting
            or self._waiting_elements + elements > self.max_waiting_elements
            or (self._waiting > 0 and self._waiting_s + work.estimate_s > self.max_waiting_s)
        ):
            raise errors.ResourceExhausted(
                f"{work.rpc}: {self._waiting} operations (about {self._waiting_s:.3g} s of "
                "CPU) are waiting for a worker; retry later"
            )
        self._waiting += 1
        self._waiting_elements += elements
        self._waiting_s += work.estimate_s
        self._add_admitted(work.rpc, work.estimate_s)
        admitted = True
        try:
            try:
                timeout = None if work.deadline is None else work.deadline - self._clock()
                if timeout is not None and timeout <= 0:
                    raise TimeoutError
                # asyncio.timeout, not wait_for: a slot acquired just as time runs out
                # is handed on by the semaphore instead of leaking.
                async with asyncio.timeout(timeout):
                    await self._free.acquire()
            except TimeoutError:
                raise errors.DeadlineExceeded(
                    f"{work.rpc}: the deadline passed while the request was queued"
                ) from None
            finally:
                self._waiting -= 1
                self._waiting_elements -= elements
                self._waiting_s -= work.estimate_s
            if self._closed:
                self._free.release()
                raise errors.Unavailable(f"{work.rpc}: the server is shutting down")
            try:
                thread = self._start(work, fn)
            except BaseException:
                self._free.release()
                raise
            admitted = False  # from here on the thread's end settles the accounts
        finally:
            if admitted:
                self._add_admitted(work.rpc, -work.estimate_s)
        try:
            return await asyncio.shield(thread)
        except asyncio.CancelledError:
            # gRPC cancels the handler when the deadline passes, before the thread's
            # next check would notice it: tell the two apart for the stop metric.
            expired = work.deadline is not None and self._clock() >= work.deadline
            work.cancel("deadline" if expired else "cancelled")
            raise

    def _start(self, work: Work, fn: Callable[[Work], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()

        def call() -> T:
            work.started = self._clock()
            work.check()
            return fn(work)

        thread = asyncio.wrap_future(self._executor.submit(call), loop=loop)
        self._active.add(work)
        self._threads.add(thread)

        def stopped(done: asyncio.Future[T]) -> None:
            # The thread has ended: only now are its slot and its seconds free again.
            self._active.discard(work)
            self._threads.discard(done)
            self._free.release()
            self._add_admitted(work.rpc, -work.estimate_s)
            failed = done.cancelled() or done.exception() is not None  # marks it retrieved
            if self._observer is not None:
                ran = self._clock() - (work.started or self._clock())
                self._observer.on_work_finished(work.rpc, work.estimate_s, ran)
                if work.stop_reason is not None and failed:
                    self._observer.on_work_stopped(work.rpc, work.stop_reason)

        thread.add_done_callback(stopped)
        return thread

    def _add_admitted(self, rpc: str, seconds: float) -> None:
        total = max(0.0, self._admitted_s.get(rpc, 0.0) + seconds)
        self._admitted_s[rpc] = total
        if self._observer is not None:
            self._observer.on_admitted_seconds(rpc, total)

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every running operation's thread; True if all ended."""
        if not self._threads:
            return True
        _, pending = await asyncio.wait(set(self._threads), timeout=max(0.0, timeout_s))
        return not pending

    async def close(self, grace_s: float) -> bool:
        """Refuse new work, let running work finish within `grace_s`, then stop it.

        Stopped work ends at its next check, within about one unit of work;
        returns whether every thread ended (waiting up to `costs.MIN_OVERRUN_S`
        more after the stop request).
        """
        self._closed = True
        finished = await self.drain(grace_s)
        if not finished:
            for work in list(self._active):
                work.cancel("shutdown")
            finished = await self.drain(costs.MIN_OVERRUN_S)
        self._executor.shutdown(wait=False, cancel_futures=True)
        return finished
