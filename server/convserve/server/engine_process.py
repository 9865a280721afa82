"""LiteRT in worker processes: model calls that never wait for the event loop's GIL.

A LiteRT call on a small batch takes tens of microseconds, but in a thread of
the server it must take the GIL back from the event loop (and from gRPC's
work on it) several times per batch, waiting up to a switch interval each
time: under load a batch then spends more time waiting for the GIL than
computing. `ProcessEngine` runs the same flatbuffer in `workers` child
processes, each with its own interpreter and GIL; the event loop hands a
batch to an idle worker over a socket pair and awaits the answer like any
other I/O, so no thread of the server process competes for the GIL.

Batches travel through memory the server and its worker share (a memfd
mapped by both, one per worker), not through the socket: the server writes
a batch's pixels where the worker reads them, the worker writes its
probabilities where the server reads them, and the socket carries only
8-byte headers, which wake the other side. A batch larger than the shared
region (`max_rows` images) travels in the socket instead.

The wire between the server and a worker, all little-endian:

* start-up: the server sends ``<Q length><Q output offset>`` and the
  flatbuffer; the worker answers with a response frame (status 0 once the
  interpreter is ready). The output offset is where, in the shared region,
  the worker writes its answers.
* request: ``<I rows><B dtype><B where><2x>``, then, when where is 0,
  ``rows * H * W * C`` pixels (the model's input shape, which the worker
  reads from the flatbuffer); when where is 1 the pixels are at the start of
  the shared region. uint8 (dtype 0, 0..255) or float32 (dtype 1, 0..1);
* heartbeat: a request of 0 rows (dtype 0, no pixels), answered at once with
  an empty status-0 response;
* response: ``<B status><B where><2x><I length>``: `length` bytes of
  float32 ``[rows, K]`` probabilities (status 0) or of a UTF-8 error message
  (status 1), following in the socket (where 0) or at the output offset of
  the shared region (where 1).

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
`ProcessEngine.healthy` is False while no worker is usable.

    python -m convserve.server.engine_process FD THREADS NICENESS SHARED_FD
    # started by ProcessEngine; SHARED_FD -1: no shared region
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from convserve.server import errors

log = logging.getLogger(__name__)

REQUEST = struct.Struct("<IBB2x")
RESPONSE = struct.Struct("<BB2xI")
MODEL_LENGTH = struct.Struct("<QQ")
PING = REQUEST.pack(0, 0, 0)
# Where a frame's values are: after its header in the socket, or in the shared region.
IN_SOCKET, IN_REGION = 0, 1
_DTYPES: dict[np.dtype[Any], int] = {np.dtype(np.uint8): 0, np.dtype(np.float32): 1}
_FROM_CODE: dict[int, np.dtype[Any]] = {code: dtype for dtype, code in _DTYPES.items()}
# Seconds a worker may take to start and load its model before the load fails.
START_TIMEOUT_S = 60.0
# Seconds a worker may take to exit once its socket is closed before it is killed.
EXIT_TIMEOUT_S = 5.0
# Longest pause between attempts to start a worker while starting keeps failing.
MAX_RESTART_DELAY_S = 30.0

_Answer = asyncio.Future[tuple[int, bytes]]


class WorkerError(Exception):
    """A worker process could not start, or died or broke the protocol."""


class _Expired(Exception):
    """A call's time ran out before its answer came.

    `owed`, if not None, gets the answer should it still come.
    """

    def __init__(self, owed: _Answer | None) -> None:
        super().__init__("no answer in time")
        self.owed = owed


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the other end closed the connection")
        got += n
    return buffer


def _check_batch(images: np.ndarray, pixels: int) -> int:
    """The dtype code of a batch the worker can take; ValueError otherwise."""
    code = _DTYPES.get(images.dtype)
    if code is None or images.ndim < 1 or images.shape[0] < 1 or images[0].size != pixels:
        raise ValueError(
            f"uint8 or float32 images of {pixels} pixels expected (at least one), got "
            f"{images.dtype} {list(images.shape)}"
        )
    return code


class _Region:
    """Memory shared with one worker: a batch's pixels at the start, its answer at
    `output_offset`. Sized for `max_rows` float32 images of `pixels` values and their
    `classes` probabilities."""

    def __init__(self, max_rows: int, pixels: int, classes: int) -> None:
        # A cache line apart, so the two sides never write the same line.
        self.max_rows = max_rows
        self.output_offset = -(-max_rows * pixels * 4 // 64) * 64
        self.input_bytes = self.output_offset
        self.output_bytes = max_rows * classes * 4
        self.fd = os.memfd_create("convserve-batches", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.output_offset + self.output_bytes)
            self.memory = mmap.mmap(self.fd, self.output_offset + self.output_bytes)
        except BaseException:
            os.close(self.fd)
            raise

    def write(self, images: np.ndarray) -> bool:
        """Put a batch where the worker reads it; False if it or its answer does not fit."""
        if images.shape[0] > self.max_rows or images.nbytes > self.input_bytes:
            return False
        view = np.frombuffer(self.memory, images.dtype, images.size)
        np.copyto(view.reshape(images.shape), images)
        return True

    def answer(self, length: int) -> bytes:
        """The `length` bytes the worker wrote at the output offset."""
        if length > self.output_bytes:
            raise EOFError(f"an answer of {length} bytes does not fit the shared region")
        return self.memory[self.output_offset : self.output_offset + length]

    def close_fd(self) -> None:
        """The worker has its own descriptor once started; the mapping stays."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.close_fd()
        with contextlib.suppress(BufferError):  # a view still exported: freed with it
            self.memory.close()


