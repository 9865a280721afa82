"""The SavedModel itself computes: TensorFlow on the version's device (GPU or CPU).

The GPU path: on a GPU device every version is served by this engine. On the
CPU it is what ``--cpu-engine tensorflow`` selects, and what serves a version
another engine cannot. TensorFlow runs concurrent calls itself, so one copy
serves every batch thread.
"""

from __future__ import annotations

import numpy as np

from convserve.server.engines import Capabilities, Engine, EngineContext


class TensorFlowEngine(Engine):
    """serving_default of the loaded SavedModel, called through TensorFlow."""

    name = "tensorflow"
    capabilities = Capabilities()

    def __init__(self, context: EngineContext) -> None:
        # TensorFlow's own buffers are not ours to size: only the batch's input and output.
        super().__init__(context)
        self._reference = context.reference

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self._reference(images)


def build(context: EngineContext) -> TensorFlowEngine:
    return TensorFlowEngine(context)
