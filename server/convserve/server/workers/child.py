"""The model worker process: loads the flatbuffer it is handed, then answers batches and
heartbeats until the server closes its end (the wire is described in `wire`).

    python -m convserve.server.workers.child FD THREADS NICENESS SHARED_FD
    # started by WorkerPool; SHARED_FD -1: no shared region
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import sys
from typing import Any

import numpy as np

from convserve.server.workers.wire import (
    FROM_CODE,
    IN_REGION,
    IN_SOCKET,
    MODEL_LENGTH,
    REQUEST,
    RESPONSE,
    recv_exact,
)


def _serve(sock: socket.socket, threads: int, region: mmap.mmap | None) -> None:
    def answer(status: int, payload: bytes) -> None:
        sock.sendall(RESPONSE.pack(status, IN_SOCKET, len(payload)) + payload)

    length, output_offset = MODEL_LENGTH.unpack(recv_exact(sock, MODEL_LENGTH.size))
    flatbuffer = bytes(recv_exact(sock, length))
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
            rows, code, where = REQUEST.unpack(recv_exact(sock, REQUEST.size))
        except EOFError:
            return  # the server closed its end: time to go
        if rows == 0:
            answer(0, b"")  # a heartbeat
            continue
        dtype = FROM_CODE.get(code)
        if dtype is None or (where == IN_REGION and region is None):
            answer(1, f"unknown dtype code {code} or values at {where}".encode())
            return
        count = rows * pixels
        if where == IN_REGION:
            assert region is not None
            values = np.frombuffer(region, dtype, count)  # read in place, no copy
        else:
            values = np.frombuffer(recv_exact(sock, count * dtype.itemsize), dtype=dtype)
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
    usage = "usage: python -m convserve.server.workers.child FD THREADS NICENESS SHARED_FD"
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
