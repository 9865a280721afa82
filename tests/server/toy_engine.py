"""A test-only engine, added the way the `convserve.server.engines` docstring says.

It computes with numpy what the SavedModel computes (the reference), in float64
then rounded to float32, and counts its calls, so a test can see that the
server's predictions went through it. It declares no capabilities: the batcher
must then run it in threads, never inline and never in worker processes.
"""

from __future__ import annotations

import threading

import numpy as np

from convserve.server.engines import Capabilities, Engine, EngineContext, EngineUnavailable


class ToyEngine(Engine):
    name = "toy"
    capabilities = Capabilities()

    def __init__(self, context: EngineContext) -> None:
        plan = context.plan(0, 0)
        super().__init__(
            image_shape=context.image_shape,
            classes=context.classes,
            max_rows=plan.rows,
            memory_bytes=plan.bytes,
        )
        self._reference = context.reference
        self._lock = threading.Lock()
        self.calls = 0
        self.threads: set[str] = set()

    def predict(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            self.calls += 1
            self.threads.add(threading.current_thread().name)
        probabilities = self._reference(images).astype(np.float64)
        return (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(np.float32)


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
