"""LiteRT in worker processes: model calls that never wait for the event loop's GIL.

A LiteRT call on a small batch takes tens of microseconds, but in a thread of
the server it must take the GIL back from the event loop (and from gRPC's
work on it) several times per batch, waiting up to a switch interval each
time: under load a batch then spends more time waiting for the GIL than
computing. `ProcessEngine` runs the same flatbuffer in `workers` child
processes, each with its own interpreter and GIL; the event loop hands a
batch to an idle worker over a socket pair and awaits the answer like any
other I/O, so no thread of the server process competes for the GIL.

The wire between the server and a worker, all little-endian:

* start-up: the server sends ``<Q length>`` and the flatbuffer; the worker
  answers with a response frame (status 0 once the interpreter is ready).
* request: ``<I rows><B dtype><3x>`` and ``rows * 784`` pixels, uint8 (dtype
  0, 0..255) or float32 (dtype 1, 0..1);
* response: ``<B status><3x><I length>`` and `length` bytes: float32
  ``[rows, 10]`` probabilities (status 0) or a UTF-8 error message (status 1).

A worker that dies fails the batch it held (`errors.Internal`) and is
replaced in the background; the others keep serving meanwhile.

    python -m convserve.server.engine_process FD THREADS NICENESS   # started by ProcessEngine
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from convserve.server import errors

log = logging.getLogger(__name__)

PIXELS = 28 * 28
CLASSES = 10
REQUEST = struct.Struct("<IB3x")
RESPONSE = struct.Struct("<B3xI")
MODEL_LENGTH = struct.Struct("<Q")
_DTYPES: dict[np.dtype[Any], int] = {np.dtype(np.uint8): 0, np.dtype(np.float32): 1}
_FROM_CODE: dict[int, np.dtype[Any]] = {code: dtype for dtype, code in _DTYPES.items()}
# Seconds a worker may take to start and load its model before the load fails.
START_TIMEOUT_S = 60.0
# Seconds a worker may take to exit once its socket is closed before it is killed.
EXIT_TIMEOUT_S = 5.0


class WorkerError(Exception):
    """A worker process could not start, or died or broke the protocol."""


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


def _request_frame(images: np.ndarray) -> tuple[bytes, np.ndarray]:
    code = _DTYPES.get(images.dtype)
    if code is None or images.ndim < 1 or images[0].size != PIXELS:
        raise ValueError(
            f"uint8 or float32 images of {PIXELS} pixels expected, got {images.dtype} "
            f"{list(images.shape)}"
        )
    return REQUEST.pack(images.shape[0], code), np.ascontiguousarray(images)


def _probabilities(status: int, payload: bytes | bytearray, rows: int) -> np.ndarray:
    if status != 0:
        log.error("a model worker failed on %d images: %s", rows, payload.decode(errors="replace"))
        raise errors.Internal(f"the model failed on a batch of {rows} images; see the server log")
    output = np.frombuffer(payload, dtype="<f4")
    if output.size != rows * CLASSES:
        raise errors.Internal(
            f"the model worker answered {output.size} values for {rows} images; "
            f"{rows * CLASSES} expected"
        )
    return output.reshape(rows, CLASSES)


class _Worker:
    """One child process with one interpreter; one call at a time.

    Until `attach`, calls are blocking (`call`); after it, `call_async` on the
    event loop, whose reader callback collects the answers.
    """

    def __init__(self, flatbuffer: bytes, threads: int, niceness: int, name: str) -> None:
        self.name = name
        ours, theirs = socket.socketpair()
        arguments = (theirs.fileno(), threads, niceness)
        command = [sys.executable, "-m", __name__, *map(str, arguments)]
        try:
            self.process = subprocess.Popen(
                command,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.sock = ours
        self._loop: asyncio.AbstractEventLoop | None = None
        self._received = bytearray()
        self._answer: asyncio.Future[tuple[int, bytes]] | None = None
        self._ended = False
        try:
            ours.settimeout(START_TIMEOUT_S)
            ours.sendall(MODEL_LENGTH.pack(len(flatbuffer)))
            ours.sendall(flatbuffer)
            status, length = RESPONSE.unpack(_recv_exact(ours, RESPONSE.size))
            message = _recv_exact(ours, length)
            if status != 0:
                raise WorkerError(f"{name}: {message.decode(errors='replace')}")
            ours.settimeout(None)
        except (OSError, EOFError) as exc:
            self.close()
            raise WorkerError(f"{name}: did not start ({exc}); see the log above") from exc
        except WorkerError:
            self.close()
            raise

    def call(self, images: np.ndarray) -> np.ndarray:
        """Blocking call (before `attach`, e.g. a warm-up)."""
        header, pixels = _request_frame(images)
        self.sock.sendall(header + pixels.tobytes())
        status, length = RESPONSE.unpack(_recv_exact(self.sock, RESPONSE.size))
        return _probabilities(status, _recv_exact(self.sock, length), images.shape[0])

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve `call_async` on `loop` (call on its thread)."""
        self._loop = loop
        self.sock.setblocking(False)
        # One reader for the worker's life: registering one per call would cost
        # two epoll_ctl calls per batch.
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end()
            return
        self._received += data
        if len(self._received) < RESPONSE.size:
            return
        status, length = RESPONSE.unpack_from(self._received)
        end = RESPONSE.size + length
        if len(self._received) < end:
            return
        payload = bytes(self._received[RESPONSE.size : end])
        del self._received[:end]
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_result((status, payload))

    def _end(self) -> None:
        """The worker closed its end (it exited): fail the call waiting, if any."""
        self._ended = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_exception(EOFError(f"{self.name} closed its connection"))

    async def call_async(self, images: np.ndarray) -> np.ndarray:
        loop = self._loop
        if loop is None or self._ended:
            raise EOFError(f"{self.name} is not serving")
        header, pixels = _request_frame(images)
        answer: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self._answer = answer
        await loop.sock_sendall(self.sock, header + pixels.tobytes())
        status, payload = await answer
        return _probabilities(status, payload, images.shape[0])

    def detach(self) -> None:
        """Stop reading on the loop and close the socket: the worker exits on end of input.

        A call still waiting for its answer fails with EOFError.
        """
        if not self._ended:
            self._end()
        with contextlib.suppress(OSError):
            self.sock.close()

    def exit_code(self) -> int | None:
        return self.process.poll()

    def close(self) -> None:
        """Close the socket and reap the worker (blocking: not on the event loop)."""
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.process.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ProcessEngine:
    """LiteRT predictions in `workers` child processes of `threads` CPU threads each.

    Call `__call__` (blocking) only before `serve()`, e.g. to warm up; after
    it, `run` (on the event loop) hands each batch to an idle worker. At most
    `workers` batches run at once; a caller finding none idle waits for one.
    `close` and everything after `serve` belong to the event loop's thread.
    """

    def __init__(
        self,
        flatbuffer: bytes,
        *,
        threads: int,
        workers: int,
        name: str,
        niceness: int = 0,
        on_worker_exit: Callable[[], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.name = name
        self.threads = threads
        self.workers = workers
        self.niceness = niceness
        self._flatbuffer = flatbuffer
        # Called on the event loop when a serving worker stopped unasked (e.g. a metric).
        self.on_worker_exit = on_worker_exit
        self._all: list[_Worker] = []
        self._closed = False
        self._reaper: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._lock = threading.Lock()
        try:
            for n in range(workers):
                self._all.append(_Worker(flatbuffer, threads, niceness, f"{name} worker {n}"))
        except Exception:
            self.close()
            raise
        self._idle: deque[_Worker] = deque(self._all)

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (for tests and logs)."""
        return [w.process.pid for w in self._all]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 (0..1) or uint8 (0..255) [N,28,28(,1)] -> float32 [N,10]; blocking."""
        if self._loop is not None:
            raise RuntimeError(f"{self.name}: serving on an event loop; use run()")
        with self._lock:
            if not self._idle:
                raise RuntimeError(f"{self.name}: every worker is busy with a blocking call")
            worker = self._idle.popleft()
        try:
            return worker.call(images)
        finally:
            with self._lock:
                self._idle.append(worker)

    def serve(self) -> None:
        """From now on calls come through `run`, on the running event loop."""
        self._loop = asyncio.get_running_loop()
        for worker in self._all:
            worker.attach(self._loop)

    async def run(self, images: np.ndarray) -> np.ndarray:
        """`__call__` for the event loop: the batch goes to an idle worker."""
        while not self._idle and not self._closed:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        if self._closed:
            raise errors.Unavailable(f"{self.name}: the model was released")
        worker = self._idle.popleft()
        try:
            result = await worker.call_async(images)
        except errors.ServeError:
            self._release(worker)
            raise
        except (OSError, EOFError) as exc:
            self._replace(worker)
            if self._closed:
                raise errors.Unavailable(f"{self.name}: the model was released") from exc
            if self.on_worker_exit is not None:
                self.on_worker_exit()
            raise errors.Internal(
                f"{worker.name} (pid {worker.process.pid}) stopped during a batch; "
                "it is being restarted"
            ) from exc
        except BaseException:
            # Cancelled mid-call: its answer would reach the next caller, so the
            # worker cannot be trusted any more.
            self._replace(worker)
            raise
        self._release(worker)
        return result

    def _release(self, worker: _Worker) -> None:
        self._idle.append(worker)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _replace(self, broken: _Worker) -> None:
        """Stop `broken`; start a new worker in a thread, idle once it is ready."""
        broken.detach()
        if broken in self._all:
            self._all.remove(broken)
        loop = self._loop
        if self._closed or loop is None:
            threading.Thread(target=broken.close, daemon=True).start()
            return

        def start() -> None:
            broken.close()
            code = broken.exit_code()
            log.warning("%s exited (code %s); starting a new one", broken.name, code)
            try:
                worker = _Worker(self._flatbuffer, self.threads, self.niceness, broken.name)
            except Exception:
                log.exception("%s could not be restarted", broken.name)
                return
            loop.call_soon_threadsafe(self._adopt, worker)

        threading.Thread(target=start, name=f"restart {broken.name}", daemon=True).start()

    def _adopt(self, worker: _Worker) -> None:
        if self._closed or self._loop is None:
            threading.Thread(target=worker.close, daemon=True).start()
            return
        worker.attach(self._loop)
        log.info("%s restarted (pid %d)", worker.name, worker.process.pid)
        self._all.append(worker)
        self._release(worker)

    def close(self) -> None:
        """Stop every worker (without blocking); later calls get errors.Unavailable."""
        self._closed = True
        workers, self._all = self._all, []
        for worker in workers:
            worker.detach()
        if workers:

            def reap() -> None:
                for worker in workers:
                    worker.close()

            self._reaper = threading.Thread(target=reap, name=f"stop {self.name}", daemon=True)
            self._reaper.start()
        while self._waiters:
            self._wake_one()

    def wait_closed(self, timeout_s: float) -> bool:
        """After `close`: wait until every worker has exited; False if time ran out."""
        reaper = self._reaper
        if reaper is not None:
            reaper.join(timeout_s)
            return not reaper.is_alive()
        return self._closed


# --- the worker process --------------------------------------------------------------


def _serve(sock: socket.socket, threads: int) -> None:
    def answer(status: int, payload: bytes) -> None:
        sock.sendall(RESPONSE.pack(status, len(payload)) + payload)

    (length,) = MODEL_LENGTH.unpack(_recv_exact(sock, MODEL_LENGTH.size))
    flatbuffer = bytes(_recv_exact(sock, length))
    try:
        from ai_edge_litert.interpreter import Interpreter

        def interpreter_for(rows: int) -> tuple[Any, int, int]:
            interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
            input_index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(input_index, (rows, 28, 28, 1), strict=True)
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
            rows, code = REQUEST.unpack(_recv_exact(sock, REQUEST.size))
        except EOFError:
            return  # the server closed its end: time to go
        dtype = _FROM_CODE.get(code)
        if dtype is None:
            answer(1, f"unknown dtype code {code}".encode())
            return
        pixels = np.frombuffer(_recv_exact(sock, rows * PIXELS * dtype.itemsize), dtype=dtype)
        images = to_unit.take(pixels) if dtype == np.uint8 else pixels
        try:
            if rows not in interpreters:
                interpreters[rows] = interpreter_for(rows)
            interpreter, input_index, output_index = interpreters[rows]
            interpreter.set_tensor(input_index, images.reshape(rows, 28, 28, 1))
            interpreter.invoke()
            output = np.ascontiguousarray(interpreter.get_tensor(output_index), dtype="<f4")
        except Exception as exc:
            answer(1, f"{type(exc).__name__}: {exc}".encode())
            continue
        answer(0, output.tobytes())


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
    usage = "usage: python -m convserve.server.engine_process FD THREADS NICENESS"
    try:
        fd, threads, niceness = (int(a) for a in argv)
    except ValueError:
        print(f"{usage} (three integers; started by the server, not by hand)", file=sys.stderr)
        return 2
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        print(f"model worker: FD {fd} is not a socket ({exc})", file=sys.stderr)
        return 2
    _step_back(niceness)
    try:
        _serve(sock, threads)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server went away
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
