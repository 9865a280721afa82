"""One served model: its versions, their batchers and engines, its readiness.

A `ServedModel` owns a `model_versions.ModelManager` (the versions under its base
path, loaded by its version policy), one `DynamicBatcher` per loaded version
for Predict, and each version's engine (`convserve.server.engines`: with
``engine_workers=process``, the serving version's worker processes). What it
takes (image shape, dtype) and answers (K class probabilities, class names)
comes from each version's serving signature.
Its version labels can change while it serves (`set_labels`), without a
reload. The runtime holds one per configured model (`runtime.Runtime`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convserve.server import engines, errors, inputs, model_versions, models, types
from convserve.server.batch_runs import AwaitedRuns, BatchRuns, ThreadRuns
from convserve.server.batcher import DynamicBatcher, SummingObserver, default_pad_sizes
from convserve.server.blocking import off_loop
from convserve.server.metrics import Metrics
from convserve.server.operations import check_deadline
from convserve.server.settings import Settings

log = logging.getLogger(__name__)

_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)
# Worker processes per model beyond its budget: they take full batches only.
SPARE_WORKERS = 1
# Seconds the model worker processes get to exit at shutdown before they are killed.
WORKER_EXIT_S = 2.0


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


def as_float(images: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 0..1 (the model's input); float32 passes through."""
    if images.dtype == np.uint8:
        # One table lookup: the same float32 values as x / 255, in one pass.
        return _UINT8_TO_UNIT.take(images)
    return np.asarray(images, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of the machine one model's engine may use."""

    workers: int  # worker processes (or concurrent batches) per loaded version
    threads: int  # CPU threads per model call


def budget_for(settings: Settings, models_count: int, cpus: int) -> Budget:
    """Split max_concurrent_batches and the CPUs across `models_count` models.

    Each model gets at least one worker; the workers of all models together
    get about one thread per CPU, so two models on two cores do not
    oversubscribe them (engine_threads, when set, is taken as given).
    """
    count = max(1, models_count)
    workers = max(1, settings.max_concurrent_batches // count)
    if settings.engine_threads:
        return Budget(workers, settings.engine_threads)
    return Budget(workers, max(1, cpus // (workers * count)))


class ServedModel:
    """A configured model: versions, batchers, engines, readiness, metrics.

    Call `start` on the event loop, then `predict` and the others; `stop`
    drains and releases everything. `on_ready_change()` is called on the
    event loop whenever `ready` may have changed.
    """

    def __init__(
        self,
        name: str,
        base_path: Path,
        settings: Settings,
        metrics: Metrics,
        *,
        device: str,
        budget: Budget,
        policy: Any = None,
        labels: Sequence[tuple[str, int]] = (),
        on_ready_change: Callable[[], None] | None = None,
        heap: HeapState | None = None,
    ) -> None:
        self.name = name
        self.base_path = Path(base_path)
        self.settings = settings
        self.metrics = metrics
        self.device = device
        self.budget = budget
        self.policy = policy
        self._on_ready_change = on_ready_change
        self._heap = heap if heap is not None else HeapState()
        self._closing = False
        self._started = False
        # Per loaded version: the instance it serves and its batcher (a version number
        # may be loaded again while a retired instance of it still drains).
        self._batchers: dict[int, tuple[models.LoadedModel, DynamicBatcher]] = {}
        self._closing_batchers: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer = SummingObserver(
            metrics.batch_observer("Predict", name),
            lambda: sum(b.queued_items for _, b in self._batchers.values()),
        )
        self.manager = model_versions.ModelManager(
            self.base_path,
            name,
            device,
            on_loaded=metrics.model_loaded,
            on_serving=self._on_available,
            loader=self._load,
            policy=policy,
            settle_s=settings.version_settle_s,
            labels=labels,
            allow_unavailable_labels=settings.allow_version_labels_for_unavailable_models,
        )

    # -- state ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """A version serves, its engine is usable, and the model is not being stopped."""
        if self._closing:
            return False
        serving = self.manager.serving
        if serving is None:
            return False
        return serving.engine.healthy

    def status(self) -> types.ModelStatus:
        return types.ModelStatus(
            self.name,
            self.ready,
            self.manager.status(),
            error=self.manager.why_not_serving(),
            memory_bytes=self.memory_bytes,
            labels=self.manager.labels,
            label_errors=self.manager.label_errors,
        )

    def set_labels(self, labels: Sequence[tuple[str, int]]) -> None:
        """Point the version labels (label, version) at their versions from now on, as far
        as the loaded versions allow (`model_versions.ModelManager.set_labels`); nothing reloads."""
        self.manager.set_labels(labels)

    @property
    def memory_bytes(self) -> int:
        """What the loaded versions' buffers are sized for (see `models.plan_memory`)."""
        return sum(model.memory_bytes for model in self.manager.loaded)

    # -- lifecycle --------------------------------------------------------------

    @property
    def started(self) -> bool:
        """`start` has run (its first look at the versions is done)."""
        return self._started

    async def start(self) -> None:
        """Load and warm up the versions to serve now (no error if none loads yet)."""
        self._loop = asyncio.get_running_loop()
        await self.manager.poll_once()
        self._started = True

    async def poll_once(self) -> int | None:
        """Look for new (or, under a policy, dropped) versions now; the version swapped in."""
        changed = await self.manager.poll_once()
        self.metrics.update_device_memory(self.device)
        return changed

    def begin_stop(self) -> list[asyncio.Future[Any]]:
        """Refuse new requests and start draining the batchers; returns what to await."""
        self._closing = True
        batchers = [b for _, b in self._batchers.values()]
        closing: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(b.close(drain=True)) for b in batchers
        ]
        return closing + list(self._closing_batchers)

    def fail_pending(self) -> list[asyncio.Future[Any]]:
        """After the grace period: close the engines, so batches still in worker processes
        fail now."""
        for model in self.manager.loaded:
            model.engine.close()
        return [asyncio.ensure_future(b.close(drain=False)) for _, b in self._batchers.values()]

    async def release(self) -> None:
        """Release every version and wait for its worker processes to exit (or kill them)."""
        self._batchers.clear()
        # Retired versions some request still held count too: nothing outlives the model.
        held = [*self.manager.loaded, *self.manager.unloading]
        closing = list({id(m.engine): m for m in held}.values())
        self.manager.release_all()
        for model in closing:
            model.engine.close()
        exited = await asyncio.gather(
            *(asyncio.to_thread(m.engine.wait_closed, WORKER_EXIT_S) for m in closing)
        )
        for model, done in zip(closing, exited, strict=True):
            if not done:
                log.warning("%s version %d: worker processes did not exit", model.name,
                            model.version)  # fmt: skip

    async def stop(self, grace_s: float) -> None:
        """Drain within `grace_s`, then release (a model removed from the configuration)."""
        closing = self.begin_stop()
        if closing:
            _, pending = await asyncio.wait(closing, timeout=max(0.0, grace_s))
            if pending:
                await asyncio.wait(self.fail_pending(), timeout=1.0)
        await self.release()

    # -- versions ----------------------------------------------------------------

    def _load(self, name: str, version: int, path: Path, device: str) -> models.LoadedModel:
        """`models.load_model` with the server's settings, then `settle_heap` (blocking)."""
        settings = self.settings
        serving = self.manager.serving
        newest = serving is None or version > serving.version
        # Worker processes for the version that will serve; an older one a policy keeps
        # for pinned requests computes in-process, so versions do not multiply them.
        workers = None
        if settings.engine_workers == "process" and newest:
            workers = engines.WorkerOptions(
                # One spare beyond the budget (see DynamicBatcher's spare_batches): while
                # the event loop hands a batch's answers back and forms the next one, it
                # computes, so no CPU waits for the loop.
                processes=self.budget.workers + SPARE_WORKERS,
                niceness=settings.engine_nice,
                batch_timeout_s=settings.engine_batch_timeout_s,
                on_worker_exit=lambda: self.metrics.worker_exited(name),
                on_health_change=lambda healthy: self._on_engine_health(version, healthy),
            )
        model = models.load_model(
            name,
            version,
            path,
            device,
            warm_batch_sizes=default_pad_sizes(settings.max_batch_size),
            engine=settings.cpu_engine,
            engine_threads=self.budget.threads,
            engine_copies=self.budget.workers,
            memory=models.MemoryLimits(
                budget_bytes=settings.max_model_memory_bytes,
                max_batch_size=settings.max_batch_size,
                engine_copies=self.budget.workers,
                worker_copies=workers.processes if workers is not None else 0,
            ),
            workers=workers,
        )
        settle_heap(reclaim=self._heap.retired)
        self._heap.retired = False
        return model

    def _on_available(self, model: models.LoadedModel, loaded: int) -> None:
        """A version was loaded (the serving one, or a pinnable one under a policy)."""
        if self._closing:
            return  # loaded as the model was being stopped: `release` ends it
        serving = self.manager.serving is model
        owner = self._batchers.get(model.version)
        if owner is not None and owner[0] is not model:
            # This version number was loaded again while a retired instance drains: that
            # instance's batcher finishes what it holds and stops.
            self._close_later(owner[1])
        if owner is None or owner[0] is not model:
            model.on_release = self._release
            engine = model.engine
            engine.serve()
            in_workers = engine.capabilities.worker_processes
            name = f"{model.name} v{model.version}"
            self._batchers[model.version] = (
                model,
                DynamicBatcher(
                    self._runs_for(engine, name),
                    name=name,
                    max_batch_size=model.max_rows,
                    batch_timeout_s=self.settings.batch_timeout_s,
                    max_queued_items=self.settings.max_queued_images,
                    max_concurrent_batches=self.budget.workers,
                    spare_batches=SPARE_WORKERS if in_workers else 0,
                    observer=self._observer,
                ),
            )
        self.metrics.model_memory.labels(model=self.name).set(self.memory_bytes)
        if serving:
            self.metrics.serving(model.name, model.version, model.device, model.engine.name, loaded)
            self.metrics.update_device_memory(model.device)
            if self._started:
                self._notify()

    def _runs_for(self, engine: engines.Engine, name: str) -> BatchRuns:
        """How the engine's batches run, from its declared capabilities."""
        # A few images on an idle model cost less than a trip to a thread or a process.
        inline = self.settings.inline_max_images if engine.capabilities.cheap_inline else 0
        if engine.capabilities.worker_processes:
            return AwaitedRuns(
                engine.run,
                run_batch=engine.predict,
                prepare=as_float,
                inline_max_rows=inline,
                clock=time.monotonic,
            )
        return ThreadRuns(
            engine.predict,
            name=name,
            threads=self.budget.workers,
            prepare=as_float,
            inline_max_rows=inline,
            clock=time.monotonic,
        )

    def _on_engine_health(self, version: int, healthy: bool) -> None:
        state = "usable again" if healthy else "all unusable (dead or hung); being replaced"
        level = logging.INFO if healthy else logging.WARNING
        log.log(level, "%s version %d: model workers %s", self.name, version, state)
        serving = self.manager.serving
        if serving is not None and serving.version == version:
            self._notify()

    def _notify(self) -> None:
        if self._on_ready_change is not None:
            self._on_ready_change()

    def _release(self, model: models.LoadedModel) -> None:
        """The version is retired and no request holds it: close its batcher, drop it."""
        self._heap.retired = True
        loop = self._loop
        # An engine's worker sockets are read by the event loop: close it there.
        if loop is None or _on_loop_thread(loop):
            model.engine.close()
        else:
            loop.call_soon_threadsafe(model.engine.close)
        owner = self._batchers.get(model.version)
        if owner is None or owner[0] is not model or loop is None:
            return
        del self._batchers[model.version]
        # Leases end on the event loop; the callback also works from another thread.
        loop.call_soon_threadsafe(self._close_later, owner[1])
        if not self._closing:
            self.metrics.model_memory.labels(model=self.name).set(self.memory_bytes)
        log.info("%s version %d released", model.name, model.version)

    def _close_later(self, batcher: DynamicBatcher) -> None:
        """Drain and close `batcher` in the background (on the event loop)."""
        task = asyncio.get_running_loop().create_task(batcher.close(drain=True))
        self._closing_batchers.add(task)
        task.add_done_callback(self._closing_batchers.discard)

    # -- requests -----------------------------------------------------------------

    def queued_images(self) -> int:
        return sum(b.queued_items for _, b in self._batchers.values())

    @contextlib.contextmanager
    def lease(self, ref: types.ModelRef) -> Iterator[models.LoadedModel]:
        """Hold the version `ref` names while the body runs (see `ModelManager.lease`)."""
        if self._closing:
            raise errors.Unavailable(f"model {self.name!r} is being unloaded")
        with self.manager.lease(ref) as model:
            yield model

    async def predict(
        self, value: types.PredictInput, *, deadline: float | None
    ) -> types.PredictOutput:
        """Class probabilities for `value.images`, batched.

        Leases the version `value.model` names once and checks the images against
        its input (in a thread when they are large); only checked images reach its
        batcher. Raises errors.InvalidArgument naming `value.field`, NotFound
        (pinned version not loaded), ResourceExhausted (queue full),
        DeadlineExceeded, Unavailable.
        """
        check_deadline(deadline, "Predict")
        with self.lease(value.model) as model:
            owner = self._batchers.get(model.version)
            if owner is None or owner[0] is not model:
                raise errors.Unavailable(f"model {self.name!r} is being unloaded")
            checked = await off_loop(
                self._check, value, model.signature.spec, size_bytes=_nbytes(value.images)
            )
            probabilities = await self._submit(owner[1], checked, deadline)
        return types.PredictOutput(
            model_name=model.name,
            model_version=model.version,
            probabilities=probabilities,
            class_names=model.class_names,
        )

    def _check(self, value: types.PredictInput, spec: inputs.ImageSpec) -> inputs.CheckedImages:
        limit = self.settings.max_images_per_request
        return inputs.check_images(value.images, value.field, spec, max_images=limit)

    async def _submit(
        self, batcher: DynamicBatcher, checked: inputs.CheckedImages, deadline: float | None
    ) -> np.ndarray:
        """Queue checked images on a version's batcher, within the model's queue bound
        (shared by its versions)."""
        n = checked.count
        queued = self.queued_images()
        limit = self.settings.max_queued_images
        if queued + n > limit:
            raise errors.ResourceExhausted(
                f"Predict: the queue of model {self.name!r} is full ({queued} of {limit} "
                f"images queued, this request has {n}); retry later"
            )
        return await batcher.submit(checked.array, deadline=deadline)

    def metadata(self, ref: types.ModelRef) -> types.ModelMetadata:
        """The version's inputs, outputs, layers and training record."""
        manager = self.manager
        model = manager.resolve(ref)
        meta = model.metadata(manager.loaded_versions)
        serving = manager.serving
        if serving is not None and serving is not model:
            # A pinned version describes itself; serving_version still names the default.
            meta = dataclasses.replace(meta, serving_version=serving.version)
        return meta


@dataclasses.dataclass
class HeapState:
    """Shared by every model: a version was released since the heap was last frozen."""

    retired: bool = False


def _nbytes(images: object) -> int:
    return images.nbytes if isinstance(images, np.ndarray) else 0


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


__all__ = ["Budget", "HeapState", "ServedModel", "as_float", "budget_for", "settle_heap"]
