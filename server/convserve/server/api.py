"""The typed edges of the protocol code: the runtime it calls and the metrics it counts in.

`runtime.Runtime` implements `RuntimeApi`; tests share one fake of it
(``tests/fake_runtime.py``). Servicers type their runtime as `RuntimeApi`, so a
method they need and the runtime lacks is a type error, not a failed call.
`metrics.Metrics` implements `RequestMetrics`, the request accounting every
protocol does.

Deadlines are absolute `time.monotonic()` values (None: no deadline). Every
method raises the `errors` exceptions (NotFound for an unknown model or
version, InvalidArgument naming the field, Unavailable, ...), which one
mapping turns into status codes (`errors.status_of`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from convserve.server import types

# The `model` metrics label of a request naming a model that is not configured: one
# label for them all, so that clients cannot grow the label set without bound.
UNKNOWN_MODEL_LABEL = "_unknown"


class RequestMetrics(Protocol):
    """What protocol code records of each request (`metrics.Metrics` implements it)."""

    def request_started(self, protocol: str, rpc: str, model: str = "") -> None:
        """A request of `rpc` to `model` (its `model` label) has arrived."""
        ...

    def request_finished(
        self, protocol: str, rpc: str, code: str, seconds: float, model: str = ""
    ) -> None:
        """It ended with status `code` (a gRPC status code name) after `seconds`."""
        ...


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
        name if configured (the default model's for ""), else `UNKNOWN_MODEL_LABEL`."""
        ...

    async def predict(
        self, value: types.PredictInput, *, deadline: float | None
    ) -> types.PredictOutput:
        """Class probabilities for `value.images` from the model version `value.model`
        names, resolved and leased once: the images are checked against that version's
        input (off the event loop when large) and batched with concurrent requests.

        Raises errors.InvalidArgument naming `value.field`, NotFound (unknown model,
        version or label), ResourceExhausted, DeadlineExceeded, Unavailable.
        """
        ...

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
