"""Small asyncio pieces shared by the async client and its stream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from types import TracebackType
from typing import Self, TypeVar

T = TypeVar("T")


class AsyncClosing:
    """``async with`` support for anything with an awaitable `close()`."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def gather_or_cancel(parts: Sequence[Awaitable[T]]) -> list[T]:
    """The results of `parts` in order; if one fails, the others are cancelled.

    The parts of one split request: once one has failed the call has failed,
    and the other parts' answers would be thrown away.
    """
    futures = [asyncio.ensure_future(part) for part in parts]
    try:
        return list(await asyncio.gather(*futures))
    except BaseException:
        for future in futures:
            future.cancel()
        raise
