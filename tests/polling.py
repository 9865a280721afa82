"""The one way tests wait for something to happen: poll a check until it holds.

`wait_for` blocks (for code that runs outside an event loop); `until` awaits
(inside one, so the loop keeps serving while the test waits). Both return the
check's first truthy value, treat the exception types in `retry_on` as "not
yet" (a server still starting refuses connections), and fail with what was
awaited and the last value or error seen. The time limits are generous on
purpose: they bound a hung test, they do not time the code under test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_INTERVAL_S = 0.05


def _attempt(
    check: Callable[[], T | None], retry_on: tuple[type[BaseException], ...]
) -> tuple[T | None, Any]:
    """(the check's value, or None; what it returned or raised, for the failure message)."""
    try:
        value = check()
    except retry_on as exc:
        return None, exc
    return value, value


def _timed_out(what: str, timeout_s: float, last: Any) -> AssertionError:
    return AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")


def wait_for(
    check: Callable[[], T | None],
    *,
    what: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval_s: float = DEFAULT_INTERVAL_S,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `check` every `interval_s` until it returns something truthy; return that
    (typed without None: a check returning `str | None` gives a `str`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value, last = _attempt(check, retry_on)
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout_s, last)
        time.sleep(interval_s)


async def until(
    check: Callable[[], T | None],
    *,
    what: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval_s: float = DEFAULT_INTERVAL_S,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """`wait_for` on the running event loop: sleeps with asyncio between checks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value, last = _attempt(check, retry_on)
        if value:
            return value
        if loop.time() >= deadline:
            raise _timed_out(what, timeout_s, last)
        await asyncio.sleep(interval_s)
