"""The wire between the server and a model worker, and the memory they share.

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
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import socket
import struct
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
FROM_CODE: dict[int, np.dtype[Any]] = {code: dtype for dtype, code in _DTYPES.items()}


def recv_exact(sock: socket.socket, size: int) -> bytearray:
    """Exactly `size` bytes from `sock`; EOFError if the other end closes first."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the other end closed the connection")
        got += n
    return buffer


def check_batch(images: np.ndarray, pixels: int) -> int:
    """The dtype code of a batch the worker can take; ValueError otherwise."""
    code = _DTYPES.get(images.dtype)
    if code is None or images.ndim < 1 or images.shape[0] < 1 or images[0].size != pixels:
        raise ValueError(
            f"uint8 or float32 images of {pixels} pixels expected (at least one), got "
            f"{images.dtype} {list(images.shape)}"
        )
    return code


class Region:
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


def probabilities(status: int, payload: bytes | bytearray, rows: int, classes: int) -> np.ndarray:
    """A worker's answer to a batch of `rows` images: float32 [rows, classes], or
    errors.Internal if the model failed on it or the answer has the wrong size."""
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
