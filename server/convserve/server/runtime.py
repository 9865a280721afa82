"""The runtime: what the servicers of every protocol call (`api.RuntimeApi`).

It is the model registry and the server's lifecycle, and delegates the work:

* `served.ServedModel`, one per configured model: its versions, Predict
  batchers, engines and readiness;
* `operations.Operations`: Convolve (merged or alone), FitKernel and the
  pool every operation computes in (GetFeatureMaps too);
* `inputs`: the checks of client images against a model's input.

Models come from ``--model NAME=BASE_PATH`` flags, ``--model-config-file``
(TF Serving's ModelServerConfig text, re-read every
``model_config_file_poll_wait_s``: models added are loaded, removed ones
drained and unloaded) or, by default, ``--model-name``/``--model-base-path``.
A request with an empty model name gets the first configured model.

Deadlines are absolute `time.monotonic()` values (None: no deadline); use
`deadline_of(context)` to get one from a gRPC call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from convserve.server import costs, errors, inputs, model_config, types
from convserve.server import device as device_mod
from convserve.server.metrics import Metrics
from convserve.server.operations import Operations, check_deadline
from convserve.server.served import Budget, HeapState, ServedModel, as_float, budget_for
from convserve.server.settings import Settings

log = logging.getLogger(__name__)

# Estimated CPU seconds of one GetFeatureMaps call (one image through the model's
# convolution layers: a few milliseconds on 2 cores).
FEATURE_MAPS_S = 0.01
# The `model` metrics label of requests naming a model that is not configured.
UNKNOWN_MODEL_LABEL = "_unknown"


def deadline_of(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The caller's deadline as an absolute time.monotonic() (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class Runtime:
    """Serves the configured models and the convolution operations for every protocol."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = "/CPU:0"
        self._closing = False
        self._started = False
        # Configured models, in configuration order (the first is the default).
        self._models: dict[str, ServedModel] = {}
        self._entries: dict[str, model_config.ModelEntry] = {}
        # What a changed model was, until its new definition has loaded.
        self._previous_entries: dict[str, model_config.ModelEntry] = {}
        # Models added or replaced while serving, still loading.
        self._loading: dict[str, asyncio.Task[None]] = {}
        # Models removed or replaced while serving, draining.
        self._removing: dict[asyncio.Task[None], ServedModel] = {}
        self._pollers: list[asyncio.Task[None]] = []
        self._heap = HeapState()
        self._ready_listeners: list[Callable[[bool], None]] = []
        self.operations = Operations(
            settings, metrics, is_open=self._check_open, device=lambda: self.device
        )

    # -- registry -----------------------------------------------------------------

    @property
    def default_model(self) -> str:
        """The first configured model ("" before any is configured)."""
        return next(iter(self._models), "")

    @property
    def model_name(self) -> str:
        return self.default_model

    def served(self, ref: types.ModelRef | str | None = None) -> ServedModel:
        """The configured model `ref` names (the default for an empty name).

        Raises errors.NotFound naming the served models.
        """
        name = ref.name if isinstance(ref, types.ModelRef) else ref
        name = name or self.default_model
        model = self._models.get(name)
        if model is None:
            served = ", ".join(repr(n) for n in self._models) or "none yet"
            raise errors.NotFound(
                f"model {errors.shown(name)} is not served here (served: {served})"
            )
        return model

    @property
    def manager(self) -> Any:
        """The default model's versions (`models.ModelManager`)."""
        if not self._started:
            raise errors.Unavailable("the models are not loaded yet")
        return self.served().manager

    def model_label(self, requested: str) -> str:
        if not requested:
            return self.default_model
        return requested if requested in self._models else UNKNOWN_MODEL_LABEL

    def models(self) -> list[types.ModelStatus]:
        return [self._models[name].status() for name in sorted(self._models)]

    def model_status(self, name: str) -> types.ModelStatus:
        return self.served(name).status()

    # -- readiness ----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Started, not stopping, and every configured model is ready."""
        if self._closing or not self._started or not self._models:
            return False
        return all(model.ready for model in self._models.values())

    def add_ready_listener(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(ready)` on the event loop whenever readiness (overall or of one
        model) may have changed after start-up."""
        self._ready_listeners.append(listener)

    def _notify_ready(self) -> None:
        if not self._started:
            return
        for model in list(self._models.values()):
            self.metrics.model_ready.labels(model=model.name).set(1 if model.ready else 0)
        ready = self.ready
        for listener in self._ready_listeners:
            try:
                listener(ready)
            except Exception:
                log.exception("a readiness listener failed")

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Choose the device, load every configured model, start polling.

        Raises errors.Unavailable when a configured model has no loadable
        version (naming it) or the model configuration cannot be read.
        """
        try:
            choice = await asyncio.to_thread(device_mod.configure_device, self.settings.device)
        except ValueError as exc:
            raise errors.Unavailable(str(exc)) from exc
        self.device = choice.name
        try:
            entries = await asyncio.to_thread(self.settings.model_entries)
        except model_config.ModelConfigError as exc:
            raise errors.Unavailable(str(exc)) from exc
        budget = self._budget(len(entries))
        try:
            for entry in entries:
                model = self._new_model(entry, budget)
                self._models[entry.name] = model
                self._entries[entry.name] = entry
                await model.start()
                if model.manager.serving is None:
                    # As TF Serving does: every model configured at start-up must load.
                    raise errors.Unavailable(self._not_loadable(model))
        except BaseException:
            # The models already loaded must not leave worker processes behind.
            await self.stop(0)
            raise
        self._started = True
        self._notify_ready()
        if self.settings.poll_interval_s > 0:
            self._pollers.append(asyncio.create_task(self._poll_versions(), name="model-poller"))
        wait_s = self.settings.model_config_file_poll_wait_s
        if self.settings.model_config_file is not None and wait_s > 0:
            self._pollers.append(asyncio.create_task(self._poll_config(), name="config-poller"))

    def _budget(self, models_count: int) -> Budget:
        return budget_for(self.settings, models_count, os.cpu_count() or 1)

    def _new_model(self, entry: model_config.ModelEntry, budget: Budget) -> ServedModel:
        return ServedModel(
            entry.name,
            entry.base_path,
            self.settings,
            self.metrics,
            device=self.device,
            budget=budget,
            policy=entry.policy,
            on_ready_change=self._notify_ready,
            heap=self._heap,
        )

    @staticmethod
    def _not_loadable(model: ServedModel) -> str:
        found = [s.version for s in model.manager.status()]
        return (
            f"no loadable version of model {model.name!r} under {model.base_path} "
            f"(versions found: {found or 'none'})"
        )

    async def poll_once(self, name: str | None = None) -> int | None:
        """Look for new versions of one model (the default) now; the version swapped in."""
        return await self.served(name).poll_once()

    async def _poll_versions(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.settings.poll_interval_s)
            for model in list(self._models.values()):
                if model.name in self._loading:
                    continue  # its first load is still running
                try:
                    await model.poll_once()
                except Exception:
                    log.exception("polling %s failed", model.base_path)

    async def _poll_config(self) -> None:
        path = self.settings.model_config_file
        assert path is not None
        while not self._closing:
            await asyncio.sleep(self.settings.model_config_file_poll_wait_s)
            try:
                entries = await asyncio.to_thread(model_config.read_model_config_file, path)
            except model_config.ModelConfigError as exc:
                # As TF Serving does: a bad edit leaves the models as they are.
                log.error("model config file not applied, keeping the models served: %s", exc)
                continue
            try:
                self.apply_config(entries)
            except Exception:
                log.exception("applying the model config file failed")

    def apply_config(self, entries: list[model_config.ModelEntry]) -> None:
        """Serve exactly `entries` from now on (on the event loop).

        Removed models stop taking requests at once (NOT_FOUND), then drain
        and unload; added ones load in the background (UNAVAILABLE until
        their first version serves); a model whose base path or version
        policy changed keeps serving from its old definition until the new
        one has loaded. The other models are untouched.
        """
        if self._closing:
            return
        wanted = {entry.name: entry for entry in entries}
        budget = self._budget(len(entries))
        for name in [n for n in self._models if n not in wanted]:
            log.info("model %s removed from the configuration: draining and unloading", name)
            self._cancel_loading(name)
            self._retire(self._models.pop(name), removed=True)
        for name in [n for n in self._loading if n not in wanted]:
            self._cancel_loading(name)
        for entry in entries:
            if self._entries.get(entry.name) == entry:
                continue
            log.info("model %s: loading from %s (%s)", entry.name, entry.base_path,
                     entry.policy.describe() if entry.policy else "newest")  # fmt: skip
            self._cancel_loading(entry.name)
            model = self._new_model(entry, budget)
            if entry.name not in self._models:
                self._models[entry.name] = model  # UNAVAILABLE until loaded
            task = asyncio.create_task(self._load_added(model), name=f"load {entry.name}")
            self._loading[entry.name] = task
        previous = self._entries
        # Configuration order decides the default model.
        self._entries = dict(wanted)
        self._previous_entries = {n: e for n, e in previous.items() if wanted.get(n) != e}
        self._models = {name: self._models[name] for name in wanted if name in self._models}
        self._notify_ready()

    async def _load_added(self, model: ServedModel) -> None:
        try:
            await model.start()
            while model.manager.serving is None and not self._closing:
                # No loadable version yet: look again, as a new model's versions may arrive.
                await asyncio.sleep(max(1.0, self.settings.poll_interval_s))
                await model.poll_once()
        except asyncio.CancelledError:
            self._retire(model)
            raise
        except Exception:
            log.exception("loading model %s failed; the next read of the file retries", model.name)
            self._retire(model)
            # Forget the new definition, so that the next read of the file tries it again.
            old = self._previous_entries.get(model.name)
            if old is not None:
                self._entries[model.name] = old
            else:
                self._entries.pop(model.name, None)
                if self._models.get(model.name) is model:
                    del self._models[model.name]
            return
        finally:
            if self._loading.get(model.name) is asyncio.current_task():
                del self._loading[model.name]
        if self._closing:
            return
        current = self._models.get(model.name)
        if current is not model:
            if current is not None:
                self._retire(current)  # the old definition of a changed model
            self._models[model.name] = model
            self._models = {n: self._models[n] for n in self._entries if n in self._models}
        log.info("model %s serving version %d", model.name,
                 model.manager.serving.version if model.manager.serving else 0)  # fmt: skip
        self._notify_ready()

    def _cancel_loading(self, name: str) -> None:
        task = self._loading.pop(name, None)
        if task is not None:
            task.cancel()

    def _retire(self, model: ServedModel, *, removed: bool = False) -> None:
        """Drain and unload `model` in the background; `removed`: no longer configured, so
        its metrics series go too once it has drained (unless the name came back)."""
        if any(m is model for m in self._removing.values()):
            return

        async def unload() -> None:
            await model.stop(self.settings.grace_period_s)
            if removed and model.name not in self._models:
                self.metrics.forget_model(model.name)
                self.operations.forget_model(model.name)

        task = asyncio.get_running_loop().create_task(unload(), name=f"unload {model.name}")
        self._removing[task] = model
        task.add_done_callback(lambda done: self._removing.pop(done, None))

    async def stop(self, grace_s: float) -> bool:
        """Refuse new work, let accepted work finish within `grace_s`, release the models.

        Operations still computing then are stopped at their next unit of
        work; returns False if any of them had not stopped a unit later
        (their threads are abandoned).
        """
        self._closing = True
        for task in [*self._pollers, *self._loading.values()]:
            task.cancel()
        for task in [*self._pollers, *self._loading.values()]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pollers.clear()
        self._loading.clear()
        draining = list(self._removing.values())
        served = list(self._models.values())
        closing: list[asyncio.Future[Any]] = []
        for model in served:
            closing += model.begin_stop()
        closing += self.operations.close_batchers()
        closing += list(self._removing)
        served += draining  # their unloads run on; after the grace period they end here
        deadline = time.monotonic() + max(0.0, grace_s)
        if closing:
            _, pending = await asyncio.wait(closing, timeout=max(0.0, grace_s))
            if pending:
                log.warning("%d batcher(s) did not drain within %.1f s", len(pending), grace_s)
                # Batches still in model workers (e.g. a hung one) fail now: the workers go.
                failing: list[asyncio.Future[Any]] = []
                for model in served:
                    failing += model.fail_pending()
                await asyncio.wait(failing or closing, timeout=costs.MIN_OVERRUN_S)
        # Operations still computing after the grace period are stopped at their next unit.
        stopped = await self.operations.close(deadline - time.monotonic())
        if not stopped:
            log.warning("%d operation(s) did not stop in time; abandoned",
                        self.operations.running)  # fmt: skip
        # No worker process outlives the server, stopped (SIGSTOP) or not.
        await asyncio.gather(*(model.release() for model in served))
        return stopped

    def _check_open(self) -> None:
        if self._closing:
            raise errors.Unavailable("the server is shutting down")
        if not self._started:
            raise errors.Unavailable("the models are not loaded yet")

    # -- requests -------------------------------------------------------------------

    def check_images(
        self, images: np.ndarray, field: str = "images", model: types.ModelRef = types.DEFAULT_MODEL
    ) -> np.ndarray:
        """Check images against `model`'s input (see `inputs.check_images`): [N,H,W,C]."""
        return self.served(model).check_images(images, field, model)

    async def predict(
        self, value: types.PredictInput, *, deadline: float | None, protocol: str = "convserve"
    ) -> types.PredictOutput:
        """Class probabilities for `value.images`, batched with concurrent requests.

        Raises errors.NotFound (unknown model, pinned version not loaded),
        ResourceExhausted (queue full), DeadlineExceeded, Unavailable.
        """
        self._check_open()
        return await self.served(value.model).predict(value, deadline=deadline)

    async def convolve(
        self, value: types.ConvolveInput, *, deadline: float | None
    ) -> types.ConvolveOutput:
        """2-D convolution on the serving device (see `Operations.convolve`)."""
        return await self.operations.convolve(value, deadline=deadline)

    async def fit_kernel(
        self, value: types.FitKernelInput, *, deadline: float | None
    ) -> types.FitKernelOutput:
        """Fit a kernel by gradient descent (see `Operations.fit_kernel`)."""
        return await self.operations.fit_kernel(value, deadline=deadline)

    async def feature_maps(
        self, value: types.FeatureMapsInput, *, deadline: float | None
    ) -> types.FeatureMapsOutput:
        """The convolution layers' activations for one image ([H,W,F] per layer)."""
        self._check_open()
        check_deadline(deadline, "GetFeatureMaps")
        served = self.served(value.model)
        with served.lease(value.model) as model:
            image = as_float(inputs.check_image(value.image, "image", model.signature.spec))
            available = model.feature_map_layers
            if not available:
                raise errors.FailedPrecondition(
                    f"model {model.name!r} version {model.version} has no feature_maps signature"
                )
            wanted = tuple(value.layers) or available
            unknown = [name for name in wanted if name not in available]
            if unknown:
                raise errors.InvalidArgument(
                    "layers",
                    f"layer names from {list(available)} expected, "
                    f"got unknown {errors.shown(unknown)}",
                )
            maps = await self.operations.run_op(
                "GetFeatureMaps",
                deadline,
                1,
                int(image.size),
                FEATURE_MAPS_S,
                lambda work: model.feature_maps(image),
                model=model.name,
            )
        return types.FeatureMapsOutput(
            model_name=model.name,
            model_version=model.version,
            maps=[(name, np.asarray(maps[name][0], dtype=np.float32)) for name in wanted],
        )

    def metadata(self, ref: types.ModelRef) -> types.ModelMetadata:
        """The model's inputs, outputs, layer table and training record.

        Raises errors.NotFound for an unknown model or a version not loaded.
        """
        return self.served(ref).metadata(ref)
