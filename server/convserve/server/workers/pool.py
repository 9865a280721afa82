"""LiteRT in worker processes: model calls that never wait for the event loop's GIL.

A LiteRT call on a small batch takes tens of microseconds, but in a thread of
the server it must take the GIL back from the event loop (and from gRPC's
work on it) several times per batch, waiting up to a switch interval each
time: under load a batch then spends more time waiting for the GIL than
computing. `WorkerPool` runs the same flatbuffer in `workers` child
processes, each with its own interpreter and GIL; the event loop hands a
batch to an idle worker over a socket pair and awaits the answer like any
other I/O, so no thread of the server process competes for the GIL.

Supervision. A worker that dies fails the batch it held (`errors.Internal`)
and is replaced in the background; the others keep serving meanwhile. A
worker that stops answering (stopped, or stuck in a kernel) is found in one
of two ways: a batch it holds gets no answer within ``batch_timeout_s``, or,
while it is idle, it does not answer a heartbeat. Either way it is killed
(SIGKILL also ends a stopped process) and replaced, so a hung worker costs
one batch and a restart, never a request that waits forever. A batch whose
callers' deadline passes first fails with `errors.DeadlineExceeded` at once;
its worker keeps the batch until it answers (and serves on) or until
``batch_timeout_s`` (and is replaced): a short deadline does not cost a restart.
The same holds for a batch whose caller is cancelled (it went away).
`WorkerPool.healthy` is False while no worker is usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from convserve.server import errors
from convserve.server.workers.wire import PING, Region, check_batch, probabilities
from convserve.server.workers.worker import (
    EXIT_TIMEOUT_S,
    Answer,
    Expired,
    Worker,
    WorkerError,
)

log = logging.getLogger(__name__)

# Longest pause between attempts to start a worker while starting keeps failing.
MAX_RESTART_DELAY_S = 30.0


class WorkerPool:
    """LiteRT predictions in `workers` child processes of `threads` CPU threads each.

    The model takes images of `image_shape` ([H,W,C]) and answers `classes`
    probabilities per image.

    Call `__call__` (blocking) only before `serve()`, e.g. to warm up; after
    it, `run` (on the event loop) hands each batch to an idle worker. At most
    `workers` batches run at once; a caller finding none idle waits for one.
    Batches of up to `max_rows` images travel through memory shared with the
    worker (0: always through the socket).
    `close` and everything after `serve` belong to the event loop's thread.

    Supervision (from `serve` on): a batch gets at most `batch_timeout_s`
    seconds in a worker; every `heartbeat_interval_s` a watchdog checks the
    idle workers (exited, or no answer to a heartbeat within
    ``max(1 s, 2 * heartbeat_interval_s)``) and starts workers whose start
    failed earlier (with a growing pause). A worker found dead or hung is
    SIGKILLed and replaced in a background thread; `on_worker_exit` is
    called for it. `on_health_change(healthy)` is called on the event loop
    when `healthy` flips (not by `close`: a released version is not a sick
    server).
    """

    def __init__(
        self,
        flatbuffer: bytes,
        *,
        image_shape: tuple[int, ...],
        classes: int,
        threads: int,
        workers: int,
        name: str,
        niceness: int = 0,
        on_worker_exit: Callable[[], None] | None = None,
        batch_timeout_s: float = 10.0,
        heartbeat_interval_s: float = 1.0,
        on_health_change: Callable[[bool], None] | None = None,
        max_rows: int = 256,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if not batch_timeout_s > 0:
            raise ValueError(f"batch_timeout_s must be positive, got {batch_timeout_s}")
        if not heartbeat_interval_s > 0:
            raise ValueError(f"heartbeat_interval_s must be positive, got {heartbeat_interval_s}")
        self.name = name
        self.image_shape = tuple(image_shape)
        self.pixels = int(np.prod(self.image_shape))
        self.classes = classes
        self.threads = threads
        self.workers = workers
        self.niceness = niceness
        self.batch_timeout_s = batch_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        # Linux only (memfd); elsewhere batches go through the socket.
        self.max_rows = max(0, max_rows) if hasattr(os, "memfd_create") else 0
        self._flatbuffer = flatbuffer
        # Called on the event loop when a serving worker died or hung (e.g. a metric).
        self.on_worker_exit = on_worker_exit
        self.on_health_change = on_health_change
        # Serving workers (idle or busy); a retired one leaves at once.
        self._all: list[Worker] = []
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: deque[Worker] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Guards `_idle` for blocking calls and `_living` (touched by threads).
        self._lock = threading.Lock()
        # Every worker whose process has not been reaped yet, serving or not.
        self._living: set[Worker] = set()
        self._threads: list[threading.Thread] = []
        self._starting = 0  # workers being started in the background
        self._started = 0  # workers ever started: numbers their names
        self._restart_delay_s = 0.0
        self._restart_at = 0.0
        self._healthy = True
        self._watchdog: asyncio.Task[None] | None = None
        try:
            for _ in range(workers):
                self._all.append(self._spawn(self._next_name()))
            # Started side by side: each loads its model while the others do.
            for worker in self._all:
                worker.start(flatbuffer)
        except Exception:
            self.close()
            raise
        self._idle.extend(self._all)

    @property
    def pids(self) -> list[int]:
        """The serving worker processes' ids (for tests and logs)."""
        return [w.pid for w in self._all]

    @property
    def healthy(self) -> bool:
        """At least one worker is usable: alive and not being replaced."""
        return not self._closed and bool(self._all)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 (0..1) or uint8 (0..255) [N,H,W,C] -> float32 [N,K]; blocking."""
        if self._loop is not None:
            raise RuntimeError(f"{self.name}: serving on an event loop; use run()")
        with self._lock:
            if not self._all:
                raise WorkerError(f"{self.name}: no worker is left")
            if not self._idle:
                raise RuntimeError(f"{self.name}: every worker is busy with a blocking call")
            worker = self._idle.popleft()
        try:
            result = worker.call(images, self.pixels, self.classes)
        except (OSError, EOFError) as exc:
            # Dead, or stuck past START_TIMEOUT_S: it cannot serve (nor be trusted) again.
            with self._lock:
                self._all.remove(worker)
            worker.retired = True
            worker.kill()
            self._thread(lambda: self._reap(worker), f"stop {worker.name}")
            raise WorkerError(f"{worker.name} (pid {worker.pid}) failed: {exc}") from exc
        except BaseException:
            with self._lock:
                self._idle.append(worker)
            raise
        with self._lock:
            self._idle.append(worker)
        return result

    def serve(self) -> None:
        """From now on calls come through `run`, on the running event loop."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        for worker in self._all:
            self._attach(worker)
        self._watchdog = loop.create_task(self._watch(), name=f"watch {self.name}")

    async def run(self, images: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """`__call__` for the event loop: the batch goes to an idle worker.

        `deadline` is absolute, on time.monotonic()'s scale (None: none). Raises
        errors.DeadlineExceeded once it passes (waiting for a worker or
        computing), errors.Internal if the worker died or hung (it is
        replaced), errors.Unavailable once the pool is closed or while no
        worker runs. A caller cancelled mid-call leaves the worker computing
        its batch: it serves the next caller once it has answered.
        """
        code = check_batch(images, self.pixels)
        rows = images.shape[0]
        worker = await self._take(deadline)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        hang_at = now + self.batch_timeout_s
        by_deadline = deadline is not None and deadline < hang_at
        limit = deadline if by_deadline and deadline is not None else hang_at
        try:
            answer = worker.request(worker.frame(images, code))
        except EOFError as exc:
            raise self._stopped(worker, exc) from exc
        timer = loop.call_later(limit - now, worker.expire, answer, by_deadline)
        try:
            status, payload = await answer
        except Expired as exc:
            if self._closed:
                if exc.owed is not None:
                    _discard(exc.owed)
                raise errors.Unavailable(f"{self.name}: the model was released") from None
            if exc.owed is not None:
                self._drain(worker, exc.owed, hang_at)
                raise errors.DeadlineExceeded(
                    f"{self.name}: the deadline passed while the model computed the batch"
                ) from None
            self._lost(worker, f"did not finish a batch within {self.batch_timeout_s:g} s")
            raise errors.Internal(
                f"{worker.name} (pid {worker.pid}) did not finish a batch of {rows} images "
                f"within {self.batch_timeout_s:g} s: it hung and is being replaced"
            ) from None
        except (OSError, EOFError) as exc:
            raise self._stopped(worker, exc) from exc
        except asyncio.CancelledError:
            # The caller went away mid-call: the worker serves on once it has answered
            # the batch (which must not reach the next caller), as after a deadline.
            owed = worker.owe(answer)
            if owed is not None:
                self._drain(worker, owed, hang_at)
            elif answer.done() and not answer.cancelled() and answer.exception() is None:
                self._release(worker)
            else:
                self._retire(worker)
            raise
        except BaseException:
            self._retire(worker)
            raise
        finally:
            timer.cancel()
        self._release(worker)
        return probabilities(status, payload, rows, self.classes)

    async def _take(self, deadline: float | None) -> Worker:
        """An idle worker, waiting for one if need be (but not past `deadline`)."""
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise errors.Unavailable(f"{self.name}: the model was released")
            if deadline is not None and time.monotonic() >= deadline:
                raise errors.DeadlineExceeded(
                    f"{self.name}: the deadline passed while the batch waited for a model worker"
                )
            if self._idle:
                return self._idle.popleft()
            if not self._all and not self._starting:
                raise errors.Unavailable(f"{self.name}: no model worker is running; retry later")
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            timer = None
            if deadline is not None:
                timer = loop.call_later(deadline - time.monotonic(), _wake, waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass on the wake-up this caller will not use
                raise
            finally:
                if timer is not None:
                    timer.cancel()

    def _stopped(self, worker: Worker, exc: BaseException) -> errors.ServeError:
        """The error for a batch whose worker closed its end; replaces the worker."""
        if self._closed:
            return errors.Unavailable(f"{self.name}: the model was released")
        self._lost(worker, f"stopped during a batch ({exc})")
        return errors.Internal(
            f"{worker.name} (pid {worker.pid}) stopped during a batch; it is being restarted"
        )

    def _drain(self, worker: Worker, owed: Answer, hang_at: float) -> None:
        """Keep `worker` busy until it answers the batch its callers gave up on.

        It then serves on, unless the answer does not come by `hang_at`.
        """
        assert self._loop is not None
        delay = max(0.0, hang_at - time.monotonic())
        timer = self._loop.call_later(delay, worker.expire, owed, False)
        hung = f"did not finish a batch within {self.batch_timeout_s:g} s"
        owed.add_done_callback(lambda answer: self._settled(worker, answer, timer, hung))

    def _ping(self, worker: Worker, bound_s: float) -> None:
        """Send an idle worker a heartbeat; it serves on if it answers within `bound_s`."""
        assert self._loop is not None
        self._idle.remove(worker)
        try:
            answer = worker.request(PING)
        except EOFError as exc:
            self._lost(worker, f"stopped while idle ({exc})")
            return
        timer = self._loop.call_later(bound_s, worker.expire, answer, False)
        hung = f"did not answer a heartbeat within {bound_s:g} s"
        answer.add_done_callback(
            lambda done: self._settled(worker, done, timer, hung, expected=(0, b""))
        )

    def _settled(
        self,
        worker: Worker,
        answer: Answer,
        timer: asyncio.TimerHandle,
        hung: str,
        expected: tuple[int, bytes] | None = None,
    ) -> None:
        """An answer no caller waits for came, or failed: the worker serves on or is replaced."""
        timer.cancel()
        if answer.cancelled():
            self._retire(worker)
            return
        exc = answer.exception()
        if exc is None:
            if expected is None or answer.result() == expected:
                self._release(worker)
            else:
                self._lost(worker, "answered a heartbeat with something else")
        elif isinstance(exc, Expired):
            self._lost(worker, hung)
        else:
            self._lost(worker, f"stopped ({exc})")

    def _release(self, worker: Worker) -> None:
        if worker.retired:
            return
        self._idle.append(worker)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._waiters:
            self._wake_one()

    def _attach(self, worker: Worker) -> None:
        assert self._loop is not None
        worker.on_end = self._ended
        worker.attach(self._loop)

    def _ended(self, worker: Worker) -> None:
        """`worker` closed its end: replace it now if idle (else its caller does)."""
        if worker in self._idle:
            self._lost(worker, "exited while idle")

    def _lost(self, worker: Worker, why: str) -> None:
        """`worker` died or hung: replace it, and count it."""
        if not self._retire(worker):
            return
        log.warning("%s (pid %d) %s; starting a new one", worker.name, worker.pid, why)
        if self.on_worker_exit is not None:
            try:
                self.on_worker_exit()
            except Exception:
                log.exception("%s: on_worker_exit failed", self.name)

    def _retire(self, worker: Worker) -> bool:
        """Take `worker` out of service, kill it and start a replacement.

        False if it was out of service already (or the pool is closed).
        """
        if worker.retired or self._closed:
            return False
        worker.retired = True
        self._all.remove(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        worker.detach()
        worker.kill()
        self._check_health()
        self._start_in_background(worker.name, broken=worker)
        return True

    def _start_in_background(self, name: str, broken: Worker | None = None) -> None:
        """Reap `broken` (if any), then start a worker called `name`; it joins once ready."""
        loop = self._loop
        if loop is None:
            if broken is not None:
                self._thread(lambda: self._reap(broken), f"stop {broken.name}")
            return
        self._starting += 1

        def start() -> None:
            if broken is not None:
                self._reap(broken)
            worker = None if self._closed else self._start_one(name)
            if worker is not None and self._closed:
                self._reap(worker)  # closed meanwhile: the loop may not run `_adopt` any more
                worker = None
            try:
                loop.call_soon_threadsafe(self._adopt, worker)
            except RuntimeError:  # the event loop is closed: nobody will serve it
                if worker is not None:
                    self._reap(worker)

        self._thread(start, f"start {name}")

    def _start_one(self, name: str) -> Worker | None:
        """A started worker, or None (logged) if it could not start (blocking)."""
        try:
            worker = self._spawn(name)
        except Exception:
            log.exception("%s could not be started", name)
            return None
        try:
            worker.start(self._flatbuffer)
        except Exception:
            log.exception("%s could not be started", name)
            self._reap(worker)
            return None
        return worker

    def _adopt(self, worker: Worker | None) -> None:
        """On the loop: a worker started in the background is ready (None: it failed)."""
        self._starting -= 1
        if self._closed:
            if worker is not None:
                self._thread(lambda: self._reap(worker), f"stop {worker.name}")
            return
        if worker is None:
            # Try again later, pausing longer each time starting keeps failing.
            self._restart_delay_s = min(
                MAX_RESTART_DELAY_S, max(self.heartbeat_interval_s, 2 * self._restart_delay_s)
            )
            self._restart_at = time.monotonic() + self._restart_delay_s
            if not self._all and not self._starting:
                self._wake_all()  # callers waiting for a worker learn there is none
            return
        self._restart_delay_s = 0.0
        self._attach(worker)
        log.info("%s started (pid %d)", worker.name, worker.pid)
        self._all.append(worker)
        self._check_health()
        self._release(worker)

    def _check_health(self) -> None:
        healthy = self.healthy
        if healthy == self._healthy or self._closed:
            return
        self._healthy = healthy
        if healthy:
            log.info("%s: a model worker is serving again", self.name)
        else:
            log.error("%s: no model worker is serving", self.name)
        if self.on_health_change is not None:
            try:
                self.on_health_change(healthy)
            except Exception:
                log.exception("%s: on_health_change failed", self.name)

    async def _watch(self) -> None:
        """Every `heartbeat_interval_s`: check the idle workers, start missing ones."""
        bound_s = max(1.0, 2 * self.heartbeat_interval_s)
        while not self._closed:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                self._check_workers(bound_s)
            except Exception:
                log.exception("%s: checking the model workers failed", self.name)

    def _check_workers(self, bound_s: float) -> None:
        quiet_since = time.monotonic() - self.heartbeat_interval_s
        for worker in list(self._idle):
            code = worker.exit_code()
            if code is not None:
                self._lost(worker, f"exited while idle (code {code})")
            elif worker.answered_at <= quiet_since:
                # A worker that answered lately is alive: no heartbeat needed.
                self._ping(worker, bound_s)
        missing = self.workers - len(self._all) - self._starting
        if missing > 0 and time.monotonic() >= self._restart_at:
            for _ in range(missing):
                self._start_in_background(self._next_name())

    def _next_name(self) -> str:
        name = f"{self.name} worker {self._started}"
        self._started += 1
        return name

    def _spawn(self, name: str) -> Worker:
        region = Region(self.max_rows, self.pixels, self.classes) if self.max_rows else None
        worker = Worker(self.threads, self.niceness, name, region)
        with self._lock:
            self._living.add(worker)
        return worker

    def _reap(self, worker: Worker, timeout_s: float = EXIT_TIMEOUT_S) -> None:
        """Blocking: wait for `worker` to exit (killing it after `timeout_s`)."""
        worker.close(timeout_s)
        with self._lock:
            self._living.discard(worker)

    def _thread(self, target: Callable[[], None], name: str) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def close(self) -> None:
        """Stop every worker (without blocking); later calls get errors.Unavailable.

        A batch in flight fails with errors.Unavailable at once, even if its
        worker is stuck: `wait_closed` then bounds how long exiting takes.
        """
        if self._closed:
            return
        self._closed = True
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            with contextlib.suppress(RuntimeError):  # its loop may be gone already
                watchdog.cancel()
        workers, self._all = self._all, []
        self._idle.clear()
        for worker in workers:
            worker.retired = True
            worker.detach()
        if workers:
            exit_at = time.monotonic() + EXIT_TIMEOUT_S

            def reap() -> None:
                for worker in workers:
                    self._reap(worker, exit_at - time.monotonic())

            self._thread(reap, f"stop {self.name}")
        self._wake_all()

    def wait_closed(self, timeout_s: float) -> bool:
        """After `close`: wait until every worker has exited; True if they all have.

        Whatever still runs shortly before `timeout_s` ends (e.g. a stopped
        worker, which never reads the end of its input) is SIGKILLed, so this
        returns within about `timeout_s` and leaves no process behind. False
        before `close`.
        """
        if not self._closed:
            return False
        deadline = time.monotonic() + max(0.0, timeout_s)
        self._join(deadline - min(1.0, timeout_s / 4))
        with self._lock:
            left = [w for w in self._living if w.exit_code() is None]
        for worker in left:
            log.warning("%s (pid %d) did not exit in time; killing it", worker.name, worker.pid)
            worker.kill()
        self._join(deadline)
        with self._lock:
            living = list(self._living)
        for worker in living:  # e.g. started as the pool closed, with nobody left to reap it
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(max(0.0, deadline - time.monotonic()))
        exited = all(w.exit_code() is not None for w in living)
        return exited and not any(t.is_alive() for t in self._threads)

    def _join(self, until: float) -> None:
        for thread in list(self._threads):
            thread.join(max(0.0, until - time.monotonic()))


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _discard(answer: Answer) -> None:
    """Nobody will wait for `answer`: drop it without an unretrieved-exception warning."""
    if not answer.done():
        answer.cancel()
    elif not answer.cancelled():
        answer.exception()
