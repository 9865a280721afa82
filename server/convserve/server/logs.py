"""Server logging: text or JSON lines on stderr, each tagged with the request id.

`RejectionSummary` (one shared instance, `REJECTIONS`) logs rejected calls: each
at DEBUG with its detail, and at most one INFO line per interval counting them.

Every RPC gets a request id, the caller's ``x-request-id`` metadata when it
sends a usable one, else a fresh one. `begin_call` (which every convserve
servicer method calls, through `protocols.calls.Calls`) stores it in a context
variable for the duration of the call, so every log record emitted while
serving that call (by any module) carries it as ``request_id``. The id is
worked out only when a record first needs it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

REQUEST_ID_HEADER = "x-request-id"
NO_REQUEST = "-"
REQUEST_ID: ContextVar[str | _CallRequestId] = ContextVar(
    "convserve_request_id", default=NO_REQUEST
)

# A caller's id is echoed into logs, so only short, plain ids are taken as they are.
_USABLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# Attributes every LogRecord has; anything else was passed with `extra=` and is logged too.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside any RPC)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = str(REQUEST_ID.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339 UTC), level, logger, message, request_id.

    Exceptions add ``exception`` (the formatted traceback); fields passed with
    ``extra=`` are included as they are (or as strings when not JSON-able).
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", NO_REQUEST),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(log_format: str, log_level: str, stream: IO[str] | None = None) -> None:
    """Route all logging through one handler on `stream` (stderr) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(log_level.upper())


class RequestIds:
    """Makes request ids: the caller's usable ``x-request-id``, else a new process-unique one."""

    def __init__(self) -> None:
        self._prefix = f"{os.getpid():x}-"
        self._counter = itertools.count(1)

    def request_id(self, metadata: Any) -> str:
        """The caller's usable ``x-request-id`` in `metadata`, else a new process-unique id."""
        for key, value in metadata or ():
            if key == REQUEST_ID_HEADER and isinstance(value, str) and _USABLE_ID.fullmatch(value):
                return value
        return f"{self._prefix}{next(self._counter):x}"


_IDS = RequestIds()


class _CallRequestId:
    """A call's request id, worked out from its metadata when a log line first needs it:
    most calls log nothing, and reading a call's metadata costs on every call."""

    __slots__ = ("_context", "_value")

    def __init__(self, context: Any) -> None:
        self._context = context
        self._value: str | None = None

    def __str__(self) -> str:
        if self._value is None:
            try:
                metadata = self._context.invocation_metadata()
            except Exception:  # a call that has ended keeps no metadata
                metadata = ()
            self._value = _IDS.request_id(metadata)
            self._context = None
        return self._value


def begin_call(context: Any) -> None:
    """Give the running gRPC call (`context`, a ServicerContext) its request id: from now
    on, in this task and the tasks it starts, every log record carries it."""
    REQUEST_ID.set(_CallRequestId(context))


Schedule = Callable[[float, Callable[[], None]], object]


def _call_later(delay_s: float, callback: Callable[[], None]) -> None:
    """Run `callback` after `delay_s` on the running event loop (none: never; the next
    rejection after the interval logs the counts instead)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    loop.call_later(delay_s, callback)


class RejectionSummary:
    """Logs rejected calls without letting a flood of bad requests flood the log.

    `rejected` logs each call at DEBUG with its detail and counts it by status
    code; at most one INFO line per `interval_s` reports the counts, e.g.
    ``rejected 532 calls in the last 10 s: INVALID_ARGUMENT 500, UNAUTHENTICATED 32``.
    The first rejection after a quiet interval is reported at once; the ones after it
    when the interval has passed (a timer on the running event loop, else with the
    next rejection). `clock` and `schedule` (``schedule(delay_s, callback)``) are
    injectable so tests need no waiting.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule = _call_later,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._schedule = schedule
        self._counts: Counter[str] = Counter()
        self._last_line: float | None = None
        # Bumped by every INFO line, so a timer set for an earlier window does nothing.
        self._window = 0
        self._timer_set = False

    def rejected(self, code: str, what: str, detail: str) -> None:
        """Count one rejected call: `code` its status name, `what` the call (protocol and
        method), `detail` the message the client got."""
        self._logger.debug("rejected %s with %s: %s", what, code, detail)
        self._counts[code] += 1
        now = self._clock()
        if self._last_line is None or now - self._last_line >= self._interval_s:
            self._report(now)
        elif not self._timer_set:
            self._timer_set = True
            window = self._window
            self._schedule(self._last_line + self._interval_s - now, lambda: self._due(window))

    def flush(self) -> None:
        """Report the counts not reported yet (e.g. when the server stops)."""
        if self._counts:
            self._report(self._clock())

    def _due(self, window: int) -> None:
        if window == self._window and self._counts:
            self._report(self._clock())

    def _report(self, now: float) -> None:
        total = sum(self._counts.values())
        counts = ", ".join(f"{code} {n}" for code, n in sorted(self._counts.items()))
        calls = "call" if total == 1 else "calls"
        if self._last_line is None or now - self._last_line >= 2 * self._interval_s:
            # After a quiet spell the window is not meaningful: these are the first.
            self._logger.info("rejected %d %s: %s", total, calls, counts)
        else:
            self._logger.info(
                "rejected %d %s in the last %.0f s: %s", total, calls, now - self._last_line, counts
            )
        self._counts.clear()
        self._last_line = now
        self._window += 1
        self._timer_set = False


REJECTIONS = RejectionSummary(logging.getLogger("convserve.server.rejections"))
"""The server's one summary of rejected calls (auth and every protocol's `Calls`)."""
