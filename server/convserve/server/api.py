"""The runtime's interface: everything a protocol servicer or the app may call.

`runtime.Runtime` implements it; tests share one fake of it
(``tests/fake_runtime.py``). Servicers type their runtime as `RuntimeApi`, so a
method they need and the runtime lacks is a type error, not a failed call.

Deadlines are absolute `time.monotonic()` values (None: no deadline). Every
method raises the `errors` exceptions (NotFound for an unknown model or
version, InvalidArgument naming the field, Unavailable, ...), which one
mapping turns into status codes (`errors.status_of`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from convserve.server import types


class RuntimeApi(Protocol):
    """What servicers and the app use of the runtime."""

    @property
    def ready(self) -> bool:
        """Every configured model has a serving version with a usable engine."""
        ...

    @property
    def default_model(self) -> str:
        """The model that requests with an empty model name get."""
        ...

    def model_label(self, requested: str) -> str:
        """The `model` metrics label of a request naming model `requested`: the model's
        name if configured (the default model's for ""), else "_unknown"."""
        ...

    def check_images(
        self, images: np.ndarray, field: str, model: types.ModelRef = types.DEFAULT_MODEL
    ) -> np.ndarray:
        """Check images against `model`'s input; returns them as [N,H,W,C].

        Raises errors.InvalidArgument naming `field`, errors.NotFound for an
        unknown model. Blocking for large inputs: callers run it off the loop.
        """
        ...

    async def predict(
        self, value: types.PredictInput, *, deadline: float | None, protocol: str = "convserve"
    ) -> types.PredictOutput: ...

    async def convolve(
        self, value: types.ConvolveInput, *, deadline: float | None
    ) -> types.ConvolveOutput: ...

    async def fit_kernel(
        self, value: types.FitKernelInput, *, deadline: float | None
    ) -> types.FitKernelOutput: ...

    async def feature_maps(
        self, value: types.FeatureMapsInput, *, deadline: float | None
    ) -> types.FeatureMapsOutput: ...

    def metadata(self, ref: types.ModelRef) -> types.ModelMetadata:
        """The model's inputs, outputs, layers and training record; NotFound if unknown."""
        ...

    def models(self) -> list[types.ModelStatus]:
        """Every configured model, by name."""
        ...

    def model_status(self, name: str) -> types.ModelStatus:
        """One model's versions and states; errors.NotFound if it is not configured."""
        ...

    def add_ready_listener(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(ready)` on the event loop whenever readiness (overall or of
        one model) may have changed after start-up."""
        ...

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> bool: ...

    def version_of(self, ref: types.ModelRef) -> int:
        """The loaded version `ref` names: its pinned version, its label's, or the serving
        one. Raises errors.NotFound (unknown model, version or label), Unavailable."""
        ...
