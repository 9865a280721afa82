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
import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from convserve.server import device as device_mod
from convserve.server import errors, models, ops, types
from convserve.server.batcher import BatchObserver, DynamicBatcher, default_pad_sizes
from convserve.server.engine_process import ProcessEngine, WorkerError
from convserve.server.metrics import Metrics
from convserve.server.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

PIXELS = 28 * 28
# Convolve requests with kernels up to this size may be merged with same-kernel requests.
MERGE_MAX_KERNEL_ELEMENTS = 4096
# Convolve inputs up to this size are validated on the event loop, larger ones in a thread.
SMALL_INPUT_ELEMENTS = 1 << 16
# Operations (Convolve, FitKernel, GetFeatureMaps) that may wait for a worker at once.
MAX_WAITING_OPERATIONS = 256
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
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, settings.max_concurrent_batches), thread_name_prefix="convserve-ops"
        )
        # Operations (Convolve, FitKernel, GetFeatureMaps) running or waiting for a worker.
        self._ops_slots = asyncio.Semaphore(max(1, settings.max_concurrent_batches))
        self._ops_waiting = 0
        self._op_futures: set[asyncio.Future[Any]] = set()
        self._ops_waiting_elements = 0
        # Inputs of waiting operations held in memory: a few maximal requests' worth.
        self._max_waiting_elements = 4 * settings.max_conv_elements
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

    # -- lifecycle ------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """A version is serving and the runtime is not shutting down."""
        return not self._closing and self._manager is not None and self._manager.serving is not None

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

    async def stop(self, grace_s: float) -> None:
        """Refuse new work, let accepted work finish within `grace_s`, release the models."""
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
        closing += list(self._op_futures)
        if closing:
            _, pending = await asyncio.wait(closing, timeout=max(0.0, grace_s))
            if pending:
                log.warning("%d batcher(s) did not drain within %.1f s", len(pending), grace_s)
                await asyncio.gather(*(b.close(drain=False) for b in batchers))
        # Batchers are closed above; releasing the models must not schedule more closes.
        self._batchers.clear()
        if self._manager is not None:
            self._manager.release_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

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
        self, rpc: str, deadline: float | None, rows: int, elements: int, fn: Callable[[], T]
    ) -> T:
        """Run a blocking operation in the pool, at most max_concurrent_batches at once.

        Waiting operations are bounded in number and in input elements (memory),
        so a flood of requests is refused (RESOURCE_EXHAUSTED) instead of queued.
        """
        self._check_open()
        _check_deadline(deadline, rpc)
        # A request over the element limit is refused by ops with a clear message; count
        # it as the limit here so that it reaches that check.
        elements = min(elements, self.settings.max_conv_elements)
        if (
            self._ops_waiting >= MAX_WAITING_OPERATIONS
            or self._ops_waiting_elements + elements > self._max_waiting_elements
        ):
            raise errors.ResourceExhausted(
                f"{rpc}: {self._ops_waiting} operations are waiting for a worker; retry later"
            )
        enqueued = time.monotonic()
        self._ops_waiting += 1
        self._ops_waiting_elements += elements
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait_for(self._ops_slots.acquire(), timeout)
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"{rpc}: the deadline passed while the request was queued"
            ) from None
        finally:
            self._ops_waiting -= 1
            self._ops_waiting_elements -= elements
        try:
            _check_deadline(deadline, rpc)
            observer = self._observers[rpc]
            started = time.monotonic()
            future = asyncio.get_running_loop().run_in_executor(self._pool, fn)
            self._op_futures.add(future)
            future.add_done_callback(self._op_futures.discard)
            result = await future
            observer.on_batch(rows, rows, [started - enqueued], time.monotonic() - started)
            return result
        finally:
            self._ops_slots.release()

    async def convolve(
        self, value: types.ConvolveInput, *, deadline: float | None
    ) -> types.ConvolveOutput:
        """2-D convolution on the serving device (see `ops.convolve`).

        Concurrent requests with the same kernel, bias, options and item shape
        are merged along N into one call (each gets exactly its own result);
        others run on their own. Either way at most max_concurrent_batches
        operations compute at once.
        """
        key = _merge_key(value)
        if key is None:
            return await self._convolve_alone(value, deadline)
        return await self._convolve_merged(key, value, deadline)

    async def _convolve_alone(
        self, value: types.ConvolveInput, deadline: float | None
    ) -> types.ConvolveOutput:
        settings = self.settings
        x = value.input
        rows = int(x.shape[0]) if isinstance(x, np.ndarray) and x.ndim == 4 else 1
        size = int(x.size) if isinstance(x, np.ndarray) else 0
        # Validation runs in the worker too: its NaN/Inf scan of a large input
        # would otherwise stall the event loop.
        return await self._run_op(
            "Convolve",
            deadline,
            rows,
            size,
            lambda: ops.convolve(
                value,
                device=self.device,
                max_elements=settings.max_conv_elements,
                max_kernel_elements=settings.max_kernel_elements,
            ),
        )

    async def _convolve_merged(
        self, key: tuple[Any, ...], value: types.ConvolveInput, deadline: float | None
    ) -> types.ConvolveOutput:
        self._check_open()
        _check_deadline(deadline, "Convolve")
        x = value.input
        size = int(x.size)
        if size > SMALL_INPUT_ELEMENTS:
            await asyncio.to_thread(self._validate_convolve, value)
        else:
            self._validate_convolve(value)
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
            entry = (self._new_conv_batcher(value, items), [0])
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

    def _validate_convolve(self, value: types.ConvolveInput) -> None:
        ops.validate_convolve(
            value,
            max_elements=self.settings.max_conv_elements,
            max_kernel_elements=self.settings.max_kernel_elements,
        )

    def _new_conv_batcher(self, value: types.ConvolveInput, items: np.ndarray) -> DynamicBatcher:
        """A batcher computing `value`'s kernel, bias and options on [B,H,W,C] batches."""
        settings = self.settings
        kernel = value.kernel if value.kernel.ndim == 4 else value.kernel[:, :, None, None]
        bias = None if value.bias is None else np.reshape(value.bias, (-1,))
        options = value.options
        device = self.device

        def run(batch: np.ndarray) -> np.ndarray:
            n = int(batch.shape[0])
            # Each request was checked against the limits; the merged call holds n items.
            result = ops.convolve(
                types.ConvolveInput(batch, kernel, bias, options),
                device=device,
                max_elements=settings.max_conv_elements * n,
                max_kernel_elements=settings.max_kernel_elements,
                max_work=ops.DEFAULT_MAX_WORK * n,
            )
            return result.output

        # One merged call holds at most max_conv_elements input values.
        item_elements = max(1, int(np.prod(items.shape[1:])))
        max_rows = max(1, min(settings.max_batch_size, settings.max_conv_elements // item_elements))
        return DynamicBatcher(
            run,
            name="Convolve",
            max_batch_size=max_rows,
            batch_timeout_s=settings.batch_timeout_s,
            max_queued_items=max(max_rows, settings.max_queued_images),
            max_concurrent_batches=settings.max_concurrent_batches,
            # No padding: eager convolutions do not retrace, padded rows would be wasted work.
            pad_sizes=range(1, max_rows + 1),
            executor=self._pool,
            observer=self._convolve_observer,
        )

    async def fit_kernel(
        self, value: types.FitKernelInput, *, deadline: float | None
    ) -> types.FitKernelOutput:
        """Fit a kernel by gradient descent within max_fit_steps and the time budget."""
        settings = self.settings
        budget = settings.fit_time_budget_s
        if deadline is not None:
            # Leave time to send the answer back before the caller gives up.
            budget = min(budget, max(0.0, (deadline - time.monotonic()) * 0.9))
        x = value.inputs
        rows = int(x.shape[0]) if isinstance(x, np.ndarray) and x.ndim >= 3 else 1
        size = int(x.size) * 2 if isinstance(x, np.ndarray) else 0  # inputs and targets
        return await self._run_op(
            "FitKernel",
            deadline,
            rows,
            size,
            lambda: ops.fit_kernel(
                value,
                device=self.device,
                max_steps=settings.max_fit_steps,
                time_budget_s=budget,
                max_elements=settings.max_conv_elements,
                max_kernel_elements=settings.max_kernel_elements,
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
                    f"layer names from {list(available)} expected, got unknown {unknown}",
                )
            maps = await self._run_op(
                "GetFeatureMaps", deadline, 1, PIXELS, lambda: model.feature_maps(image)
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
