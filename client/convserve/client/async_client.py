"""The asyncio client: the same methods as `ConvServeClient`, awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from convserve.client import convert, health
from convserve.client.aio import AsyncClosing, gather_or_cancel
from convserve.client.channel import TlsConfig, aio_channel
from convserve.client.config import (
    ASYNC_SPLIT_CONCURRENCY,
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
from convserve.client.stream import PredictStream
from convserve.v1 import convserve_pb2_grpc
from convserve.v1.images import ImageShape

Response = TypeVar("Response")


class AsyncConvServeClient(AsyncClosing):
    """Calls a convserve server from asyncio code. Use ``async with``, or await `close()`.

    The arguments are those of `ConvServeClient` (`sleep` is awaited). A batch larger than
    `max_batch_images` is sent as several requests, a few at a time.
    Concurrent calls for a model whose input shape is not known yet share one
    GetModelMetadata call.
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
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
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
        self._input_shapes: dict[str, asyncio.Future[ImageShape]] = {}
        self._channel = aio_channel(target, self._config.tls, self._config.options)
        self._stub = convserve_pb2_grpc.ConvServeStub(self._channel)
        self._health = health.check_method(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(
        self, method: Callable[..., Awaitable[Response]], request: Any, deadline: Deadline
    ) -> Response:
        attempts = Attempts(self._config.retry, deadline, self._rng)
        while True:
            try:
                return await method(
                    request, timeout=attempts.timeout_s(), metadata=self._config.metadata
                )
            except grpc.RpcError as error:
                await self._sleep(attempts.after_failure(error))

    def _model(self, model: str) -> str:
        return model or self._config.model_name

    async def _input_shape(
        self,
        model: str,
        version: int | None,
        deadline: Deadline | None = None,
        version_label: str | None = None,
    ) -> ImageShape:
        """The model's (H, W, C), asked for (of the version named) once per model name
        (again after a failure)."""
        known = self._input_shapes.get(model)
        if known is None or (known.done() and (known.cancelled() or known.exception())):
            request = convert.metadata_request(convert.model_spec(model, version, version_label))
            call_deadline = deadline or self._config.deadline(None)

            async def fetch() -> ImageShape:
                response = await self._call(self._stub.GetModelMetadata, request, call_deadline)
                return convert.metadata_result(response).input_shape

            known = asyncio.ensure_future(fetch())
            # Marks a failure as seen even when every caller waiting for it gave up.
            known.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._input_shapes[model] = known
        # Shielded: one caller giving up must not fail the others waiting for it.
        return await asyncio.shield(known)

    def _remember(self, model: str, meta: ModelMetadata) -> ModelMetadata:
        if meta.inputs and model not in self._input_shapes:
            try:
                shape = meta.input_shape
            except ConvServeError:
                return meta  # reported when an image has to be read against it
            known: asyncio.Future[ImageShape] = asyncio.get_running_loop().create_future()
            known.set_result(shape)
            self._input_shapes[model] = known
        return meta

    async def predict(
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
            shape=await self._input_shape(model, model_version, deadline, version_label),
        )
        limit = asyncio.Semaphore(ASYNC_SPLIT_CONCURRENCY)

        async def one(request: Any) -> Any:
            async with limit:
                return await self._call(self._stub.Predict, request, deadline)

        responses = await gather_or_cancel([one(r) for r in requests])
        return convert.predict_result(requests, responses)

    def predict_stream(self, *, model: str = "", timeout_s: float | None = None) -> PredictStream:
        """Open a PredictStream: many concurrent `predict` calls over one gRPC call.

        Cheaper per request than `predict` when many small requests are in
        flight at once. `model`: the model the stream's calls with an empty
        `model` get (empty: the client's `model_name`). `timeout_s` bounds the
        whole stream (default: none). Use ``async with client.predict_stream()
        as stream: await stream.predict(images)``.
        """
        return PredictStream(
            self._stub,
            metadata=self._config.metadata,
            model_name=self._model(model),
            input_shape=lambda name, version, label: self._input_shape(name, version, None, label),
            max_batch_images=self._config.max_batch_images,
            timeout_s=timeout_s,
        )

    async def convolve(
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
        response = await self._call(self._stub.Convolve, request, self._config.deadline(timeout_s))
        return convert.convolve_result(response)

    async def fit_kernel(
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
        response = await self._call(self._stub.FitKernel, request, self._config.deadline(timeout_s))
        return convert.fit_kernel_result(response)

    async def feature_maps(
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
            image,
            layers,
            spec,
            await self._input_shape(model, model_version, deadline, version_label),
        )
        response = await self._call(self._stub.GetFeatureMaps, request, deadline)
        return convert.feature_maps_result(response)

    async def metadata(
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
        response = await self._call(
            self._stub.GetModelMetadata, request, self._config.deadline(timeout_s)
        )
        return self._remember(model, convert.metadata_result(response))

    async def list_models(self, *, timeout_s: float | None = None) -> ModelList:
        """Every model the server is configured with, its versions and their states."""
        response = await self._call(
            self._stub.ListModels, convert.list_models_request(), self._config.deadline(timeout_s)
        )
        return convert.list_models_result(response)

    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """The gRPC health status: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
        response = await self._call(
            self._health, health.check_request(service), self._config.deadline(timeout_s)
        )
        return health.status_name(response)

    async def wait_for_serving(
        self, timeout_s: float, *, service: str = "", poll_interval_s: float = 0.25
    ) -> str:
        """Poll `health` until SERVING or `timeout_s` passes; return the last status.

        Raises the last error if the server never answered.
        """
        wait = health.ServingWait(timeout_s, poll_interval_s, self._config.clock)
        while True:
            try:
                status = await self.health(service, timeout_s=wait.call_timeout_s())
            except ConvServeError as error:
                wait.failed(error)
            else:
                if wait.answered(status):
                    return status
            await self._sleep(poll_interval_s)
