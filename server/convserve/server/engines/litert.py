"""serving_default converted to LiteRT, run in-process by its XNNPACK CPU kernels.

For a network this small TensorFlow's per-call overhead dominates on the CPU
(about 1 ms for one image); the converted graph computes the same
probabilities (checked at load, `check_parity`) in a tenth of that. An
interpreter serves one call at a time, so the engine keeps a pool of `copies`
interpreters and a call waits for a free one.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from typing import Any

import numpy as np

from convserve.server.engines import (
    Capabilities,
    Engine,
    EngineContext,
    EngineUnavailable,
    check_parity,
)

log = logging.getLogger(__name__)

SERVING_SIGNATURE = "serving_default"


class LiteRtEngine(Engine):
    """A pool of `copies` LiteRT interpreters of `threads` threads each (thread-safe)."""

    name = "litert"
    capabilities = Capabilities(cheap_inline=True)

    def __init__(
        self, context: EngineContext, flatbuffer: bytes, *, row_bytes: int, fixed_bytes: int
    ) -> None:
        """`flatbuffer` whose tensors take `row_bytes` per image and `fixed_bytes` (see
        `tensor_bytes`). Raises EngineUnavailable when LiteRT cannot run it."""
        from ai_edge_litert.interpreter import Interpreter

        super().__init__(
            context, row_bytes=row_bytes, fixed_bytes=fixed_bytes, copies=context.copies
        )
        self.threads = context.threads
        self.flatbuffer = flatbuffer
        self._free: queue.SimpleQueue[_Interpreter] = queue.SimpleQueue()
        for _ in range(self.copies):
            try:
                interpreter = Interpreter(model_content=flatbuffer, num_threads=self.threads)
            except Exception as exc:
                raise EngineUnavailable(f"LiteRT cannot run the converted model: {exc}") from exc
            signature = interpreter.get_signature_list().get(SERVING_SIGNATURE)
            inputs = interpreter.get_input_details()
            outputs = interpreter.get_output_details()
            if signature is None or len(inputs) != 1 or len(outputs) != 1:
                raise EngineUnavailable(
                    f"the converted model has signatures {interpreter.get_signature_list()}, "
                    f"{len(inputs)} inputs and {len(outputs)} outputs; one serving_default "
                    "with one input and one output expected"
                )
            self._free.put(_Interpreter(interpreter, inputs[0]["index"], outputs[0]["index"]))

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        slot = self._free.get()
        try:
            return slot.run(images)
        finally:
            self._free.put(slot)


@dataclass(eq=False)
class _Interpreter:
    interpreter: Any
    input_index: int
    output_index: int
    shape: tuple[int, ...] = ()

    def run(self, images: np.ndarray) -> np.ndarray:
        if images.shape != self.shape:
            # Re-planning for another batch size takes microseconds, and the batcher
            # pads to a few sizes.
            self.interpreter.resize_tensor_input(self.input_index, images.shape, strict=True)
            self.interpreter.allocate_tensors()
            self.shape = images.shape
        self.interpreter.set_tensor(self.input_index, images)
        self.interpreter.invoke()
        return np.asarray(self.interpreter.get_tensor(self.output_index))


def convert(module: Any) -> bytes:
    """The serving_default signature of a loaded SavedModel as a LiteRT flatbuffer."""
    import tensorflow as tf

    fn = module.signatures[SERVING_SIGNATURE]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], module)
    return bytes(converter.convert())


def tensor_bytes(flatbuffer: bytes, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(bytes per image, fixed bytes) of a LiteRT model's tensors (blocking).

    Every tensor counts, as if none shared memory: an upper bound of what an
    interpreter allocates. Measured at batch sizes 1 and 2.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # Without the default XNNPACK delegate: the tensors it takes over keep their batch-1
    # shapes in the interpreter's view after a resize, and would go uncounted.
    interpreter = Interpreter(
        model_content=flatbuffer,
        num_threads=1,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    index = interpreter.get_input_details()[0]["index"]
    totals = []
    for rows in (1, 2):
        interpreter.resize_tensor_input(index, (rows, *image_shape), strict=True)
        interpreter.allocate_tensors()
        totals.append(
            sum(
                int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize
                for d in interpreter.get_tensor_details()
            )
        )
    per_row = max(0, totals[1] - totals[0])
    return per_row, max(0, totals[0] - per_row)


def build(context: EngineContext) -> LiteRtEngine:
    """Convert, size, compare with the SavedModel (blocking).

    Raises EngineUnavailable if the conversion fails or the results differ.
    """
    try:
        flatbuffer = convert(context.module)
        row_bytes, fixed_bytes = tensor_bytes(flatbuffer, context.image_shape)
    except Exception as exc:
        raise EngineUnavailable(f"the LiteRT conversion failed: {exc}") from exc
    # context.plan's ModelLoadError (the version does not fit its budget) passes.
    engine = LiteRtEngine(context, flatbuffer, row_bytes=row_bytes, fixed_bytes=fixed_bytes)
    difference = check_parity(engine.predict, context, engine.max_rows)
    log.info("%s: LiteRT computes predictions (%d x %d threads; max difference from the "
             "SavedModel %.2g)", context.label, engine.copies, engine.threads,
             difference)  # fmt: skip
    return engine
