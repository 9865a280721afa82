"""One model worker process, seen from the server: started with its socket and shared
region, handed its model, then called (blocking, or on the event loop), pinged, killed
and reaped. The pool decides when (see `pool`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from convserve.server.workers import child
from convserve.server.workers.wire import (
    IN_REGION,
    IN_SOCKET,
    MODEL_LENGTH,
    REQUEST,
    RESPONSE,
    Region,
    check_batch,
    probabilities,
    recv_exact,
)

# Seconds a worker may take to start and load its model before the load fails.
START_TIMEOUT_S = 60.0
# Seconds a worker may take to exit once its socket is closed before it is killed.
EXIT_TIMEOUT_S = 5.0

Answer = asyncio.Future[tuple[int, bytes]]


class WorkerError(Exception):
    """A worker process could not start, or died or broke the protocol."""


class Expired(Exception):
    """A call's time ran out before its answer came.

    `owed`, if not None, gets the answer should it still come.
    """

    def __init__(self, owed: Answer | None) -> None:
        super().__init__("no answer in time")
        self.owed = owed


class Worker:
    """One child process with one interpreter; one call at a time.

    Constructing it starts the process; `start` hands it the model. Until
    `attach`, calls are blocking (`call`); after it, `request` on the event
    loop, whose reader and writer callbacks move the frames.
    """

    def __init__(self, threads: int, niceness: int, name: str, region: Region | None) -> None:
        self.name = name
        self.region = region
        ours, theirs = socket.socketpair()
        shared_fd = region.fd if region is not None else -1
        arguments = (theirs.fileno(), threads, niceness, shared_fd)
        command = [sys.executable, "-m", child.__name__, *map(str, arguments)]
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
        # Set by the pool: out of service (being replaced, or the pool closed).
        self.retired = False
        # Called on the event loop when the worker closes its end unasked.
        self.on_end: Callable[[Worker], None] | None = None
        # time.monotonic() of the last answer: a worker that answered lately needs no heartbeat.
        self.answered_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._received = bytearray()
        self._answer: Answer | None = None
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
            status, _, length = RESPONSE.unpack(recv_exact(sock, RESPONSE.size))
            message = recv_exact(sock, length)
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
        self.sock.sendall(self.frame(images, check_batch(images, pixels)))
        status, where, length = RESPONSE.unpack(recv_exact(self.sock, RESPONSE.size))
        following = recv_exact(self.sock, length) if where == IN_SOCKET else b""
        payload = self.payload(where, length, following)
        return probabilities(status, payload, images.shape[0], classes)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve `request` on `loop` (call on its thread)."""
        self._loop = loop
        self.sock.setblocking(False)
        # One reader for the worker's life: registering one per call would cost
        # two epoll_ctl calls per batch.
        loop.add_reader(self.sock.fileno(), self._readable)

    def request(self, frame: bytes) -> Answer:
        """Send one request frame; the future gets the answer ``(status, payload)``.

        It fails with EOFError if the worker closes its end first. Nothing
        here waits: what the socket cannot take now is sent when it can, so
        a worker that stopped reading never blocks the caller (or `detach`).
        """
        loop = self._loop
        if loop is None or self._ended:
            raise EOFError(f"{self.name} is not serving")
        answer: Answer = loop.create_future()
        self._answer = answer
        self._out = memoryview(frame)
        self._writable()
        return answer

    def expire(self, answer: Answer, follow: bool) -> None:
        """Timer callback: `answer` waited too long and fails with `Expired`.

        follow=True: the answer the worker still owes goes to the future the
        exception carries; else it is dropped when it comes.
        """
        if answer.done() or self._answer is not answer or self._loop is None:
            return
        owed: Answer | None = self._loop.create_future() if follow else None
        self._answer = owed
        answer.set_exception(Expired(owed))

    def owe(self, answer: Answer) -> Answer | None:
        """The caller of `answer` stopped waiting for it: a future for the answer the
        worker still owes (None if it came, or the call failed, already)."""
        if self._answer is not answer or self._loop is None or self._ended:
            return None
        owed: Answer = self._loop.create_future()
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