def _probabilities(status: int, payload: bytes | bytearray, rows: int, classes: int) -> np.ndarray:
    if status != 0:
        log.error("a model worker failed on %d images: %s", rows, payload.decode(errors="replace"))
        raise errors.Internal(f"the model failed on a batch of {rows} images; see the server log")
    output = np.frombuffer(payload, dtype="<f4")
    if output.size != rows * classes:
        raise errors.Internal(
            f"the model worker answered {output.size} values for {rows} images; "
            f"{rows * classes} expected"
        )
    return output.reshape(rows, classes)


class _Worker:
    """One child process with one interpreter; one call at a time.

    Constructing it starts the process; `start` hands it the model. Until
    `attach`, calls are blocking (`call`); after it, `request` on the event
    loop, whose reader and writer callbacks move the frames.
    """

    def __init__(self, threads: int, niceness: int, name: str, region: _Region | None) -> None:
        self.name = name
        self.region = region
        ours, theirs = socket.socketpair()
        shared_fd = region.fd if region is not None else -1
        arguments = (theirs.fileno(), threads, niceness, shared_fd)
        command = [sys.executable, "-m", __name__, *map(str, arguments)]
        fds = (theirs.fileno(),) if region is None else (theirs.fileno(), shared_fd)
        try:
            self.process = subprocess.Popen(command, pass_fds=fds, stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            if region is not None:
                region.close()
            raise
        finally:
            theirs.close()
            if region is not None:
                region.close_fd()
        self.sock = ours
        # Set by the engine: out of service (being replaced, or the engine closed).
        self.retired = False
        # Called on the event loop when the worker closes its end unasked.
        self.on_end: Callable[[_Worker], None] | None = None
        # time.monotonic() of the last answer: a worker that answered lately needs no heartbeat.
        self.answered_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._received = bytearray()
        self._answer: _Answer | None = None
        self._out: memoryview | None = None
        self._writing = False
        self._ended = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, flatbuffer: bytes) -> None:
        """Hand the worker its model and wait until it is ready (blocking).

        Blocking calls after it also fail (TimeoutError) after START_TIMEOUT_S.
        """
        sock = self.sock
        try:
            sock.settimeout(START_TIMEOUT_S)
            offset = self.region.output_offset if self.region is not None else 0
            sock.sendall(MODEL_LENGTH.pack(len(flatbuffer), offset))
            sock.sendall(flatbuffer)
            status, _, length = RESPONSE.unpack(_recv_exact(sock, RESPONSE.size))
            message = _recv_exact(sock, length)
        except (OSError, EOFError) as exc:
            raise WorkerError(f"{self.name}: did not start ({exc}); see the log above") from exc
        if status != 0:
            raise WorkerError(f"{self.name}: {message.decode(errors='replace')}")

    def frame(self, images: np.ndarray, code: int) -> bytes:
        """The request frame of a checked batch; its pixels go to the shared region when
        they fit. Only while this worker is idle: it reads the region once it has the frame."""
        rows = images.shape[0]
        if self.region is not None and self.region.write(images):
            return REQUEST.pack(rows, code, IN_REGION)
        return REQUEST.pack(rows, code, IN_SOCKET) + np.ascontiguousarray(images).tobytes()

    def payload(self, where: int, length: int, following: bytes | bytearray) -> bytes:
        """An answer's bytes: `following` the header in the socket, or in the region."""
        if where == IN_SOCKET:
            return bytes(following)
        if self.region is None:
            raise EOFError(f"{self.name} answered through a shared region it does not have")
        return self.region.answer(length)

    def call(self, images: np.ndarray, pixels: int, classes: int) -> np.ndarray:
        """Blocking call (before `attach`, e.g. a warm-up)."""
        self.sock.sendall(self.frame(images, _check_batch(images, pixels)))
        status, where, length = RESPONSE.unpack(_recv_exact(self.sock, RESPONSE.size))
        following = _recv_exact(self.sock, length) if where == IN_SOCKET else b""
        payload = self.payload(where, length, following)
        return _probabilities(status, payload, images.shape[0], classes)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve `request` on `loop` (call on its thread)."""
        self._loop = loop
        self.sock.setblocking(False)
        # One reader for the worker's life: registering one per call would cost
        # two epoll_ctl calls per batch.
        loop.add_reader(self.sock.fileno(), self._readable)

    def request(self, frame: bytes) -> _Answer:
        """Send one request frame; the future gets the answer ``(status, payload)``.

        It fails with EOFError if the worker closes its end first. Nothing
        here waits: what the socket cannot take now is sent when it can, so
        a worker that stopped reading never blocks the caller (or `detach`).
        """
        loop = self._loop
        if loop is None or self._ended:
            raise EOFError(f"{self.name} is not serving")
        answer: _Answer = loop.create_future()
        self._answer = answer
        self._out = memoryview(frame)
        self._writable()
        return answer

    def expire(self, answer: _Answer, follow: bool) -> None:
        """Timer callback: `answer` waited too long and fails with `_Expired`.

        follow=True: the answer the worker still owes goes to the future the
        exception carries; else it is dropped when it comes.
        """
        if answer.done() or self._answer is not answer or self._loop is None:
            return
        owed: _Answer | None = self._loop.create_future() if follow else None
        self._answer = owed
        answer.set_exception(_Expired(owed))

    def owe(self, answer: _Answer) -> _Answer | None:
        """The caller of `answer` stopped waiting for it: a future for the answer the
        worker still owes (None if it came, or the call failed, already)."""
        if self._answer is not answer or self._loop is None or self._ended:
            return None
        owed: _Answer = self._loop.create_future()
        self._answer = owed
        return owed

    def _writable(self) -> None:
        out = self._out
        if out is None:
            return
        try:
            sent = self.sock.send(out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._out = None
            self._stop_writing()
            self._fail(EOFError(f"{self.name}: cannot send ({exc})"))
            return
        if sent == len(out):
            self._out = None
            self._stop_writing()
            return
        self._out = out[sent:]
        if not self._writing and self._loop is not None:
            self._loop.add_writer(self.sock.fileno(), self._writable)
            self._writing = True

    def _stop_writing(self) -> None:
        if self._writing and self._loop is not None:
            self._loop.remove_writer(self.sock.fileno())
        self._writing = False

    def _readable(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end()
            if self.on_end is not None:
                self.on_end(self)
            return
        self._received += data
        if len(self._received) < RESPONSE.size:
            return
        status, where, length = RESPONSE.unpack_from(self._received)
        end = RESPONSE.size + (length if where == IN_SOCKET else 0)
        if len(self._received) < end:
            return
        try:
            payload = self.payload(where, length, self._received[RESPONSE.size : end])
        except EOFError as exc:  # a broken answer: this worker cannot be trusted any more
            self._fail(exc)
            return
        del self._received[:end]
        self.answered_at = time.monotonic()
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_result((status, payload))

    def _fail(self, exc: BaseException) -> None:
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_exception(exc)

    def _end(self) -> None:
        """The connection is over: stop watching it and fail the call waiting, if any."""
        self._ended = True
        self._out = None
        if self._loop is not None:
            if self._loop.is_closed():
                self._answer = None  # nothing can wait for it any more
                return
            self._stop_writing()
            self._loop.remove_reader(self.sock.fileno())
        self._fail(EOFError(f"{self.name} closed its connection"))

    def detach(self) -> None:
        """Stop reading on the loop and close the socket: the worker exits on end of input.

        A call still waiting for its answer fails with EOFError.
        """
        if not self._ended:
            self._end()
        with contextlib.suppress(OSError):
            self.sock.close()

    def kill(self) -> None:
        """SIGKILL the process (without waiting): also ends a stopped or stuck one."""
        with contextlib.suppress(OSError):
            self.process.kill()

    def exit_code(self) -> int | None:
        return self.process.poll()

    def close(self, timeout_s: float = EXIT_TIMEOUT_S) -> None:
        """Close the socket and reap the worker, killing it after `timeout_s` (blocking)."""
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.process.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.region is not None:
            self.region.close()


class ProcessEngine:
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
        self._all: list[_Worker] = []
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: deque[_Worker] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Guards `_idle` for blocking calls and `_living` (touched by threads).
        self._lock = threading.Lock()
        # Every worker whose process has not been reaped yet, serving or not.
        self._living: set[_Worker] = set()
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
        replaced), errors.Unavailable once the engine is closed or while no
        worker runs. A caller cancelled mid-call leaves the worker computing
        its batch: it serves the next caller once it has answered.
        """
        code = _check_batch(images, self.pixels)
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
        except _Expired as exc:
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
        return _probabilities(status, payload, rows, self.classes)

    async def _take(self, deadline: float | None) -> _Worker:
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

    def _stopped(self, worker: _Worker, exc: BaseException) -> errors.ServeError:
        """The error for a batch whose worker closed its end; replaces the worker."""
        if self._closed:
            return errors.Unavailable(f"{self.name}: the model was released")
        self._lost(worker, f"stopped during a batch ({exc})")
        return errors.Internal(
            f"{worker.name} (pid {worker.pid}) stopped during a batch; it is being restarted"
        )

    def _drain(self, worker: _Worker, owed: _Answer, hang_at: float) -> None:
        """Keep `worker` busy until it answers the batch its callers gave up on.

        It then serves on, unless the answer does not come by `hang_at`.
        """
        assert self._loop is not None
        delay = max(0.0, hang_at - time.monotonic())
        timer = self._loop.call_later(delay, worker.expire, owed, False)
        hung = f"did not finish a batch within {self.batch_timeout_s:g} s"
        owed.add_done_callback(lambda answer: self._settled(worker, answer, timer, hung))

    def _ping(self, worker: _Worker, bound_s: float) -> None:
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
        worker: _Worker,
        answer: _Answer,
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
        elif isinstance(exc, _Expired):
            self._lost(worker, hung)
        else:
            self._lost(worker, f"stopped ({exc})")

    def _release(self, worker: _Worker) -> None:
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

    def _attach(self, worker: _Worker) -> None:
        assert self._loop is not None
        worker.on_end = self._ended
        worker.attach(self._loop)

    def _ended(self, worker: _Worker) -> None:
        """`worker` closed its end: replace it now if idle (else its caller does)."""
        if worker in self._idle:
            self._lost(worker, "exited while idle")

    def _lost(self, worker: _Worker, why: str) -> None:
        """`worker` died or hung: replace it, and count it."""
        if not self._retire(worker):
            return
        log.warning("%s (pid %d) %s; starting a new one", worker.name, worker.pid, why)
        if self.on_worker_exit is not None:
            try:
                self.on_worker_exit()
            except Exception:
                log.exception("%s: on_worker_exit failed", self.name)

    def _retire(self, worker: _Worker) -> bool:
        """Take `worker` out of service, kill it and start a replacement.

        False if it was out of service already (or the engine is closed).
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

    def _start_in_background(self, name: str, broken: _Worker | None = None) -> None:
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

    def _start_one(self, name: str) -> _Worker | None:
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

    def _adopt(self, worker: _Worker | None) -> None:
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

    def _spawn(self, name: str) -> _Worker:
        region = _Region(self.max_rows, self.pixels, self.classes) if self.max_rows else None
        worker = _Worker(self.threads, self.niceness, name, region)
        with self._lock:
            self._living.add(worker)
        return worker

    def _reap(self, worker: _Worker, timeout_s: float = EXIT_TIMEOUT_S) -> None:
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
        for worker in living:  # e.g. started as the engine closed, with nobody left to reap it
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


def _discard(answer: _Answer) -> None:
    """Nobody will wait for `answer`: drop it without an unretrieved-exception warning."""
    if not answer.done():
        answer.cancel()
    elif not answer.cancelled():
        answer.exception()


# --- the worker process --------------------------------------------------------------


def _serve(sock: socket.socket, threads: int, region: mmap.mmap | None) -> None:
    def answer(status: int, payload: bytes) -> None:
        sock.sendall(RESPONSE.pack(status, IN_SOCKET, len(payload)) + payload)

    length, output_offset = MODEL_LENGTH.unpack(_recv_exact(sock, MODEL_LENGTH.size))
    flatbuffer = bytes(_recv_exact(sock, length))
    try:
        from ai_edge_litert.interpreter import Interpreter

        # The model's own input shape: [1 or -1, H, W, C].
        probe = Interpreter(model_content=flatbuffer, num_threads=threads)
        item_shape = tuple(int(d) for d in probe.get_input_details()[0]["shape"][1:])
        pixels = int(np.prod(item_shape))

        def interpreter_for(rows: int) -> tuple[Any, int, int]:
            interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
            input_index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(input_index, (rows, *item_shape), strict=True)
            interpreter.allocate_tensors()
            return interpreter, input_index, interpreter.get_output_details()[0]["index"]

        # One interpreter per batch size: re-planning one interpreter for every
        # change of size would cost more than a small batch's computation, and
        # the batcher pads to a few sizes.
        interpreters = {1: interpreter_for(1)}
    except Exception as exc:
        answer(1, f"cannot load the model: {exc}".encode())
        return
    answer(0, b"")
    to_unit = np.arange(256, dtype=np.float32) / np.float32(255.0)
    while True:
        try:
            rows, code, where = REQUEST.unpack(_recv_exact(sock, REQUEST.size))
        except EOFError:
            return  # the server closed its end: time to go
        if rows == 0:
            answer(0, b"")  # a heartbeat
            continue
        dtype = _FROM_CODE.get(code)
        if dtype is None or (where == IN_REGION and region is None):
            answer(1, f"unknown dtype code {code} or values at {where}".encode())
            return
        count = rows * pixels
        if where == IN_REGION:
            assert region is not None
            values = np.frombuffer(region, dtype, count)  # read in place, no copy
        else:
            values = np.frombuffer(_recv_exact(sock, count * dtype.itemsize), dtype=dtype)
        try:
            if rows not in interpreters:
                interpreters[rows] = interpreter_for(rows)
            interpreter, input_index, output_index = interpreters[rows]
            # Straight into the interpreter's input tensor (uint8 scaled on the way); its
            # view must be gone before invoke.
            tensor = interpreter.tensor(input_index)().reshape(count)
            if dtype == np.uint8:
                to_unit.take(values, out=tensor)
            else:
                np.copyto(tensor, values)
            del tensor
            interpreter.invoke()
            output = interpreter.get_tensor(output_index)
        except Exception as exc:
            answer(1, f"{type(exc).__name__}: {exc}".encode())
            continue
        if (
            where == IN_REGION
            and region is not None
            and output_offset + output.nbytes <= len(region)
        ):
            np.copyto(np.frombuffer(region, "<f4", output.size, output_offset), output.reshape(-1))
            sock.sendall(RESPONSE.pack(0, IN_REGION, output.nbytes))
        else:
            answer(0, np.ascontiguousarray(output, dtype="<f4").tobytes())


def _step_back(niceness: int) -> None:
    """Let the server's event loop have a CPU first whenever both want one (niceness > 0).

    Handing a batch to a worker wakes it; a process that sleeps as much as a
    worker does would otherwise take the CPU from the event loop at once, and
    every request behind the loop waits while the model computes. SCHED_BATCH
    stops a wake-up from preempting, and the niceness gives the loop the
    larger share while both are busy. Neither needs privileges.
    """
    if niceness <= 0:
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        os.nice(niceness)
    except (AttributeError, OSError) as exc:  # not Linux, or a sandbox that forbids it
        print(f"model worker: keeps its scheduling priority ({exc})", file=sys.stderr)


def main(argv: list[str]) -> int:
    usage = "usage: python -m convserve.server.engine_process FD THREADS NICENESS SHARED_FD"
    try:
        fd, threads, niceness, shared_fd = (int(a) for a in argv)
    except ValueError:
        print(f"{usage} (four integers; started by the server, not by hand)", file=sys.stderr)
        return 2
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        print(f"model worker: FD {fd} is not a socket ({exc})", file=sys.stderr)
        return 2
    region = None
    if shared_fd >= 0:
        try:
            region = mmap.mmap(shared_fd, 0)
        except (OSError, ValueError) as exc:
            print(f"model worker: FD {shared_fd} is not shared memory ({exc})", file=sys.stderr)
            sock.close()
            return 2
        finally:
            with contextlib.suppress(OSError):
                os.close(shared_fd)
    _step_back(niceness)
    try:
        _serve(sock, threads, region)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server went away
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
