"""What every servicer method of the other protocols does around its translation:
count the request in the shared metrics and turn errors into statuses with
`errors.status_of` (the one mapping), exactly as convserve.v1 does."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import metadata as package_metadata
from typing import Any, TypeVar

import grpc

from convserve.client.tensor import TensorError
from convserve.server import errors, types
from convserve.server.runtime import deadline_of

log = logging.getLogger(__name__)
T = TypeVar("T")


def server_version() -> str:
    """The installed convserve version (``unknown`` when run from a bare checkout)."""
    try:
        return package_metadata.version("convserve")
    except package_metadata.PackageNotFoundError:
        return "unknown"


class Calls:
    """Runs the servicer methods of one protocol."""

    def __init__(self, protocol: types.Protocol, metrics: Any) -> None:
        self.protocol = protocol
        self.metrics = metrics

    @staticmethod
    def deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
        """The caller's deadline as the runtime takes it (`runtime.deadline_of`)."""
        return deadline_of(context)

    async def run(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext[Any, Any],
        handler: Callable[[], Awaitable[T]],
    ) -> T:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        message = ""
        self.metrics.request_started(self.protocol, rpc)
        try:
            return await handler()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = errors.status_of(exc)
            if not isinstance(exc, errors.ServeError | TensorError):
                log.exception("%s %s failed", self.protocol, rpc)
        finally:
            self.metrics.request_finished(
                self.protocol, rpc, code.name, time.perf_counter() - start
            )
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # abort always raises
