"""The blocking client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import numpy as np

from convserve.client import convert, health
from convserve.client.channel import TlsConfig, sync_channel
from convserve.client.config import (
    DEFAULT_MAX_BATCH_IMAGES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    make_config,
    new_rng,
)
from convserve.client.convert import PaddingArg, Pair
from convserve.client.errors import ConvServeError
from convserve.client.images import ImagesInput, ImageSource
from convserve.client.results import (
    FeatureMapsResult,
    FitKernelResult,
    ModelList,
    ModelMetadata,
    PredictResult,
)
from convserve.client.retry import Attempts, Deadline, RetryPolicy
from convserve.v1 import convserve_pb2_grpc
from convserve.v1.images import ImageShape

Response = TypeVar("Response")


class ConvServeClient:
    """Calls a convserve server. Use as a context manager, or call `close()`.

    `target`: ``host:port``, or ``dns:///name:port`` to spread calls over
    every address the name resolves to (see `convserve.client.channel`).
    `timeout_s`: the default deadline of each method call, covering all its
    retries and, for large batches, all its requests (None: no deadline).
    `tls`: True for TLS with the system's CA roots, or a `TlsConfig`.
    `token`: sent as ``authorization: Bearer <token>``.
    `retries`: retries after UNAVAILABLE / RESOURCE_EXHAUSTED (or a RetryPolicy).
    `max_batch_images`: `predict` sends at most this many images per request
    and splits larger batches; keep it at or below the server's
    --max-images-per-request.
    `model_name`: the model that calls with an empty `model` get; empty for
    the server's default model.
    `clock` and `sleep`: the time that deadlines are measured in and how the
    client waits between retries and health polls (`time.monotonic` and
    `time.sleep`; tests pass fakes).

    Arrays and image files are read against the model's input shape, which
    the client asks for (GetModelMetadata) once per model name and keeps;
    the versions of one model are expected to take the same input.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        tls: bool | TlsConfig = False,
        token: str | None = None,
        retries: int | RetryPolicy = 3,
        max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES,
        model_name: str = "",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._sleep = sleep
        self._config = make_config(
            target,
            timeout_s=timeout_s,
            tls=tls,
            token=token,
            retries=retries,
            max_batch_images=max_batch_images,
            model_name=model_name,
            clock=clock,
        )
        self._rng = new_rng()
        self._input_shapes: dict[str, ImageShape] = {}
        self._shapes_lock = threading.Lock()
        self._channel = sync_channel(target, self._config.tls, self._config.options)
        self._stub = convserve_pb2_grpc.ConvServeStub(self._channel)
        self._health = health.check_method(self._channel)

    def __enter__(self) -> ConvServeClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Response], request: Any, deadline: Deadline) -> Response:
        attempts = Attempts(self._config.retry, deadline, self._rng)
        while True:
            try:
                return method(request, timeout=attempts.timeout_s(), metadata=self._config.metadata)
            except grpc.RpcError as error:
                self._sleep(attempts.after_failure(error))

    def _model(self, model: str) -> str:
        return model or self._config.model_name

    def _input_shape(
        self,
        model: str,
        version: int | None,
        deadline: Deadline,
        version_label: str | None = None,
    ) -> ImageShape:
        """The model's (H, W, C), asked for (of the version named) once per model name."""
        with self._shapes_lock:
            shape = self._input_shapes.get(model)
        if shape is None:
            request = convert.metadata_request(convert.model_spec(model, version, version_label))
            response = self._call(self._stub.GetModelMetadata, request, deadline)
            shape = self._remember(model, convert.metadata_result(response)).input_shape
        return shape

    def _remember(self, model: str, meta: ModelMetadata) -> ModelMetadata:
        if meta.inputs:
            try:
                shape = meta.input_shape
            except ConvServeError:
                return meta  # reported when an image has to be read against it
            with self._shapes_lock:
                self._input_shapes[model] = shape
        return meta

    def predict(
        self,
        images: ImagesInput,
        *,
        model: str = "",
        model_version: int | None = None,
        version_label: str | None = None,
        timeout_s: float | None = None,
    ) -> PredictResult:
        """Classify images: an array, a list of arrays, or image files / PNG or JPEG bytes.

        `model`: empty for the client's `model_name` (by default the server's
        default model). `model_version` or `version_label` (a label of the
        server's model config file) pins a version; neither: the serving one.
        See `convserve.client.images` for the accepted shapes and what is sent.
        """
        model = self._model(model)
        deadline = self._config.deadline(timeout_s)
        spec = convert.model_spec(model, model_version, version_label)
        requests = convert.predict_requests(
            images,
            max_batch_images=self._config.max_batch_images,
            spec=spec,
            shape=self._input_shape(model, model_version, deadline, version_label),
        )
        responses = [self._call(self._stub.Predict, r, deadline) for r in requests]
        return convert.predict_result(requests, responses)

    def convolve(
        self,
        input: object,
        kernel: object,
        bias: object | None = None,
        *,
        mode: str = "cross-correlation",
        strides: Pair = 1,
        padding: PaddingArg = "valid",
        dilations: Pair = 1,
        timeout_s: float | None = None,
    ) -> np.ndarray:
        """Apply `kernel` ([kh,kw] or [kh,kw,C,F]) to `input` ([H,W] or [N,H,W,C]).

        float32 input is computed in float32; float64 and integer input in float64.
        """
        options = convert.convolution_options(
            mode=mode, strides=strides, padding=padding, dilations=dilations
        )
        request = convert.convolve_request(input, kernel, bias, options)
        response = self._call(self._stub.Convolve, request, self._config.deadline(timeout_s))
        return convert.convolve_result(response)

    def fit_kernel(
        self,
        inputs: object,
        targets: object,
        kernel_shape: Sequence[int],
        *,
        fit_bias: bool = False,
        mode: str = "cross-correlation",
        strides: Pair = 1,
        padding: PaddingArg = "valid",
        dilations: Pair = 1,
        learning_rate: float | None = None,
        max_steps: int | None = None,
        tolerance: float = 0.0,
        seed: int = 0,
        timeout_s: float | None = None,
    ) -> FitKernelResult:
        """Learn the kernel (and bias) that maps `inputs` to `targets`."""
        options = convert.convolution_options(
            mode=mode, strides=strides, padding=padding, dilations=dilations
        )
        request = convert.fit_kernel_request(
            inputs,
            targets,
            kernel_shape,
            fit_bias=fit_bias,
            options=options,
            learning_rate=learning_rate,
            max_steps=max_steps,
            tolerance=tolerance,
            seed=seed,
        )
        response = self._call(self._stub.FitKernel, request, self._config.deadline(timeout_s))
        return convert.fit_kernel_result(response)

    def feature_maps(
        self,
        image: ImageSource,
        *,
        layers: Sequence[str] = (),
        model: str = "",
        model_version: int | None = None,
        version_label: str | None = None,
        timeout_s: float | None = None,
    ) -> FeatureMapsResult:
        """The convolution layers' activations for one image (all layers when `layers` is empty).

        `model_version` or `version_label` pins a version, as for `predict`.
        """
        model = self._model(model)
        deadline = self._config.deadline(timeout_s)
        spec = convert.model_spec(model, model_version, version_label)
        request = convert.feature_maps_request(
            image, layers, spec, self._input_shape(model, model_version, deadline, version_label)
        )
        response = self._call(self._stub.GetFeatureMaps, request, deadline)
        return convert.feature_maps_result(response)

    def metadata(
        self,
        *,
        model: str = "",
        model_version: int | None = None,
        version_label: str | None = None,
        timeout_s: float | None = None,
    ) -> ModelMetadata:
        """What the model is: versions, input shape, layers, class names, training record.

        `model_version` or `version_label` names the version described, as for `predict`.
        """
        model = self._model(model)
        request = convert.metadata_request(convert.model_spec(model, model_version, version_label))
        response = self._call(
            self._stub.GetModelMetadata, request, self._config.deadline(timeout_s)
        )
        return self._remember(model, convert.metadata_result(response))

    def list_models(self, *, timeout_s: float | None = None) -> ModelList:
        """Every model the server is configured with, its versions and their states."""
        response = self._call(
            self._stub.ListModels, convert.list_models_request(), self._config.deadline(timeout_s)
        )
        return convert.list_models_result(response)

    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The gRPC health status: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
        response = self._call(
            self._health, health.check_request(service), self._config.deadline(timeout_s)
        )
        return health.status_name(response)

    def wait_for_serving(
        self, timeout_s: float, *, service: str = "", poll_interval_s: float = 0.25
    ) -> str:
        """Poll `health` until SERVING or `timeout_s` passes; return the last status.

        Raises the last error if the server never answered.
        """
        wait = health.ServingWait(timeout_s, poll_interval_s, self._config.clock)
        while True:
            try:
                status = self.health(service, timeout_s=wait.call_timeout_s())
            except ConvServeError as error:
                wait.failed(error)
            else:
                if wait.answered(status):
                    return status
            self._sleep(poll_interval_s)
