"""One fake of the runtime (`api.RuntimeApi`) for the tests of servicers and the app.

It serves fake models without TensorFlow, so that the wire layer (converters,
servicers, interceptors, app lifecycle) can be tested on its own: a model's
prediction is one-hot on (sum of pixels on the 0..255 scale) mod K, K being
its number of classes; its feature maps are ``conv1`` (the image itself) and
``conv2`` (every other pixel, doubled); Convolve and FitKernel are the real
`convolution` and `kernel_fit`. `predict` checks images as the runtime does,
with the real `inputs` checks against the input of the model version it
resolves. Tests of the whole server use the real runtime instead.

The knobs: `ready` (settable; listeners hear of changes), `fail_start`,
`start_gate` (holds `start`), `gate` (holds every prediction once counted in
`started_predictions`), and what it records: `events` (start and stop),
`calls` (predictions and convolutions with their deadlines), `stopped_with`
(the grace period `stop` got).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from convserve.server import api, convolution, errors, inputs, kernel_fit, types

DIGITS = tuple(str(d) for d in range(10))


def fake_probabilities(images: np.ndarray, classes: int = 10) -> np.ndarray:
    """One-hot float32 [N,classes] on (sum of pixels on the 0..255 scale) mod `classes`."""
    scaled = images.astype(np.float64) * (255.0 if images.dtype == np.float32 else 1.0)
    sums = np.rint(scaled.reshape(len(images), -1).sum(axis=1)).astype(np.int64)
    return np.eye(classes, dtype=np.float32)[sums % classes]


@dataclass(frozen=True)
class FakeModel:
    """A configured model: its loaded versions (the newest serves), input shape [H,W,C],
    class names and whether it is ready."""

    name: str
    versions: tuple[int, ...] = (1, 2)
    shape: tuple[int, int, int] = (28, 28, 1)
    class_names: tuple[str, ...] = DIGITS
    ready: bool = True

    @property
    def spec(self) -> inputs.ImageSpec:
        return inputs.ImageSpec(self.shape)

    @property
    def serving_version(self) -> int:
        return max(self.versions)

    def version(self, ref: types.ModelRef) -> int:
        """The version `ref` gets: its pinned one if loaded, else the serving one (a fake
        model has the implicit labels only: "latest" and "stable")."""
        if ref.label is not None and ref.label not in ("latest", "stable"):
            raise errors.NotFound(
                f"model {self.name!r} has no version label {errors.shown(ref.label)} (labels: none)"
            )
        if ref.version is None:
            return self.serving_version
        if ref.version not in self.versions:
            raise errors.NotFound(
                f"model_spec.version: model {self.name!r} version {ref.version} is not loaded "
                f"(loaded versions: {list(self.versions)})"
            )
        return ref.version

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return fake_probabilities(images, len(self.class_names))


class FakeRuntime:
    """`api.RuntimeApi` over fake models (default: one "mnist", 28x28x1, ten digits)."""

    def __init__(
        self,
        models: Sequence[FakeModel] | None = None,
        *,
        default_model: str = "mnist",
        max_images: int = 64,
        ready: bool = True,
        device: str = "/CPU:0",
        fail_start: bool = False,
        start_gate: asyncio.Event | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        listed = list(models) if models is not None else [FakeModel("mnist")]
        self.models_by_name = {model.name: model for model in listed}
        if len(self.models_by_name) != len(listed):
            raise ValueError(f"model names must differ, got {[m.name for m in listed]}")
        if default_model not in self.models_by_name:
            raise ValueError(
                f"default_model must be one of {sorted(self.models_by_name)}, got {default_model!r}"
            )
        self._default_model = default_model
        self.max_images = max_images
        self.device = device
        self.fail_start = fail_start
        self.start_gate = start_gate
        self.gate = gate
        self.started_predictions = 0
        self.stopped_with: float | None = None
        self.events: list[str] = []
        # ("predict", (deadline, checked images' shape)) and ("convolve", deadline).
        self.calls: list[tuple[str, Any]] = []
        self._up = ready
        self._listeners: list[Callable[[bool], None]] = []

    # -- readiness and lifecycle ---------------------------------------------

    @property
    def ready(self) -> bool:
        return self._up and all(model.ready for model in self.models_by_name.values())

    @ready.setter
    def ready(self, value: bool) -> None:
        self._up = value
        for listener in list(self._listeners):
            listener(self.ready)

    def add_ready_listener(self, listener: Callable[[bool], None]) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        self.events.append("runtime.start")
        self._up = False  # loading
        if self.start_gate is not None:
            await self.start_gate.wait()
        if self.fail_start:
            raise errors.Unavailable("no loadable model version under the base path")
        self._up = True

    async def stop(self, grace_s: float) -> bool:
        self.events.append("runtime.stop")
        self._up = False
        self.stopped_with = grace_s
        return True

    # -- models --------------------------------------------------------------

    @property
    def default_model(self) -> str:
        return self._default_model

    def model_label(self, requested: str) -> str:
        if not requested:
            return self._default_model
        return requested if requested in self.models_by_name else "_unknown"

    def model(self, ref: types.ModelRef) -> FakeModel:
        """The model `ref` names (the default one for no name); NotFound naming the served."""
        name = ref.name or self._default_model
        model = self.models_by_name.get(name)
        if model is None:
            served = ", ".join(repr(n) for n in sorted(self.models_by_name))
            raise errors.NotFound(
                f"model_spec.name: unknown model {errors.shown(name)} (served: {served})"
            )
        return model

    def models(self) -> list[types.ModelStatus]:
        return [self.model_status(name) for name in sorted(self.models_by_name)]

    def model_status(self, name: str) -> types.ModelStatus:
        model = self.model(types.ModelRef(name))
        return types.ModelStatus(
            name=model.name,
            ready=self._up and model.ready,
            versions=tuple(
                types.VersionStatus(v, "AVAILABLE", serving=v == model.serving_version)
                for v in sorted(model.versions)
            ),
        )

    def version_of(self, ref: types.ModelRef) -> int:
        return self.model(ref).version(ref)

    def metadata(self, ref: types.ModelRef) -> types.ModelMetadata:
        model = self.model(ref)
        model.version(ref)
        height, width, _ = model.shape
        classes = len(model.class_names)
        return types.ModelMetadata(
            model_name=model.name,
            loaded_versions=model.versions,
            # A pinned version describes itself; serving_version still names the default.
            serving_version=model.serving_version,
            inputs=(types.TensorSpecInfo("images", ("uint8", "float32"), (-1, *model.shape)),),
            outputs=(types.TensorSpecInfo("probabilities", ("float32",), (-1, classes)),),
            layers=(types.LayerRow("conv1", "Conv2D", (height - 2, width - 2, 8), 80),),
            training={
                "dataset": "sample",
                "test_accuracy": 0.5,
                "class_names": list(model.class_names),
                # Every test image of class k taken for class k.
                "confusion_matrix": (np.eye(classes, dtype=np.int64) * 3).tolist(),
            },
            device=self.device,
            class_names=model.class_names,
        )

    # -- requests ------------------------------------------------------------

    def checked_images(self, value: types.PredictInput) -> np.ndarray:
        """`value.images` checked as `predict` checks them, against the input of the model
        `value.model` names (after its version: NotFound first); [N,H,W,C]."""
        model = self.model(value.model)
        model.version(value.model)
        checked = inputs.check_images(
            value.images, value.field, model.spec, max_images=self.max_images
        )
        return checked.array

    def _serving(self, model: FakeModel) -> None:
        if not self._up or not model.ready:
            raise errors.Unavailable(f"model {model.name!r} is not ready")

    async def predict(
        self, value: types.PredictInput, *, deadline: float | None
    ) -> types.PredictOutput:
        images = self.checked_images(value)
        model = self.model(value.model)
        version = model.version(value.model)
        self._serving(model)
        self.calls.append(("predict", (deadline, images.shape)))
        self.started_predictions += 1
        if self.gate is not None:
            await self.gate.wait()
        return types.PredictOutput(
            model.name, version, model.probabilities(images), model.class_names
        )

    async def convolve(
        self, value: types.ConvolveInput, *, deadline: float | None
    ) -> types.ConvolveOutput:
        self.calls.append(("convolve", deadline))
        return convolution.convolve(value)

    async def fit_kernel(
        self, value: types.FitKernelInput, *, deadline: float | None
    ) -> types.FitKernelOutput:
        return kernel_fit.fit_kernel(value, max_steps=2000, time_budget_s=60.0)

    async def feature_maps(
        self, value: types.FeatureMapsInput, *, deadline: float | None
    ) -> types.FeatureMapsOutput:
        model = self.model(value.model)
        version = model.version(value.model)
        self._serving(model)
        image = inputs.check_image(value.image, "image", model.spec)[0].astype(np.float32)
        available = {"conv1": image, "conv2": image[::2, ::2] * 2}
        names = value.layers or tuple(available)
        for name in names:
            if name not in available:
                raise errors.InvalidArgument(
                    "layers", f"one of conv1, conv2 expected, got {errors.shown(name)}"
                )
        return types.FeatureMapsOutput(
            model.name, version, [(name, available[name]) for name in names]
        )


# mypy proves the fake has every method of the runtime's interface, with its signature.
_: api.RuntimeApi = FakeRuntime()
