"""How a batch runs: the model call behind a `DynamicBatcher`, apart from its dispatch policy.

The batcher decides when a batch starts and which rows it holds; a
`BatchRuns` computes it. It receives the batch as pieces (slices of the
requests' rows, in order) and the padded size, assembles them (padding by
repeating the last row), calls the model and returns the output rows with
the seconds the model call took. Two kinds:

* `ThreadRuns`: ``run_batch`` (blocking) in a thread pool of its own, so the
  event loop never blocks on the model. ``prepare`` (e.g. uint8 pixels into
  float32) runs there too, just before the batch is assembled: requests of
  different dtypes can then share a batch, and the event loop does no
  per-element work. A batch whose callers have all gone still finishes in its
  thread (`computes_after_cancel`), and keeps its slot until then.
* `AwaitedRuns`: ``run_batch_async`` (a coroutine function, e.g. a model in
  worker processes) awaited on the event loop, as ``await
  run_batch_async(batch, deadline)``, with the batch assembled there. It gets
  the rows as they came when they share a dtype (the model converts them
  itself) and runs ``prepare`` only on batches of mixed dtypes; no thread is
  involved, so nothing waits for the GIL. Cancelling it cancels the call.

Either may run a small batch inline, on the event loop thread (`call`), for
a model so fast that handing the batch to a thread or a process costs more
than the call: up to ``inline_max_rows`` rows, and with `AwaitedRuns` only
while nothing else waits on the loop (`inline_now`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import numpy as np

Prepare = Callable[[np.ndarray], np.ndarray]
Timed = tuple[np.ndarray, float]  # (output rows, seconds the model call took)


class BatchRuns(Protocol):
    """Computes a batcher's batches (see the module docstring)."""

    # Batches of at most this many rows may run inline (0: never).
    inline_max_rows: int
    # A batch handed to `start` keeps computing after its awaiter is cancelled.
    computes_after_cancel: bool
    # Whether batches of different dtypes may share a batch (`prepare` unifies them).
    mixes_dtypes: bool

    def inline_now(self) -> bool:
        """Whether a small batch may run on the event loop now."""
        ...

    def call(self, pieces: Sequence[np.ndarray], padded: int) -> Timed:
        """Assemble, prepare and run a batch on the calling thread (blocking)."""
        ...

    def start(
        self, pieces: Sequence[np.ndarray], padded: int, deadline: float | None
    ) -> Awaitable[Timed]:
        """Run a batch off the event loop; `deadline` is when its last caller stops waiting
        (None: some caller never does). Returns an awaitable of its output."""
        ...

    def close(self) -> None:
        """No more batches: release threads."""
        ...


def pad(batch: np.ndarray, padded: int) -> np.ndarray:
    """`batch` padded to `padded` rows by repeating its last row."""
    rows = batch.shape[0]
    if padded <= rows:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], padded - rows, axis=0)], axis=0)


def assemble(
    pieces: Sequence[np.ndarray], padded: int, prepare: Prepare | None, *, prepare_all: bool
) -> np.ndarray:
    """The pieces' rows as one batch of `padded` rows (the last row repeated).

    prepare_all=False applies `prepare` only when the pieces' dtypes differ.
    """
    if prepare is not None and (prepare_all or any(p.dtype != pieces[0].dtype for p in pieces)):
        pieces = [prepare(piece) for piece in pieces]
    if len(pieces) == 1:
        return pad(pieces[0], padded)
    rows = sum(p.shape[0] for p in pieces)
    parts = list(pieces)
    if padded > rows:
        parts.append(np.repeat(parts[-1][-1:], padded - rows, axis=0))
    return np.concatenate(parts, axis=0)


class _Timed:
    """`run_batch` on an assembled batch, timed by `clock`."""

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        prepare: Prepare | None,
        clock: Callable[[], float],
    ) -> None:
        self._run_batch = run_batch
        self._prepare = prepare
        self._clock = clock

    def call(self, pieces: Sequence[np.ndarray], padded: int) -> Timed:
        batch = assemble(pieces, padded, self._prepare, prepare_all=True)
        started = self._clock()
        output = np.asarray(self._run_batch(batch))
        return output, self._clock() - started


class ThreadRuns(_Timed):
    """`run_batch` in threads: at most `threads` batches at once (see the module docstring)."""

    computes_after_cancel = True

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        *,
        name: str,
        threads: int = 1,
        prepare: Prepare | None = None,
        inline_max_rows: int = 0,
        executor: concurrent.futures.Executor | None = None,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(run_batch, prepare, clock)
        self.inline_max_rows = max(0, inline_max_rows)
        self.mixes_dtypes = prepare is not None
        self._owns_executor = executor is None
        self._executor: concurrent.futures.Executor = (
            executor
            if executor is not None
            else concurrent.futures.ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix=f"batcher-{name}"
            )
        )

    def inline_now(self) -> bool:
        return True

    def start(
        self, pieces: Sequence[np.ndarray], padded: int, deadline: float | None
    ) -> asyncio.Future[Timed]:
        return asyncio.get_running_loop().run_in_executor(self._executor, self.call, pieces, padded)

    def close(self) -> None:
        if self._owns_executor:
            self._executor.shutdown(wait=False)


class AwaitedRuns(_Timed):
    """`run_batch_async` awaited on the event loop (see the module docstring).

    `run_batch`, if given, computes the same batches inline (for an idle model,
    up to `inline_max_rows` rows, while `loop_busy()` is False).
    """

    computes_after_cancel = False

    def __init__(
        self,
        run_batch_async: Callable[[np.ndarray, float | None], Awaitable[np.ndarray]],
        *,
        run_batch: Callable[[np.ndarray], np.ndarray] | None = None,
        prepare: Prepare | None = None,
        inline_max_rows: int = 0,
        loop_busy: Callable[[], bool] | None = None,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(run_batch or _no_inline, prepare, clock)
        self._run_batch_async = run_batch_async
        self.inline_max_rows = max(0, inline_max_rows) if run_batch is not None else 0
        self.mixes_dtypes = prepare is not None
        # Whether other work waits on the loop (then nothing runs inline); injectable for
        # tests.
        self._loop_busy = loop_busy or loop_has_ready_callbacks

    def inline_now(self) -> bool:
        return not self._loop_busy()

    async def start(
        self, pieces: Sequence[np.ndarray], padded: int, deadline: float | None
    ) -> Timed:
        batch = assemble(pieces, padded, self._prepare, prepare_all=False)
        started = self._clock()
        output = np.asarray(await self._run_batch_async(batch, deadline))
        return output, self._clock() - started

    def close(self) -> None:
        pass


def _no_inline(batch: np.ndarray) -> np.ndarray:
    raise AssertionError("inline_max_rows is 0 without run_batch")


def loop_has_ready_callbacks() -> bool:
    """Whether the running event loop has other callbacks ready to run (True when it
    cannot tell). Under load, other calls' messages are among them: a batch run on the
    loop would make them wait and then leave each to run alone, never batched."""
    ready = getattr(asyncio.get_running_loop(), "_ready", None)
    return ready is None or len(ready) > 0


__all__ = ["AwaitedRuns", "BatchRuns", "ThreadRuns", "assemble", "loop_has_ready_callbacks", "pad"]
