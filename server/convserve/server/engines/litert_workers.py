"""The LiteRT engine in worker processes (`convserve.server.workers.pool.WorkerPool`).

The converted model runs in ``processes`` child processes, each with its own
interpreter and GIL: the event loop hands a batch to an idle one and awaits
the answer like any other I/O (`run`), so under load no batch waits for the
server's GIL. A few images for an idle model still run in-process (`predict`,
the in-process LiteRT engine's interpreters): a trip to a worker costs more.
Worker processes that die or hang are replaced; `healthy` is False while none
is usable.
"""

from __future__ import annotations

import logging

import numpy as np

from convserve.server.batcher import default_pad_sizes
from convserve.server.engines import (
    Capabilities,
    Engine,
    EngineContext,
    EngineUnavailable,
    WorkerOptions,
    litert,
    warm_up,
)
from convserve.server.workers.pool import WorkerPool

log = logging.getLogger(__name__)


class LiteRtWorkersEngine(Engine):
    """In-process LiteRT for `predict`, worker processes for `run`."""

    name = "litert"
    capabilities = Capabilities(worker_processes=True, cheap_inline=True)

    def __init__(
        self, context: EngineContext, local: litert.LiteRtEngine, pool: WorkerPool
    ) -> None:
        super().__init__(
            context, row_bytes=local.row_bytes, fixed_bytes=local.fixed_bytes, copies=local.copies
        )
        self.local = local
        self.pool = pool

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.local.predict(images)

    async def run(self, images: np.ndarray, deadline: float | None) -> np.ndarray:
        return await self.pool.run(images, deadline)

    @property
    def healthy(self) -> bool:
        return self.pool.healthy

    def serve(self) -> None:
        self.pool.serve()

    def close(self) -> None:
        self.pool.close()

    def wait_closed(self, timeout_s: float) -> bool:
        return self.pool.wait_closed(timeout_s)


def build(context: EngineContext) -> LiteRtWorkersEngine:
    """The in-process engine, then its worker processes, warmed up at every padded size.

    Raises EngineUnavailable if either fails (the in-process engine then serves alone).
    """
    options: WorkerOptions | None = context.workers
    if options is None:
        raise EngineUnavailable("no worker processes were asked for")
    local = litert.build(context)
    pool: WorkerPool | None = None
    try:
        pool = WorkerPool(
            local.flatbuffer,
            image_shape=context.image_shape,
            classes=context.classes,
            threads=context.threads,
            workers=options.processes,
            name=context.label,
            niceness=options.niceness,
            on_worker_exit=options.on_worker_exit,
            batch_timeout_s=options.batch_timeout_s,
            on_health_change=options.on_health_change,
            max_rows=local.max_rows,
        )
        # Round robin: `workers` calls in a row give every worker each size.
        warm_up(pool, pool.workers, default_pad_sizes(local.max_rows), context.image_shape,
                context.classes)  # fmt: skip
    except Exception as exc:
        if pool is not None:
            pool.close()
        raise EngineUnavailable(f"its worker processes failed: {exc}") from exc
    log.info("%s: %d worker processes (pids %s) compute predictions",
             context.label, pool.workers, pool.pids)  # fmt: skip
    return LiteRtWorkersEngine(context, local, pool)
