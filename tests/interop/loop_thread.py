"""Run a grpc.aio server on an event loop in a background thread.

The stock Triton and TF Serving clients are blocking, so the server under test
gets its own loop and the tests stay plain synchronous functions.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T], timeout_s: float = 120.0) -> T:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@contextmanager
def running(
    start: Callable[[], Awaitable[Any]], stop: Callable[[Any], Awaitable[None]]
) -> Iterator[Any]:
    """Start a server with `start()` on a loop thread; yield what it returns; `stop` it after."""
    thread = LoopThread()
    try:
        server = thread.run(start())
        try:
            yield server
        finally:
            thread.run(stop(server))
    finally:
        thread.close()


@contextmanager
def serving(settings: Any) -> Iterator[Any]:
    """A real server (`app.start_server(settings)`) on a loop thread; stopped at once after."""
    from convserve.server.app import start_server

    async def stop(server: Any) -> None:
        await server.stop(0)

    with running(lambda: start_server(settings), stop) as server:
        yield server


def large_message_settings(model_base_path: Any, images: int, **overrides: Any) -> Any:
    """Settings of a local test server on free ports taking 96 MiB messages and requests
    of up to `images` images."""
    from convserve.server.settings import Settings

    values: dict[str, Any] = {
        "model_base_path": model_base_path,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "max_message_bytes": 96 << 20,
        "max_images_per_request": images,
        "max_queued_images": images,
    }
    values.update(overrides)
    return Settings(**values)
