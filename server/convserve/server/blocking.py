"""Blocking calls that must never keep the process from exiting.

`asyncio.to_thread` runs a call in the loop's default executor, whose threads
`asyncio.run` joins at exit and Python joins again at interpreter shutdown: a
read of a file on a hung network file system (or a FIFO nobody writes) then
holds a stopped server alive until the read returns. `run_detached` runs the
call in a daemon thread of its own instead: the caller awaits it like any
future, may be cancelled while it runs, and the process exits without it.

Use it for file system work of the model repository (config file reads,
version listings, SavedModel loads). `pending()` tells `__main__` whether such
a thread is still running at exit, so that the process ends at once instead of
finalizing the interpreter under it.

`off_loop` is for work proportional to a request's payload (decoding,
checking, encoding): in a thread when the payload is large, else inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
# Payloads of at least this many bytes are converted (decoded, checked, encoded) in a
# thread: work proportional to a large payload would otherwise stall every other call
# on the event loop, health checks included.
OFFLOAD_MIN_BYTES = 1 << 20

_lock = threading.Lock()
_running: set[threading.Thread] = set()


async def run_detached(fn: Callable[..., T], *args: Any, name: str = "blocking-call") -> T:
    """`fn(*args)` in a new daemon thread; returns (or raises) what it does.

    Cancelling the caller stops waiting at once; the thread runs on until `fn`
    returns, and its result is dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return  # the caller went away
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as exc:
            error = exc
        finally:
            with _lock:
                _running.discard(threading.current_thread())
        # The loop may have closed meanwhile (the server stopped): nobody waits any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    thread = threading.Thread(target=target, name=name, daemon=True)
    with _lock:
        _running.add(thread)
    thread.start()
    return await future


async def off_loop(fn: Callable[..., T], *args: Any, size_bytes: int) -> T:
    """``fn(*args)``, in a thread when the payload it works on has `size_bytes` >=
    `OFFLOAD_MIN_BYTES`, else inline (a thread hand-off costs more than a small conversion)."""
    if size_bytes < OFFLOAD_MIN_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def pending() -> int:
    """How many `run_detached` threads are still running."""
    with _lock:
        return len(_running)


__all__ = ["OFFLOAD_MIN_BYTES", "off_loop", "pending", "run_detached"]
