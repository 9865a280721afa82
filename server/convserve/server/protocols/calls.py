"""What every servicer method does around its translation, in every protocol:
count the request in the shared metrics and turn errors into statuses with
`errors.status_of` (the one mapping). `Calls.stream` does the same for each
message of a request stream, answering a failed message instead of ending
the stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from importlib import metadata as package_metadata
from typing import Any, TypeVar

import grpc

from convserve.client.tensor import TensorError
from convserve.server import errors, types
from convserve.server.runtime import deadline_of

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M")
_END = object()


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
            code, message = self._failure(rpc, exc)
        finally:
            self.metrics.request_finished(
                self.protocol, rpc, code.name, time.perf_counter() - start
            )
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # abort always raises

    def _failure(self, rpc: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
        code, message = errors.status_of(exc)
        if not isinstance(exc, errors.ServeError | TensorError):
            log.exception("%s %s failed", self.protocol, rpc)
        return code, message

    async def _answer(
        self,
        rpc: str,
        message: M,
        handle: Callable[[M], Awaitable[T]],
        failed: Callable[[M, grpc.StatusCode, str], T],
    ) -> T:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        self.metrics.request_started(self.protocol, rpc)
        try:
            return await handle(message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, text = self._failure(rpc, exc)
            return failed(message, code, text)
        finally:
            self.metrics.request_finished(
                self.protocol, rpc, code.name, time.perf_counter() - start
            )

    async def stream(
        self,
        rpc: str,
        messages: AsyncIterable[M],
        handle: Callable[[M], Awaitable[T]],
        failed: Callable[[M, grpc.StatusCode, str], T],
        max_in_flight: int,
    ) -> AsyncIterator[T]:
        """Answer every message of a request stream, at most `max_in_flight` at a time.

        Each message counts as one request of `rpc` and is handled in its own
        task, so that a stream's messages share batches like concurrent unary
        calls. Its answer is ``handle(message)``, or ``failed(message, code,
        text)`` with the status the unary call would have ended with; either way
        the stream goes on. Answers come in the order they finish. While
        `max_in_flight` messages are unanswered, reading pauses, so a client
        that sends faster than the server answers is held back by HTTP/2 flow
        control instead of queueing without bound. The stream ends once the
        client has closed its side and every message is answered; if the
        stream is cancelled, its unanswered messages are cancelled too.
        """
        answers: asyncio.Queue[Any] = asyncio.Queue()
        slots = asyncio.Semaphore(max_in_flight)
        pending: set[asyncio.Task[None]] = set()

        async def answer(message: M) -> None:
            try:
                answers.put_nowait(await self._answer(rpc, message, handle, failed))
            finally:
                slots.release()

        async def read() -> None:
            iterator = aiter(messages)
            try:
                while True:
                    # A slot first, then a message: at the limit nothing more is read.
                    await slots.acquire()
                    try:
                        message = await anext(iterator)
                    except StopAsyncIteration:
                        break
                    task = asyncio.create_task(answer(message))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                while pending:
                    await asyncio.wait(set(pending))
            finally:
                answers.put_nowait(_END)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not _END:
                yield item
            await reader  # raises what ended the reading, if anything did
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()
