"""A test-only engine, added the way the `convserve.server.engines` docstring says.

It computes with numpy what the SavedModel computes (the reference), in float64
then rounded to float32, and counts its calls, so a test can see that the
server's predictions went through it. It declares no capabilities: the batcher
must then run it in threads, never inline and never in worker processes.
"""

from __future__ import annotations

import threading

import numpy as np

from convserve.server.engines import (
    Capabilities,
    Engine,
    EngineContext,
    EngineUnavailable,
    MemoryPlan,
    WorkerOptions,
)


class ToyEngine(Engine):
    name = "toy"
    capabilities = Capabilities()

    def __init__(self, context: EngineContext) -> None:
        super().__init__(context)  # buffers of numpy's own: only the batch's rows count
        self.reference = context.reference
        self._lock = threading.Lock()
        self.calls = 0
        self.threads: set[str] = set()

    def predict(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            self.calls += 1
            self.threads.add(threading.current_thread().name)
        probabilities = self.reference(images).astype(np.float64)
        return (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(np.float32)


# Two worker processes, for engines that run in them.
TWO_WORKERS = WorkerOptions(processes=2, niceness=0, batch_timeout_s=30.0)


def context_for(
    image_shape: tuple[int, int, int],
    classes: int,
    *,
    device: str = "/CPU:0",
    workers: bool = False,
) -> EngineContext:
    """A context for engines that need no SavedModel: uniform probabilities, room for 64
    images a batch."""

    def uniform(images: np.ndarray) -> np.ndarray:
        return np.full((len(images), classes), 1 / classes, np.float32)

    return EngineContext(
        label="toy version 1",
        image_shape=image_shape,
        classes=classes,
        device=device,
        module=None,
        reference=uniform,
        probe=np.zeros((1, *image_shape), np.float32),
        threads=1,
        copies=1,
        plan=lambda row_bytes, fixed_bytes: MemoryPlan(64, 0),
        workers=TWO_WORKERS if workers else None,
    )


# What the tests built, newest last.
BUILT: list[ToyEngine] = []
# Set to make `build` refuse (the registry's fallback must then serve the version).
REFUSE: list[str] = []


def build(context: EngineContext) -> ToyEngine:
    if REFUSE:
        raise EngineUnavailable(REFUSE[0])
    engine = ToyEngine(context)
    BUILT.append(engine)
    return engine
