"""The runtime: everything the servicers of every protocol call to get work done.

It owns the model versions (`models.ModelManager`), one dynamic batcher per
loaded version for digit prediction, and a bounded pool for convolution,
kernel fitting and feature maps. TensorFlow work always runs in threads,
never on the event loop.

Deadlines are absolute `time.monotonic()` values (None: no deadline); use
`deadline_of(context)` to get one from a gRPC call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from convserve.server import costs, errors, models, ops, types
from convserve.server import device as device_mod
from convserve.server.batcher import BatchObserver, DynamicBatcher, default_pad_sizes
from convserve.server.engine_process import ProcessEngine, WorkerError
from convserve.server.metrics import Metrics
from convserve.server.settings import Settings
from convserve.server.work import Work, WorkPool

log = logging.getLogger(__name__)
T = TypeVar("T")

PIXELS = 28 * 28
# Convolve requests with kernels up to this size may be merged with same-kernel requests.
MERGE_MAX_KERNEL_ELEMENTS = 4096
# Only requests estimated at one unit of work or less are merged, into calls of at most
# this many estimated seconds: a merged call runs on when its callers leave, so it is
# kept short rather than made cancellable.
MERGED_CALL_S = 4 * costs.UNIT_S
# Convolve inputs up to this size are validated on the event loop, larger ones in a thread.
SMALL_INPUT_ELEMENTS = 1 << 16
# Operations (Convolve, FitKernel, GetFeatureMaps) that may wait for a worker at once.
MAX_WAITING_OPERATIONS = 256
# Estimated CPU seconds that may wait for a worker: this many maximal requests per worker.
WAITING_MAXIMAL_REQUESTS = 4
# Seconds the model worker processes get to exit at shutdown before they are killed.
WORKER_EXIT_S = 2.0
# Bytes of an answer besides its output tensor's values (names, shapes, framing).
RESPONSE_OVERHEAD_BYTES = 64 * 1024
# Estimated CPU seconds of one GetFeatureMaps call (one image through the model's
# convolution layers: a few milliseconds on 2 cores).
FEATURE_MAPS_S = 0.01
_IMAGE_SHAPES = "[N,28,28], [N,28,28,1] or [N,784]"


def settle_heap(*, reclaim: bool) -> None:
    """Collect garbage once, then exempt every surviving object from later collections.

    A loaded TensorFlow model leaves hundreds of thousands of tracked objects,
    and a full collection walks them all with the GIL held (about 0.4 s on a
    small CPU), stalling whichever requests are in flight. Called after a load,
    before the version serves; later collections then see only new objects.
    reclaim=True first puts the frozen objects back, so that the collection
    also frees the versions retired since the last call (one such pause per
    model swap instead of one every few thousand requests).
    """
    if reclaim:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


def deadline_of(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The caller's deadline as an absolute time.monotonic() (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise errors.DeadlineExceeded(f"{what}: the deadline passed before the work started")


def _merge_key(value: types.ConvolveInput) -> tuple[Any, ...] | None:
    """What Convolve requests must share to be merged into one call; None: run alone.

    Only well-formed requests with small kernels are merged (the kernel's
    bytes are part of the key); anything else takes the plain path, where
    `ops.convolve` reports what is wrong.
    """
    x, k, b = value.input, value.kernel, value.bias
    if not isinstance(x, np.ndarray) or not isinstance(k, np.ndarray):
        return None
    if b is not None and not isinstance(b, np.ndarray):
        return None
    if x.ndim not in (2, 4) or k.ndim != x.ndim or x.size == 0:
        return None
    if k.size > MERGE_MAX_KERNEL_ELEMENTS or x.dtype != k.dtype:
        return None
    if b is not None and (b.dtype != x.dtype or b.size > MERGE_MAX_KERNEL_ELEMENTS):
        return None
    item_shape = x.shape if x.ndim == 2 else x.shape[1:]
    bias_key = None if b is None else (b.shape, b.tobytes())
    return (x.ndim, item_shape, x.dtype.str, k.shape, k.tobytes(), bias_key, value.options)


class _SummingObserver:
    """Reports the queue depth summed over several batchers of one operation."""

    def __init__(self, inner: BatchObserver, total: Callable[[], int]) -> None:
        self._inner = inner
        self._total = total

    def on_queue_depth(self, items: int) -> None:
        self._inner.on_queue_depth(self._total())

    def on_batch(
        self, size: int, padded_size: int, queue_waits_s: Sequence[float], run_s: float
    ) -> None:
        self._inner.on_batch(size, padded_size, queue_waits_s, run_s)


class Runtime:
    """Serves the model and the convolution operations for every protocol."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model_name = settings.model_name
        self.device = "/CPU:0"
        self._closing = False
        self._started = False
        self._manager: models.ModelManager | None = None
        self._batchers: dict[int, DynamicBatcher] = {}
        self._closing_batchers: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        slots = max(1, settings.max_concurrent_batches)
        # Inputs of waiting operations held in memory: a few maximal requests' worth.
        self._max_waiting_elements = 4 * settings.max_conv_elements
        # Convolve, FitKernel and GetFeatureMaps compute in these threads.
        self._work = WorkPool(
            slots=slots,
            max_waiting=MAX_WAITING_OPERATIONS,
            max_waiting_elements=self._max_waiting_elements,
            max_waiting_s=WAITING_MAXIMAL_REQUESTS * slots * settings.max_request_cpu_s,
            observer=metrics,
        )
        self._predict_observer = _SummingObserver(
            metrics.batch_observer("Predict"), self._predict_queued
        )
        self._convolve_observer = _SummingObserver(
            metrics.batch_observer("Convolve"),
            lambda: sum(b.queued_items for b, _ in self._conv_batchers.values()),
        )
        # Convolve requests that can share a model call (same kernel, bias, options and
        # item shape) go through one batcher per such group: [batcher, requests using it].
        self._conv_batchers: dict[tuple[Any, ...], tuple[DynamicBatcher, list[int]]] = {}
        self._conv_pending_elements = 0
        self._observers = {
            rpc: metrics.batch_observer(rpc) for rpc in ("Convolve", "FitKernel", "GetFeatureMaps")
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        # A version was released since the heap was last frozen (see settle_heap).
        self._retired_since_freeze = False
        self._ready_listeners: list[Callable[[bool], None]] = []

    # -- lifecycle ------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """A version is serving, has a usable engine, and the runtime is not shutting down."""
        if self._closing or self._manager is None:
            return False
        serving = self._manager.serving
        if serving is None:
            return False
        workers: ProcessEngine | None = serving.workers
        return workers is None or workers.healthy

    def add_ready_listener(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(ready)` on the event loop whenever `ready` may have changed
        after start-up (e.g. every model worker died or hung, or they are back)."""
        self._ready_listeners.append(listener)

    def _notify_ready(self) -> None:
        ready = self.ready
        for listener in self._ready_listeners:
            try:
                listener(ready)
            except Exception:
                log.exception("a readiness listener failed")

    @property
    def manager(self) -> models.ModelManager:
        if self._manager is None:
            raise errors.Unavailable(f"model {self.model_name!r} is not loaded yet")
        return self._manager

    async def start(self) -> None:
        """Choose the device, load and warm up the newest loadable version, start polling.

        Raises errors.Unavailable when no version under the base path loads.
        """
        self._loop = asyncio.get_running_loop()
        try:
            choice = await asyncio.to_thread(device_mod.configure_device, self.settings.device)
        except ValueError as exc:
            raise errors.Unavailable(str(exc)) from exc
        self.device = choice.name
        self._manager = models.ModelManager(
            self.settings.model_base_path,
            self.model_name,
            self.device,
            on_loaded=self.metrics.model_loaded,
            on_serving=self._on_serving,
            loader=self._load,
        )
        await self._manager.poll_once()
        if self._manager.serving is None:
            found = models.discover_versions(self.settings.model_base_path)
            raise errors.Unavailable(
                f"no loadable version of model {self.model_name!r} under "
                f"{self.settings.model_base_path} (versions found: {found or 'none'})"
            )
        self._started = True
        if self.settings.poll_interval_s > 0:
            self._poller = asyncio.create_task(self._poll_forever(), name="model-poller")

    def _load(self, name: str, version: int, path: Path, device: str) -> models.LoadedModel:
        """`models.load_model` with the server's settings, then `settle_heap` (blocking)."""
        model = models.load_model(
            name,
            version,
            path,
            device,
            warm_batch_sizes=default_pad_sizes(self.settings.max_batch_size),
            engine=self.settings.cpu_engine,
            engine_threads=self.settings.engine_threads_per_call,
            engine_copies=self.settings.max_concurrent_batches,
        )
        if model.litert is not None and self.settings.engine_workers == "process":
            model.workers = self._start_workers(model)
        settle_heap(reclaim=self._retired_since_freeze)
        self._retired_since_freeze = False
        return model

    def _start_workers(self, model: models.LoadedModel) -> ProcessEngine | None:
        """The version's LiteRT model in worker processes, warmed up at every padded size.

        None (the version is served in-process, with a warning) if they fail.
        """
        assert model.litert is not None
        engine: ProcessEngine | None = None
        try:
            engine = ProcessEngine(
                model.litert.flatbuffer,
                threads=self.settings.engine_threads_per_call,
                workers=self.settings.max_concurrent_batches,
                name=f"{model.name} v{model.version}",
                niceness=self.settings.engine_nice,
                on_worker_exit=lambda: self.metrics.worker_exited(model.name),
                batch_timeout_s=self.settings.engine_batch_timeout_s,
                on_health_change=lambda healthy: self._on_workers_health(model, healthy),
            )
            for size in default_pad_sizes(self.settings.max_batch_size):
                images = np.zeros((size, 28, 28, 1), np.float32)
                for _ in range(engine.workers):  # round robin: every worker sees each size
                    if engine(images).shape != (size, 10):
                        raise WorkerError(f"wrong output shape at batch size {size}")
        except Exception as exc:
            if engine is not None:
                engine.close()
            log.warning("%s version %d: model worker processes failed, the server process "
                        "computes predictions: %s", model.name, model.version, exc)  # fmt: skip
            return None
        log.info("%s version %d: %d worker processes (pids %s) compute predictions",
                 model.name, model.version, engine.workers, engine.pids)  # fmt: skip
        return engine

    async def poll_once(self) -> int | None:
        """Look for a new version now; returns the version swapped in, if any."""
        return await self.manager.poll_once()

    async def _poll_forever(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.manager.poll_once()
            except Exception:
                log.exception("polling %s failed", self.settings.model_base_path)
            self.metrics.update_device_memory(self.device)

    async def stop(self, grace_s: float) -> bool:
        """Refuse new work, let accepted work finish within `grace_s`, release the models.

        Operations still computing then are stopped at their next unit of
        work; returns False if any of them had not stopped a unit later
        (their threads are abandoned).
        """
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        batchers = list(self._batchers.values())
        batchers += [b for b, _ in self._conv_batchers.values()]
        self._conv_batchers.clear()
        closing: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(b.close(drain=True)) for b in batchers
        ]
        closing += list(self._closing_batchers)
        deadline = time.monotonic() + max(0.0, grace_s)
        if closing:
            _, pending = await asyncio.wait(closing, timeout=max(0.0, grace_s))
            if pending:
                log.warning("%d batcher(s) did not drain within %.1f s", len(pending), grace_s)
                # Batches still in model workers (e.g. a hung one) fail now: the workers go.
                if self._manager is not None:
                    for model in self._manager.loaded:
                        if model.workers is not None:
                            model.workers.close()
                closing = [asyncio.ensure_future(b.close(drain=False)) for b in batchers]
                await asyncio.wait(closing, timeout=costs.MIN_OVERRUN_S)
        # Operations still computing after the grace period are stopped at their next unit.
        stopped = await self._work.close(deadline - time.monotonic())
        if not stopped:
            log.warning("%d operation(s) did not stop in time; abandoned", self._work.running)
        # Batchers are closed above; releasing the models must not schedule more closes.
        self._batchers.clear()
        engines: list[ProcessEngine] = []
        if self._manager is not None:
            engines = [m.workers for m in self._manager.loaded if m.workers is not None]
            self._manager.release_all()
        # No worker process outlives the server, stopped (SIGSTOP) or not: stragglers
        # are killed by wait_closed.
        for engine in engines:
            engine.close()
        exited = await asyncio.gather(
            *(asyncio.to_thread(engine.wait_closed, WORKER_EXIT_S) for engine in engines)
        )
        for engine, done in zip(engines, exited, strict=True):
            if not done:
                log.warning("%s: worker processes did not exit", engine.name)
        return stopped

    def _on_serving(self, model: models.LoadedModel, loaded: int) -> None:
        model.on_release = self._release
        workers: ProcessEngine | None = model.workers
        if workers is not None:
            workers.serve()
        self._batchers[model.version] = DynamicBatcher(
            model.predict,
            name=f"{model.name} v{model.version}",
            max_batch_size=self.settings.max_batch_size,
            batch_timeout_s=self.settings.batch_timeout_s,
            max_queued_items=self.settings.max_queued_images,
            max_concurrent_batches=self.settings.max_concurrent_batches,
            observer=self._predict_observer,
            prepare=self._as_float,
            # LiteRT answers a few images in about 0.1 ms: less than a trip to a worker.
            inline_max_rows=self.settings.inline_max_images if model.engine == "litert" else 0,
            run_batch_async=workers.run if workers is not None else None,
        )
        self.metrics.serving(model.name, model.version, model.device, model.engine, loaded)
        self.metrics.update_device_memory(model.device)
        if self._started:
            self._notify_ready()

    def _on_workers_health(self, model: models.LoadedModel, healthy: bool) -> None:
        state = "usable again" if healthy else "all unusable (dead or hung); being replaced"
        level = logging.INFO if healthy else logging.WARNING
        log.log(level, "%s version %d: model workers %s", model.name, model.version, state)
        if self._manager is not None and self._manager.serving is model:
            self._notify_ready()

    def _release(self, model: models.LoadedModel) -> None:
        """The version is retired and no request holds it: close its batcher, drop it."""
        self._retired_since_freeze = True
        workers: ProcessEngine | None = model.workers
        if workers is not None:
            # The workers' sockets are read by the event loop: close them there.
            if self._loop is None or self._on_loop_thread():
                workers.close()
            else:
                self._loop.call_soon_threadsafe(workers.close)
        batcher = self._batchers.pop(model.version, None)
        if batcher is None:
            return
        loop = self._loop
        if loop is None:
            return

        def close() -> None:
            task = loop.create_task(batcher.close(drain=True))
            self._closing_batchers.add(task)
            task.add_done_callback(self._closing_batchers.discard)

        # Leases end on the event loop; the callback also works from another thread.
        loop.call_soon_threadsafe(close)
        log.info("%s version %d released", model.name, model.version)

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _predict_queued(self) -> int:
        return sum(b.queued_items for b in self._batchers.values())

    def _check_open(self) -> None:
        if self._closing:
            raise errors.Unavailable("the server is shutting down")
        if not self._started:
            raise errors.Unavailable(f"model {self.model_name!r} is not loaded yet")

    # -- input checks ---------------------------------------------------------

    def check_images(self, images: np.ndarray, field: str = "images") -> np.ndarray:
        """Check digit images as decoded from any protocol; returns them as [N,28,28,1].

        Accepts uint8 (0..255) or float32 in [0, 1], shaped [N,28,28],
        [N,28,28,1] or [N,784], 1 <= N <= max_images_per_request. Raises
        errors.InvalidArgument naming `field` otherwise.
        """
        if not isinstance(images, np.ndarray):
            raise errors.InvalidArgument(field, f"a tensor {_IMAGE_SHAPES} expected")
        if images.dtype not in (np.dtype(np.uint8), np.dtype(np.float32)):
            raise errors.InvalidArgument(
                field, f"dtype uint8 (0..255) or float32 (0..1) expected, got {images.dtype}"
            )
        shape = images.shape
        if not (
            (len(shape) == 3 and shape[1:] == (28, 28))
            or (len(shape) == 4 and shape[1:] == (28, 28, 1))
            or (len(shape) == 2 and shape[1:] == (PIXELS,))
        ):
            raise errors.InvalidArgument(
                field, f"shape {_IMAGE_SHAPES} expected, got {list(shape)}"
            )
        n = shape[0]
        if n == 0:
            raise errors.InvalidArgument(field, "at least one image expected, got N=0")
        limit = self.settings.max_images_per_request
        if n > limit:
            raise errors.InvalidArgument(
                field,
                f"at most {limit} images per request expected (the server's "
                f"max_images_per_request), got {n}",
            )
        if images.dtype == np.float32:
            if not np.all(np.isfinite(images)):
                raise errors.InvalidArgument(
                    field, "finite float32 pixels expected, got NaN or Inf"
                )
            low, high = float(images.min()), float(images.max())
            if low < 0.0 or high > 1.0:
                raise errors.InvalidArgument(
                    field,
                    f"float32 pixels in [0, 1] expected, got values in [{low:g}, {high:g}] "
                    "(send uint8 for 0..255)",
                )
        return np.ascontiguousarray(images.reshape(n, 28, 28, 1))

    @staticmethod
    def _as_float(images: np.ndarray) -> np.ndarray:
        """uint8 0..255 -> float32 0..1 (the model's input); float32 passes through."""
        if images.dtype == np.uint8:
            # One table lookup: the same float32 values as x / 255, in one pass.
            return _UINT8_TO_UNIT.take(images)
        return np.asarray(images, dtype=np.float32)

    # -- operations -----------------------------------------------------------

    async def predict(
        self, value: types.PredictInput, *, deadline: float | None, protocol: str = "convserve"
    ) -> types.PredictOutput:
        """Digit probabilities for `value.images`, batched with concurrent requests.

        Raises errors.NotFound (pinned version not loaded), ResourceExhausted
        (queue full), DeadlineExceeded, Unavailable (shutting down).
        """
        self._check_open()
        # uint8 stays uint8 until the batcher's thread converts it (`_as_float`).
        images = self.check_images(value.images, "images")
        _check_deadline(deadline, "Predict")
        n = int(images.shape[0])
        queued = self._predict_queued()
        if queued + n > self.settings.max_queued_images:
            raise errors.ResourceExhausted(
                f"Predict: the queue is full ({queued} of {self.settings.max_queued_images} "
                f"images queued, this request has {n}); retry later"
            )
        with self.manager.lease(value.model) as model:
            batcher = self._batchers.get(model.version)
            if batcher is None:
                raise errors.Unavailable("the server is shutting down")
            probabilities = await batcher.submit(images, deadline=deadline)
        return types.PredictOutput(
            model_name=model.name, model_version=model.version, probabilities=probabilities
        )

    async def _run_op(
        self,
        rpc: str,
        deadline: float | None,
        rows: int,
        elements: int,
        estimate_s: float,
        fn: Callable[[Work], T],
        *,
        observe: bool = True,
    ) -> T:
        """Run a blocking operation in the work pool (see `work.WorkPool`).

        `estimate_s` is the operation's estimated CPU seconds: it counts
        against the waiting-work bound and sets when the work is stopped as
        an overrun. `fn` gets the `Work` ticket and calls `work.check()`
        between its units of work.
        """
        self._check_open()
        _check_deadline(deadline, rpc)
        # A request over the element limit is refused by ops with a clear message; count
        # it as the limit here so that it reaches that check.
        elements = min(elements, self.settings.max_conv_elements)
        enqueued = time.monotonic()
        started: list[float] = []

        def run(work: Work) -> T:
            started.append(time.monotonic())
            return fn(work)

        work = Work(rpc, estimate_s, deadline)
        result = await self._work.run(work, elements, run)
        if observe:
            begun = started[0] if started else enqueued
            self._observers[rpc].on_batch(rows, rows, [begun - enqueued], time.monotonic() - begun)
        return result

    async def _validated_plan(self, value: types.ConvolveInput) -> ops.ConvPlan:
        """`ops.validate_convolve` against the server's limits; in a thread for large inputs
        (its NaN/Inf scan is proportional to the input)."""
        x = value.input
        size = int(x.size) if isinstance(x, np.ndarray) else 0
        if size > SMALL_INPUT_ELEMENTS:
            return await asyncio.to_thread(self._validate_convolve, value)
        return self._validate_convolve(value)

    async def convolve(
        self, value: types.ConvolveInput, *, deadline: float | None
    ) -> types.ConvolveOutput:
        """2-D convolution on the serving device (see `ops.convolve`).

        Refused (INVALID_ARGUMENT) when estimated above max_request_cpu_s.
        Concurrent cheap requests (at most one unit of work each) with the
        same kernel, bias, options and item shape are merged along N into
        one call (each gets exactly its own result); others run on their
        own, in tiles that stop once the caller has gone. Either way at most
        max_concurrent_batches operations compute at once.
        """
        self._check_open()
        _check_deadline(deadline, "Convolve")
        plan = await self._validated_plan(value)
        estimate_s = ops.convolve_cost_s(plan)
        key = _merge_key(value) if estimate_s <= costs.UNIT_S else None
        if key is None:
            return await self._convolve_alone(value, deadline, plan, estimate_s)
        return await self._convolve_merged(key, value, deadline, plan, estimate_s)

    async def _convolve_alone(
        self,
        value: types.ConvolveInput,
        deadline: float | None,
        plan: ops.ConvPlan,
        estimate_s: float,
    ) -> types.ConvolveOutput:
        settings = self.settings
        return await self._run_op(
            "Convolve",
            deadline,
            plan.n,
            int(value.input.size),
            estimate_s,
            lambda work: ops.convolve(
                value,
                device=self.device,
                max_elements=settings.max_conv_elements,
                max_kernel_elements=settings.max_kernel_elements,
                max_cpu_s=settings.max_request_cpu_s,
                check=work.check,
            ),
        )

    async def _convolve_merged(
        self,
        key: tuple[Any, ...],
        value: types.ConvolveInput,
        deadline: float | None,
        plan: ops.ConvPlan,
        estimate_s: float,
    ) -> types.ConvolveOutput:
        x = value.input
        size = int(x.size)
        # Inputs held by queued or running merged calls: a few maximal requests' worth.
        pending = self._conv_pending_elements
        if pending > 0 and pending + size > self._max_waiting_elements:
            raise errors.ResourceExhausted(
                f"Convolve: {pending} input elements are queued or computing "
                f"(at most {self._max_waiting_elements}); retry later"
            )
        items = x if x.ndim == 4 else x[None, :, :, None]
        entry = self._conv_batchers.get(key)
        if entry is None:
            item_s = estimate_s / max(1, plan.n)
            entry = (self._new_conv_batcher(value, items, item_s), [0])
            self._conv_batchers[key] = entry
        batcher, users = entry
        users[0] += 1
        self._conv_pending_elements += size
        try:
            out = await batcher.submit(items, deadline=deadline)
        finally:
            self._conv_pending_elements -= size
            users[0] -= 1
            if users[0] == 0 and self._conv_batchers.get(key) is entry:
                del self._conv_batchers[key]
                task = asyncio.get_running_loop().create_task(batcher.close(drain=True))
                self._closing_batchers.add(task)
                task.add_done_callback(self._closing_batchers.discard)
        return types.ConvolveOutput(output=out if x.ndim == 4 else out[0, :, :, 0])

    def _validate_convolve(self, value: types.ConvolveInput) -> ops.ConvPlan:
        plan = ops.validate_convolve(
            value,
            max_elements=self.settings.max_conv_elements,
            max_kernel_elements=self.settings.max_kernel_elements,
            max_cpu_s=self.settings.max_request_cpu_s,
        )
        # An answer larger than a gRPC message could never be sent: refuse before computing.
        out_bytes = math.prod(plan.output_shape) * value.input.dtype.itemsize
        limit = self.settings.max_message_bytes - RESPONSE_OVERHEAD_BYTES
        if out_bytes > limit:
            raise errors.InvalidArgument(
                "input",
                f"an output of at most {limit} bytes expected (the server's max_message_bytes "
                f"less {RESPONSE_OVERHEAD_BYTES} for the rest of the answer), this request "
                f"would produce {out_bytes}",
            )
        return plan

    def _new_conv_batcher(
        self, value: types.ConvolveInput, items: np.ndarray, item_s: float
    ) -> DynamicBatcher:
        """A batcher computing `value`'s kernel, bias and options on [B,H,W,C] batches.

        Its calls go through the work pool like every other operation, so
        they count against the same slots and waiting-work bounds.
        """
        settings = self.settings
        kernel = value.kernel if value.kernel.ndim == 4 else value.kernel[:, :, None, None]
        bias = None if value.bias is None else np.reshape(value.bias, (-1,))
        options = value.options
        device = self.device

        def compute(batch: np.ndarray, work: Work | None = None) -> np.ndarray:
            n = int(batch.shape[0])
            # Each request was checked against the limits; the merged call holds n items.
            result = ops.convolve(
                types.ConvolveInput(batch, kernel, bias, options),
                device=device,
                max_elements=settings.max_conv_elements * n,
                max_kernel_elements=settings.max_kernel_elements,
                max_cpu_s=float("inf"),
                check=None if work is None else work.check,
                # One call, as each request alone would run: merged results stay exact.
                unit_s=float("inf"),
            )
            return result.output

        async def run(batch: np.ndarray, deadline: float | None = None) -> np.ndarray:
            n = int(batch.shape[0])
            return await self._run_op(
                "Convolve",
                deadline,
                n,
                int(batch.size),
                item_s * n,
                lambda work: compute(batch, work),
                observe=False,  # the batcher reports merged calls itself
            )

        # One merged call holds at most max_conv_elements input values and about
        # MERGED_CALL_S estimated seconds.
        item_elements = max(1, int(np.prod(items.shape[1:])))
        max_rows = min(
            settings.max_batch_size,
            settings.max_conv_elements // item_elements,
            int(MERGED_CALL_S / max(item_s, 1e-9)),
        )
        max_rows = max(1, max_rows)
        return DynamicBatcher(
            compute,
            name="Convolve",
            max_batch_size=max_rows,
            batch_timeout_s=settings.batch_timeout_s,
            max_queued_items=max(max_rows, settings.max_queued_images),
            max_concurrent_batches=settings.max_concurrent_batches,
            # No padding: eager convolutions do not retrace, padded rows would be wasted work.
            pad_sizes=range(1, max_rows + 1),
            observer=self._convolve_observer,
            run_batch_async=run,
        )

    async def fit_kernel(
        self, value: types.FitKernelInput, *, deadline: float | None
    ) -> types.FitKernelOutput:
        """Fit a kernel by gradient descent within max_fit_steps and the time budget.

        The budget is fit_time_budget_s, capped by max_request_cpu_s and by
        the caller's deadline; the fit is admitted at its estimated cost
        (`ops.FitPlan.cost_s`), each gradient step at most `ops.FIT_MAX_STEP_S`.
        """
        self._check_open()
        _check_deadline(deadline, "FitKernel")
        settings = self.settings
        budget = min(settings.fit_time_budget_s, settings.max_request_cpu_s)
        if deadline is not None:
            # Leave time to send the answer back before the caller gives up.
            budget = min(budget, max(0.0, (deadline - time.monotonic()) * 0.9))
        x = value.inputs
        size = int(x.size) * 2 if isinstance(x, np.ndarray) else 0  # inputs and targets

        def validate() -> ops.FitPlan:
            return ops.validate_fit(
                value,
                max_steps=settings.max_fit_steps,
                max_elements=settings.max_conv_elements,
                max_kernel_elements=settings.max_kernel_elements,
            )

        # Its NaN/Inf scan is proportional to the input: large ones are checked in a thread.
        fit = await asyncio.to_thread(validate) if size > SMALL_INPUT_ELEMENTS else validate()
        return await self._run_op(
            "FitKernel",
            deadline,
            fit.plan.n,
            size,
            fit.cost_s(budget),
            lambda work: ops.fit_kernel(
                value,
                device=self.device,
                max_steps=settings.max_fit_steps,
                time_budget_s=budget,
                max_elements=settings.max_conv_elements,
                max_kernel_elements=settings.max_kernel_elements,
                check=work.check,
            ),
        )

    async def feature_maps(
        self, value: types.FeatureMapsInput, *, deadline: float | None
    ) -> types.FeatureMapsOutput:
        """The convolution layers' activations for one image ([H,W,F] per layer)."""
        self._check_open()
        image = self._as_float(self.check_images(value.image, "image"))
        if image.shape[0] != 1:
            raise errors.InvalidArgument("image", f"one image expected, got {image.shape[0]}")
        with self.manager.lease(value.model) as model:
            available = model.feature_map_layers
            wanted = tuple(value.layers) or available
            unknown = [name for name in wanted if name not in available]
            if unknown:
                raise errors.InvalidArgument(
                    "layers",
                    f"layer names from {list(available)} expected, "
                    f"got unknown {errors.shown(unknown)}",
                )
            maps = await self._run_op(
                "GetFeatureMaps",
                deadline,
                1,
                PIXELS,
                FEATURE_MAPS_S,
                lambda work: model.feature_maps(image),
            )
        return types.FeatureMapsOutput(
            model_name=model.name,
            model_version=model.version,
            maps=[(name, np.asarray(maps[name][0], dtype=np.float32)) for name in wanted],
        )

    def metadata(self, ref: types.ModelRef) -> types.ModelMetadata:
        """The model's inputs, outputs, layer table and training record.

        Raises errors.NotFound for another model name or a version not loaded.
        """
        manager = self.manager
        model = manager.resolve(ref)
        meta = model.metadata(manager.loaded_versions)
        serving = manager.serving
        if serving is not None and serving is not model:
            # A pinned version describes itself; serving_version still names the default.
            meta = dataclasses.replace(meta, serving_version=serving.version)
        return meta
