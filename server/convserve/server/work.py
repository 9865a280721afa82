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
# A cancellation this close to the call's deadline is taken as the deadline's: a
# client gives up, and cancels, a little before the deadline the server sees. The
# server's deadline starts when its gRPC reads the call, after the client stamped its
# timeout: later by tens of milliseconds when the work being stopped keeps every core
# busy (up to 83 ms measured, back-to-back 0.3 s calls on 2 cores). And clients send
# their timeout rounded up (to 10 ms between 1 and 10 s, 100 ms up to 100 s, at most
# about 1%).
DEADLINE_SLACK_S = 0.1
DEADLINE_ROUNDING = 0.01


def at_deadline(remaining_s: float | None, granted_s: float | None) -> bool:
    """Whether a call cancelled with `remaining_s` left of the `granted_s` it started
    with was ended by its deadline rather than by its caller going away (False for a
    call without a deadline). The one rule for both the call's status and the stop
    reason of its work, so that the two agree."""
    if remaining_s is None or granted_s is None:
        return False
    return remaining_s <= DEADLINE_SLACK_S + DEADLINE_ROUNDING * granted_s


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
    # The time the call had left when its work was created (None: no deadline). Its
    # timeout was at least this: the tolerance of `at_deadline` is, if anything, tight.
    granted_s: float | None = None
    _stop: str | None = field(default=None, repr=False)
    _stopped: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.granted_s is None and self.deadline is not None:
            self.granted_s = max(0.0, self.deadline - self.clock())

    @property
    def limit_s(self) -> float:
        """Seconds of computing after which the work is stopped as an overrun."""
        return max(costs.OVERRUN_FACTOR * self.estimate_s, self.estimate_s + costs.MIN_OVERRUN_S)

    def cancel(self, reason: str) -> None:
        """Ask the work to stop at its next `check` ("cancelled", "deadline" or "shutdown")."""
        self._settle(reason)

    def caller_gone(self) -> None:
        """The caller's handler was cancelled: stop the work as "deadline" if its deadline
        has (about) passed, else as "cancelled".

        gRPC cancels a handler at its deadline at about the time the work's own
        `check` would notice it, and often a little before our clock says so.
        """
        remaining = None if self.deadline is None else self.deadline - self.clock()
        self.cancel("deadline" if at_deadline(remaining, self.granted_s) else "cancelled")

    def _settle(self, reason: str) -> str:
        """Record `reason` unless another was recorded first; return the one that holds.

        The event loop (`cancel`) and the computing thread (`check`) may decide at
        once: the first decision must hold, and the error `check` raises must be
        the one the stop is counted under.
        """
        with self._lock:
            if self._stop is None:
                self._stop = reason
            return self._stop

    def check(self) -> None:
        """Raise if the work must stop; called by the computing thread between units."""
        reason = self._stop
        if reason is None:
            now = self.clock()
            if self.deadline is not None and now >= self.deadline:
                reason = self._settle("deadline")
            elif self.started is not None and now - self.started > self.limit_s:
                reason = self._settle("overrun")
            else:
                return
        raise self._error(reason)

    def _error(self, reason: str) -> errors.ServeError:
        if reason == "cancelled":
            return errors.Cancelled(f"{self.rpc}: the caller went away; the work was stopped")
        if reason == "deadline":
            return errors.DeadlineExceeded(f"{self.rpc}: the deadline passed during the work")
        if reason == "shutdown":
            return errors.Unavailable(f"{self.rpc}: the server is shutting down")
        ran_s = self.clock() - (self.started or 0.0)
        return errors.ResourceExhausted(
            f"{self.rpc}: stopped after {ran_s:.3g} s of computing, over "
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
            work.caller_gone()
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
