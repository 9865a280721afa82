"""Parsing large JSON bodies in a worker process, so that they cannot stall the event loop.

A JSON parser builds a Python object per number and per array while holding the
GIL, in one call: 35 MiB of TF Serving ``instances`` ([N,28,28,1] nested
arrays) take about 2 s, and numpy's conversion of the result as long again.
In a thread of the server that would still stop its event loop (health checks
included) for that long. So bodies of `PROCESS_MIN_BYTES` or more are parsed in
a worker process, which also turns every long array of numbers into a numpy
array there; what comes back is the small rest of the document and those
arrays (a copy of their bytes). Smaller bodies are parsed inline: a thread
hand-off costs more than parsing a few hundred KB.

This module imports only orjson and numpy: the worker is started with
``spawn`` (a fork of a process running TensorFlow is not safe) and imports
nothing else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

# Bodies at least this large are parsed in the worker process.
PROCESS_MIN_BYTES = 256 << 10
# Arrays of at least this many numbers come back as numpy arrays.
ARRAY_MIN_NUMBERS = 1024


class JsonError(ValueError):
    """The body is not valid JSON; the message is the parser's."""


@dataclass(frozen=True)
class RefusedArray:
    """A long array the worker could not read as numbers (ragged, strings, ...), in place
    of its elements: reading it again in the server would cost what the worker spared."""

    reason: str


def _arrays(value: Any) -> Any:
    """`value` with every long array of numbers as a numpy array (in place for containers)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, list | dict):
                value[key] = _arrays(item)
        return value
    if not isinstance(value, list) or not value:
        return value
    first = value[0]
    while isinstance(first, list) and first:
        first = first[0]
    if isinstance(first, bool) or not isinstance(first, int | float):
        return [_arrays(item) if isinstance(item, list | dict) else item for item in value]
    try:
        array = np.asarray(value)
    except ValueError:
        return RefusedArray("a rectangular array of numbers expected (rows of equal length)")
    if array.size < ARRAY_MIN_NUMBERS:
        return value
    if array.dtype.kind not in "iuf":
        return RefusedArray("an array of numbers only expected")
    return array


def parse(body: bytes) -> Any:
    """The JSON document in `body`, long arrays of numbers as numpy arrays. Runs in the
    worker process; raises JsonError for invalid JSON."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise JsonError(str(exc)) from None
    return _arrays(value)


class JsonParser:
    """Parses request bodies: inline when small, in one worker process when large."""

    def __init__(self, process_min_bytes: int = PROCESS_MIN_BYTES) -> None:
        self.process_min_bytes = process_min_bytes
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn")
                )
            return self._pool

    async def parse(self, body: bytes) -> Any:
        """`body` parsed (see `parse`); JsonError for invalid JSON."""
        if len(body) < self.process_min_bytes:
            try:
                return orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise JsonError(str(exc)) from None
        pool = self._executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, parse, body)
        except concurrent.futures.process.BrokenProcessPool:
            # The worker died (e.g. out of memory on a huge body): the next one starts anew.
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    def close(self) -> None:
        """Stop the worker process, if one was started."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
