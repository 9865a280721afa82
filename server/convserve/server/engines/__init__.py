"""Engines: what computes a loaded version's class probabilities.

A version is loaded from its SavedModel (`convserve.server.models.load_model`);
an engine then computes its ``serving_default`` for the batcher. Batching,
dispatch and supervision ask an engine's declared `Capabilities`, never its
name. The engines:

* ``tensorflow`` (`engines.tensorflow`): the SavedModel itself, on the chosen
  device; the GPU path, and selectable on the CPU (``--cpu-engine tensorflow``).
* ``litert`` (`engines.litert`): the SavedModel converted to LiteRT and run
  in-process by XNNPACK, once it computes the same probabilities.
* ``litert`` in worker processes (`engines.litert_workers`, with
  ``--engine-workers process``): the same LiteRT model in a pool of worker
  processes (`convserve.server.workers`), so that no batch waits for the
  server's GIL.

Adding an engine
----------------
1. Write one module with a function ``build(context: EngineContext) -> Engine``.
   Subclass `Engine`: set `name` (its ``engine`` metrics label) and
   `capabilities`, implement `predict` (and `run` if it computes in other
   processes); override `warm_up`, `healthy`, `serve`, `close` and
   `wait_closed` only if it holds more than one object's worth of state.
   Give `Engine.__init__` its buffers' sizes (it sizes the batches to the
   version's memory budget). If it converts the model, compare it with
   `check_parity` first. Raise `EngineUnavailable` when it cannot serve this
   version (the next engine of `fallbacks` serves it, with a warning); let
   ``context.plan``'s ModelLoadError (the version does not fit) pass.
2. Add one line to `ENGINES`: its name (what ``--cpu-engine`` takes), its
   module, the devices it runs on and, if it has one, its worker-process module.

``tests/server/toy_engine.py`` is such a module, served end to end by the tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

log = logging.getLogger(__name__)

# Largest |engine - SavedModel| probability difference a converted model may show.
PARITY_TOLERANCE = 1e-5


class EngineUnavailable(Exception):
    """This engine cannot serve this version; the message says why (another one will)."""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What batching, dispatch and supervision may rely on."""

    # `Engine.run` computes in other processes: batches are awaited on the event loop,
    # one spare batch keeps the processes busy while the loop hands answers back, and
    # the engine's health can change while it serves.
    worker_processes: bool = False
    # A few images cost less than handing them to a thread: small batches of an idle
    # model may run on the event loop (up to --inline-max-images).
    cheap_inline: bool = False


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """How an engine with worker processes runs them (from the server's settings)."""

    processes: int  # worker processes, spares included
    niceness: int
    batch_timeout_s: float  # a batch running longer is taken for hung
    on_worker_exit: Callable[[], None] = lambda: None
    on_health_change: Callable[[bool], None] = lambda healthy: None


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How many images one batch of a version may hold, and the bytes that takes."""

    rows: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class EngineContext:
    """What an engine may use to build itself for one loaded version."""

    label: str  # "<model> version <n>", for log lines
    image_shape: tuple[int, int, int]  # [H,W,C] of serving_default's float32 input
    classes: int  # K of its [N,K] output
    device: str  # the TensorFlow device, e.g. "/CPU:0" or "/GPU:0"
    module: object  # the loaded SavedModel (tf.saved_model.load)
    # The SavedModel's serving_default: float32 [N,H,W,C] -> float32 [N,K] (blocking).
    reference: Callable[[np.ndarray], np.ndarray]
    # Images a converted engine is compared on (`check_parity`), float32 [N,H,W,C].
    probe: np.ndarray
    threads: int  # CPU threads per model call
    copies: int  # concurrent model calls (interpreters, threads) in this process
    # (bytes per image, fixed bytes) of one copy's buffers -> the batch rows that fit the
    # version's memory budget, counting `copies` copies here and one per worker process
    # (if `workers` is set); raises ModelLoadError when not even one image fits.
    plan: Callable[[int, int], MemoryPlan]
    workers: WorkerOptions | None = None  # set when worker processes are wanted


class Engine:
    """Computes one loaded version's probabilities. Subclass it (see the module docstring).

    `predict` blocks: the batcher calls it in a thread (or, with
    `Capabilities.cheap_inline`, on the event loop for a few images). It must
    be thread-safe for `copies` concurrent calls.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(
        self, context: EngineContext, *, row_bytes: int = 0, fixed_bytes: int = 0, copies: int = 1
    ) -> None:
        """Sizes the engine's batches to the version's memory budget (`context.plan`), for
        `copies` copies of `row_bytes` per image and `fixed_bytes` each (0: only the
        batch's input and output rows, for an engine whose buffers are not its own)."""
        plan = context.plan(row_bytes, fixed_bytes)
        self.image_shape = context.image_shape
        self.classes = context.classes
        self.row_bytes = row_bytes
        self.fixed_bytes = fixed_bytes
        self.max_rows = plan.rows  # most images one batch may hold
        self.memory_bytes = plan.bytes  # what its buffers are sized for
        self.copies = copies  # concurrent calls it serves (each warmed up)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 [N,H,W,C] in [0,1] -> probabilities float32 [N,K] (blocking)."""
        raise NotImplementedError

    async def run(self, images: np.ndarray, deadline: float | None) -> np.ndarray:
        """`predict` computed elsewhere, awaited on the event loop (worker processes only).

        `images` may be uint8 (0..255) or float32 (0..1). `deadline` (time.monotonic)
        is when the last caller stops waiting: the engine may give up after it.
        """
        raise NotImplementedError(f"{type(self).__name__} has no worker processes")

    def warm_up(self, sizes: Sequence[int]) -> None:
        """Compute once at each batch size on every copy, so no request pays for a first
        call (blocking). Raises EngineUnavailable naming the size that failed."""
        warm_up(self.predict, self.copies, sizes, self.image_shape, self.classes)

    @property
    def healthy(self) -> bool:
        """Whether it can compute now (worker processes may all be down)."""
        return True

    def serve(self) -> None:
        """The version starts serving (called on the event loop)."""

    def close(self) -> None:
        """Release what it holds; batches still running fail (called on the event loop)."""

    def wait_closed(self, timeout_s: float) -> bool:
        """After `close`: wait for its processes to exit (blocking); False if some did not."""
        return True


