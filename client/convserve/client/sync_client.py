"""The blocking client."""

from __future__ import annotations

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
    ModelMetadata,
    PredictResult,
)
from convserve.client.retry import Attempts, Deadline, RetryPolicy
from convserve.v1 import convserve_pb2_grpc

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
    `model_name`: empty for the server's default model.
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
    ) -> None:
        self._config = make_config(
            target,
            timeout_s=timeout_s,
            tls=tls,
            token=token,
            retries=retries,
            max_batch_images=max_batch_images,
            model_name=model_name,
        )
        self._rng = new_rng()
        self._channel = sync_channel(target, self._config.tls, self._config.options)
        self._stub = convserve_pb2_grpc.ConvServeStub(self._channel)
        self._health = self._channel.unary_unary(
            health.CHECK_METHOD,
            request_serializer=health.HealthCheckRequest.SerializeToString,
            response_deserializer=health.HealthCheckResponse.FromString,
        )

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
                time.sleep(attempts.after_failure(error))

    def predict(
        self,
        images: ImagesInput,
        *,
        model_version: int | None = None,
        timeout_s: float | None = None,
    ) -> PredictResult:
        """Classify digits: an array, a list of arrays, or image files / PNG or JPEG bytes.

        See `convserve.client.images` for the accepted shapes and what is sent.
        """
        requests = convert.predict_requests(
            images,
            max_batch_images=self._config.max_batch_images,
            spec=convert.model_spec(self._config.model_name, model_version),
        )
        deadline = self._config.deadline(timeout_s)
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
        model_version: int | None = None,
        timeout_s: float | None = None,
    ) -> FeatureMapsResult:
        """The convolution layers' activations for one image (all layers when `layers` is empty)."""
        request = convert.feature_maps_request(
            image, layers, convert.model_spec(self._config.model_name, model_version)
        )
        response = self._call(self._stub.GetFeatureMaps, request, self._config.deadline(timeout_s))
        return convert.feature_maps_result(response)

    def metadata(
        self, *, model_version: int | None = None, timeout_s: float | None = None
    ) -> ModelMetadata:
        request = convert.metadata_request(
            convert.model_spec(self._config.model_name, model_version)
        )
        response = self._call(
            self._stub.GetModelMetadata, request, self._config.deadline(timeout_s)
        )
        return convert.metadata_result(response)

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
        wait = health.ServingWait(timeout_s, poll_interval_s)
        while True:
            try:
                status = self.health(service, timeout_s=wait.call_timeout_s())
            except ConvServeError as error:
                wait.failed(error)
            else:
                if wait.answered(status):
                    return status
            time.sleep(poll_interval_s)
