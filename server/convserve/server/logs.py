"""Server logging: text or JSON lines on stderr, each tagged with the request id.

Every RPC gets a request id, the caller's ``x-request-id`` metadata when it
sends a usable one, else a fresh one. `RequestIdInterceptor` stores it in a
context variable for the duration of the call, so every log record emitted
while serving that call (by any module) carries it as ``request_id``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

import grpc

REQUEST_ID_HEADER = "x-request-id"
NO_REQUEST = "-"
REQUEST_ID: ContextVar[str] = ContextVar("convserve_request_id", default=NO_REQUEST)

# A caller's id is echoed into logs, so only short, plain ids are taken as they are.
_USABLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# Attributes every LogRecord has; anything else was passed with `extra=` and is logged too.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside any RPC)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
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


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Sets `REQUEST_ID` for every RPC (grpc.aio runs the handler in the same context)."""

    def __init__(self) -> None:
        self._prefix = f"{os.getpid():x}-"
        self._counter = itertools.count(1)

    def request_id(self, metadata: Any) -> str:
        """The caller's usable ``x-request-id``, else a new process-unique id."""
        for key, value in metadata or ():
            if key == REQUEST_ID_HEADER and isinstance(value, str) and _USABLE_ID.fullmatch(value):
                return value
        return f"{self._prefix}{next(self._counter):x}"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        REQUEST_ID.set(self.request_id(handler_call_details.invocation_metadata))
        return await continuation(handler_call_details)
