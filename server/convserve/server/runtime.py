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
A config file edit that changes only a model's ``version_labels`` reloads
nothing: the labels of the model serving move at once (see
`model_versions.ModelManager` for which versions a label may point at).

A request with an empty model name gets the default model: the first model
configured. A later configuration may reorder the models (the first becomes
the default), but one that removes the default model does not hand its
requests to another model: they get NOT_FOUND naming it until it is
configured again.

Readiness (`ready`): by default, started, not stopping and at least one model
serving; a model that cannot load is reported (its `ModelStatus.error`, its
health, ``convserve_model_ready``) and retried in the background with backoff
while the others serve. ``--strict-readiness``: every configured model must be
ready. ``--exit-on-load-error``: start-up fails when a model configured at
start-up has no loadable version.

Deadlines are absolute `time.monotonic()` values (None: no deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from convserve.server import api, costs, errors, inputs, model_config, types
from convserve.server import device as device_mod
from convserve.server.blocking import run_detached
from convserve.server.metrics import Metrics
from convserve.server.operations import Operations, check_deadline
from convserve.server.served import Budget, HeapState, ServedModel, as_float, budget_for
from convserve.server.settings import Settings

log = logging.getLogger(__name__)

# Estimated CPU seconds of one GetFeatureMaps call (one image through the model's
# convolution layers: a few milliseconds on 2 cores).
FEATURE_MAPS_S = 0.01
# Seconds between looks at a model that has no loadable version: doubling from the
# version poll interval up to this.
LOAD_RETRY_MAX_S = 30.0
# A changed model config file is read again this long after (at most the poll wait) and
# applied only if both reads agree: an edit written in place is not applied half-written.
CONFIG_SETTLE_S = 1.0


class Runtime:
    """Serves the configured models and the convolution operations for every protocol."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.device = "/CPU:0"
        self._closing = False
        self._started = False
        # Configured models, in configuration order.
        self._models: dict[str, ServedModel] = {}
        # The model requests with an empty model name get (see the module docstring).
        self._default = ""
        # The model config file's text as last applied, and as last refused (said once).
        self._config_text: str | None = None
        self._refused_text: str | None = None
        self._entries: dict[str, model_config.ModelEntry] = {}
        # What a changed model was, until its new definition has loaded.
        self._previous_entries: dict[str, model_config.ModelEntry] = {}
        # Models added or replaced while serving, still loading, and the models they load.
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._pending: dict[str, ServedModel] = {}
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
        """The model requests with an empty model name get ("" before any is configured)."""
        return self._default

    @property
    def model_name(self) -> str:
        return self.default_model

    def served(self, ref: types.ModelRef | str | None = None) -> ServedModel:
        """The configured model `ref` names (the default for an empty name).

        Raises errors.NotFound naming the served models.
        """
        name = ref.name if isinstance(ref, types.ModelRef) else ref
        model = self._models.get(name or self._default)
        if model is None:
            served = ", ".join(repr(n) for n in self._models) or "none yet"
            if not name and self._default:
                raise errors.NotFound(
                    f"the default model {self._default!r} was removed from the model "
                    f"configuration; name a model (served: {served})"
                )
            raise errors.NotFound(
                f"model {errors.shown(name)} is not served here (served: {served})"
            )
        return model

    @property
    def manager(self) -> Any:
        """The default model's versions (`model_versions.ModelManager`)."""
        if not self._started:
            raise errors.Unavailable("the models are not loaded yet")
        return self.served().manager

    def model_label(self, requested: str) -> str:
        name = requested or self._default
        return name if name in self._models else api.UNKNOWN_MODEL_LABEL

    def models(self) -> list[types.ModelStatus]:
        return [self._models[name].status() for name in sorted(self._models)]

    def model_status(self, name: str) -> types.ModelStatus:
        return self.served(name).status()

    # -- readiness ----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Started, not stopping, and at least one model ready (with strict_readiness:
        every configured model ready)."""
        if self._closing or not self._started or not self._models:
            return False
        check = all if self.settings.strict_readiness else any
        return check(model.ready for model in self._models.values())

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

        A model with no loadable version is logged at ERROR and retried in the
        background while the others serve. Raises errors.Unavailable when the
        model configuration cannot be read, or (with exit_on_load_error) when a
        configured model has no loadable version (naming it).
        """
        try:
            choice = await run_detached(
                device_mod.configure_device, self.settings.device, name="device"
            )
        except ValueError as exc:
            raise errors.Unavailable(str(exc)) from exc
        self.device = choice.name
        try:
            entries = await run_detached(self.settings.model_entries, name="model-config")
            if self.settings.model_config_file is not None:
                self._config_text = await run_detached(
                    _read_text, self.settings.model_config_file, name="model-config"
                )
        except model_config.ModelConfigError as exc:
            raise errors.Unavailable(str(exc)) from exc
        budget = self._budget(len(entries))
        unloaded: list[ServedModel] = []
        try:
            for entry in entries:
                model = self._new_model(entry, budget)
                self._models[entry.name] = model
                self._entries[entry.name] = entry
                self._default = self._default or entry.name
                await model.start()
                if model.manager.serving is None:
                    if self.settings.exit_on_load_error:
                        raise errors.Unavailable(self._not_loadable(model))
                    log.error("%s; serving the other models and retrying it in the background",
                              self._not_loadable(model))  # fmt: skip
                    unloaded.append(model)
        except BaseException:
            # The models already loaded must not leave worker processes behind.
            await self.stop(0)
            raise
        self._started = True
        for model in unloaded:
            self._start_loading(model)
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
            labels=entry.labels,
            on_ready_change=self._notify_ready,
            heap=self._heap,
        )

    @staticmethod
    def _not_loadable(model: ServedModel) -> str:
        found = [s.version for s in model.manager.status()]
        why = model.manager.why_not_serving()
        return (
            f"no loadable version of model {model.name!r} under {model.base_path} "
            f"(versions found: {found or 'none'}{'; ' + why if why else ''})"
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
        wait_s = self.settings.model_config_file_poll_wait_s
        while not self._closing:
            await asyncio.sleep(wait_s)
            try:
                await self.read_config_once(settle_s=min(CONFIG_SETTLE_S, wait_s))
            except Exception:
                log.exception("applying the model config file failed")

    async def read_config_once(self, *, settle_s: float = CONFIG_SETTLE_S) -> bool:
        """Read the model config file and apply it if it changed; returns whether it did.

        Atomic in effect: the text must read the same twice, `settle_s` apart
        (a file written in place is not applied half-written); text equal to
        what was last applied changes nothing; an unreadable or malformed edit,
        and one that lists no models (a file truncated before it is written
        again reads so), is logged and ignored, keeping the models served. The
        reads run in threads that cannot hold the process at exit.
        """
        path = self.settings.model_config_file
        assert path is not None
        text: str | None = None
        try:
            text = await run_detached(_read_text, path, name="model-config")
            if text in (self._config_text, self._refused_text):
                return False
            await asyncio.sleep(settle_s)
            if await run_detached(_read_text, path, name="model-config") != text:
                log.info("model config file %s is being written; reading it again later", path)
                return False
            entries = model_config.model_config_entries(text, path)
        except model_config.ModelConfigError as exc:
            # As TF Serving does: a bad edit leaves the models as they are.
            log.error("model config file not applied, keeping the models served: %s", exc)
            # Refused texts are not read twice nor logged again; an unreadable file is.
            self._refused_text = text
            return False
        if not entries and self._models:
            log.error(
                "model config file %s lists no models; not applied, keeping the %d models "
                "served (an empty read is taken for a file being rewritten; to serve no "
                "models, stop the server)", path, len(self._models)
            )  # fmt: skip
            self._refused_text = text
            return False
        self.apply_config(entries)
        self._config_text = text
        return True

    def apply_config(self, entries: list[model_config.ModelEntry]) -> None:
        """Serve exactly `entries` from now on (on the event loop).

        Removed models stop taking requests at once (NOT_FOUND), then drain
        and unload; added ones load in the background (UNAVAILABLE until
        their first version serves); a model whose base path or version
        policy changed keeps serving from its old definition until the new
        one has loaded; a model whose version labels alone changed keeps
        everything loaded and its labels move at once. The other models are
        untouched.
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
        relabelled: set[str] = set()
        for entry in entries:
            current = self._entries.get(entry.name)
            if current == entry:
                continue
            if current is not None and current.same_but_labels(entry):
                self._relabel(entry)
                relabelled.add(entry.name)
                continue
            log.info("model %s: loading from %s (%s)", entry.name, entry.base_path,
                     entry.policy.describe() if entry.policy else "newest")  # fmt: skip
            self._cancel_loading(entry.name)
            model = self._new_model(entry, budget)
            if entry.name not in self._models:
                self._models[entry.name] = model  # UNAVAILABLE until loaded
            self._start_loading(model)
        previous = self._entries
        before = self._previous_entries
        # Configuration order decides the default model, but a removed default is not
        # replaced: its unnamed requests would reach a model they were not meant for.
        if entries and (not self._default or self._default in wanted):
            self._default = entries[0].name
        elif self._default and self._default in self._entries:
            log.warning(
                "model %s, the default model, was removed: requests without a model name "
                "get NOT_FOUND until it is configured again",
                self._default,
            )
        self._entries = dict(wanted)
        self._previous_entries = {
            n: e for n, e in previous.items() if wanted.get(n) != e and n not in relabelled
        }
        for name in relabelled:
            # What a model still loading would go back to, with the labels it now has.
            if name in before:
                self._previous_entries[name] = replace(before[name], labels=wanted[name].labels)
        self._models = {name: self._models[name] for name in wanted if name in self._models}
        self._notify_ready()

    def _relabel(self, entry: model_config.ModelEntry) -> None:
        """Only `entry`'s labels changed: move them on the model serving and on the one
        loading its definition, if any; nothing reloads."""
        shown = " ".join(f"{label}={version}" for label, version in entry.labels)
        log.info("model %s: version labels now %s", entry.name, shown or "none")
        serving, loading = self._models.get(entry.name), self._pending.get(entry.name)
        for model in {id(m): m for m in (serving, loading) if m is not None}.values():
            model.set_labels(entry.labels)

    def _start_loading(self, model: ServedModel) -> None:
        task = asyncio.create_task(self._load_added(model), name=f"load {model.name}")
        self._loading[model.name] = task
        self._pending[model.name] = model

    async def _load_added(self, model: ServedModel) -> None:
        try:
            if not model.started:
                await model.start()
            delay = min(self.settings.poll_interval_s, LOAD_RETRY_MAX_S)
            while model.manager.serving is None and not self._closing:
                # No loadable version yet: look again, as a new model's versions may arrive
                # (a version that failed is tried again only once its files change).
                await asyncio.sleep(delay)
                delay = min(delay * 2, LOAD_RETRY_MAX_S)
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
                self._pending.pop(model.name, None)
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
        self._pending.pop(name, None)
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
        self._pending.clear()
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

    async def predict(
        self, value: types.PredictInput, *, deadline: float | None
    ) -> types.PredictOutput:
        """Class probabilities for `value.images`, batched with concurrent requests
        (`ServedModel.predict`: one lease, one check against the leased version).

        Raises errors.InvalidArgument (images the version does not take, naming
        `value.field`), NotFound (unknown model, pinned version not loaded),
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

    def version_of(self, ref: types.ModelRef) -> int:
        """The loaded version `ref` names: its pinned version, its label's, or the serving
        one (`model_versions.ModelManager.resolve`). Raises errors.NotFound (unknown model,
        version or label), InvalidArgument (a version and a label), Unavailable."""
        return self.served(ref).manager.resolve(ref).version


def _read_text(path: Path) -> str:
    """The model config file's text (`model_config.read_config_text`); blocking."""
    return model_config.read_config_text(path)