def warm_up(
    predict: Callable[[np.ndarray], np.ndarray],
    copies: int,
    sizes: Sequence[int],
    image_shape: tuple[int, ...],
    classes: int,
) -> None:
    """`copies` calls of `predict` at each size (copies served in turn each see every size);
    raises EngineUnavailable naming the size that failed or gave a wrong shape."""
    for size in sizes:
        images = np.zeros((size, *image_shape), np.float32)
        for _ in range(copies):
            try:
                shape = predict(images).shape
            except Exception as exc:
                raise EngineUnavailable(f"warm-up at batch size {size} failed: {exc}") from exc
            if shape != (size, classes):
                raise EngineUnavailable(
                    f"probabilities of shape [{size}, {classes}] expected at batch size "
                    f"{size}, got {list(shape)}"
                )


def check_parity(
    candidate: Callable[[np.ndarray], np.ndarray], context: EngineContext, rows: int
) -> float:
    """The largest |candidate - SavedModel| difference on the context's probe images,
    compared in batches of at most `rows`. Raises EngineUnavailable above
    PARITY_TOLERANCE (or on NaN, or when the candidate fails)."""
    images = context.probe
    rows = max(1, rows)
    try:
        gaps = [
            np.abs(candidate(part) - context.reference(part))
            for part in np.array_split(images, -(-len(images) // rows))
        ]
        # np.max, not max(): a NaN anywhere must fail the comparison below.
        difference = float(np.max(np.concatenate(gaps)))
    except Exception as exc:
        raise EngineUnavailable(f"it failed on the probe images: {exc}") from exc
    if not difference <= PARITY_TOLERANCE:
        raise EngineUnavailable(
            f"it differs from the SavedModel by {difference:.3g} (over {PARITY_TOLERANCE:g})"
        )
    return difference


@dataclasses.dataclass(frozen=True)
class EngineKind:
    """One registered engine: its modules (each with ``build(context)``) and devices."""

    module: str
    devices: frozenset[str] = frozenset({"cpu"})  # device kinds: "cpu", "gpu"
    workers_module: str | None = None  # the same engine in worker processes


# The registry: `--cpu-engine` takes these names.
ENGINES: dict[str, EngineKind] = {
    "litert": EngineKind(
        "convserve.server.engines.litert",
        workers_module="convserve.server.engines.litert_workers",
    ),
    "tensorflow": EngineKind(
        "convserve.server.engines.tensorflow", devices=frozenset({"cpu", "gpu"})
    ),
}
# Serves a version when the chosen engine cannot: the SavedModel itself, on any device.
FALLBACK = "tensorflow"


def device_kind(device: str) -> str:
    """ "gpu" for a TensorFlow GPU device name, else "cpu"."""
    return "gpu" if "GPU" in device.upper() else "cpu"


def fallbacks(name: str, context: EngineContext) -> list[str]:
    """The modules to try, in order, for engine `name` on the context's device: its
    worker-process module (when workers are wanted), its own, then FALLBACK's."""
    kind = ENGINES[name]
    chain: list[str] = []
    if device_kind(context.device) in kind.devices:
        if context.workers is not None and kind.workers_module is not None:
            chain.append(kind.workers_module)
        chain.append(kind.module)
    if ENGINES[FALLBACK].module not in chain:
        chain.append(ENGINES[FALLBACK].module)
    return chain


def build(name: str, context: EngineContext) -> Engine:
    """The first engine of `fallbacks(name, context)` that can serve the version (blocking).

    Each one that cannot is logged with its reason. Raises ValueError for an unknown
    name; ModelLoadError (from `context.plan`) when the version does not fit its memory
    budget; whatever FALLBACK's build raises when even it fails.
    """
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {name!r}")
    chain = fallbacks(name, context)
    if ENGINES[name].module not in chain:
        log.info("%s: TensorFlow computes on %s (%s does not run there)",
                 context.label, context.device, name)  # fmt: skip
    for module in chain[:-1]:
        try:
            return _build_with(module, context)
        except EngineUnavailable as exc:
            log.warning("%s: %s cannot serve it, falling back: %s",
                        context.label, module.rsplit(".", 1)[-1], exc)  # fmt: skip
    return _build_with(chain[-1], context)


def _build_with(module: str, context: EngineContext) -> Engine:
    engine: Engine = importlib.import_module(module).build(context)
    return engine


__all__ = [
    "ENGINES",
    "FALLBACK",
    "PARITY_TOLERANCE",
    "Capabilities",
    "Engine",
    "EngineContext",
    "EngineKind",
    "EngineUnavailable",
    "MemoryPlan",
    "WorkerOptions",
    "build",
    "check_parity",
    "device_kind",
    "fallbacks",
    "warm_up",
]
