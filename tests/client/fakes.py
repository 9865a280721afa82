"""Small stand-in servers for client tests: convserve.v1 and the Open Inference Protocol.

They behave predictably on purpose: a fixed delay, a number of UNAVAILABLE
answers before succeeding, a one-second stall, a required token. The
predicted digit is the first pixel's value modulo 10, so tests can tell
which image an answer belongs to.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from convserve.client.tensor import TensorError, from_tensor, to_tensor
from convserve.v1 import convserve_pb2 as pb
from convserve.v1 import convserve_pb2_grpc, tensor_pb2

MAX_WORKERS = 128


@dataclass
class Behaviour:
    """How a fake server misbehaves; shared by its servicers."""

    delay_s: float = 0.0
    first_call_delay_s: float = 0.0  # extra delay for the first call only
    fail_first: int = 0  # answer this many calls (per method) with `fail_code` first
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    stall_after_s: float | None = None  # the first call this long after start stalls
    stall_s: float = 1.0  # ... the whole server for this long
    token: str | None = None  # required bearer token
    max_images: int = 1000
    calls: Counter[str] = field(default_factory=Counter)
    images: list[int] = field(default_factory=list)  # images per Predict request, in order
    dtypes: list[str] = field(default_factory=list)  # element type of each Predict request
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stall_until: float = 0.0
    _stalled: bool = False
    _total_calls: int = 0
    _created: float = field(default_factory=time.monotonic)

    def enter(self, method: str, context: grpc.ServicerContext) -> None:
        """Count the call, check the token, fail or wait as configured."""
        with self._lock:
            self.calls[method] += 1
            self._total_calls += 1
            attempt = self.calls[method]
            first_call = self._total_calls == 1
            now = time.monotonic()
            if (
                self.stall_after_s is not None
                and not self._stalled
                and now - self._created >= self.stall_after_s
            ):
                self._stalled = True
                self._stall_until = now + self.stall_s
            stall_until = self._stall_until
        if self.token is not None:
            sent = dict(context.invocation_metadata()).get("authorization")
            if sent != f"Bearer {self.token}":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        if attempt <= self.fail_first:
            context.abort(self.fail_code, f"failing on purpose ({attempt}/{self.fail_first})")
        wait = stall_until - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.first_call_delay_s and first_call:
            time.sleep(self.first_call_delay_s)


def probabilities_for(digits: np.ndarray) -> np.ndarray:
    probs = np.full((digits.shape[0], 10), 0.01, dtype=np.float32)
    probs[np.arange(digits.shape[0]), digits] = 0.91
    return probs


def digits_of(images: np.ndarray) -> np.ndarray:
    """The fake's "model": the first pixel (as 0-255) modulo 10."""
    flat = images.reshape(images.shape[0], -1)
    first = flat[:, 0] if flat.dtype == np.uint8 else np.rint(flat[:, 0] * 255.0)
    return (first.astype(np.int64) % 10).astype(np.int32)


def correlate(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Reference 'valid' 2-D cross-correlation."""
    kh, kw = k.shape
    out = np.zeros((x.shape[0] - kh + 1, x.shape[1] - kw + 1), dtype=x.dtype)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = np.sum(x[i : i + kh, j : j + kw] * k)
    return out


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _MessageContext:
    """One stream message's view of the call: aborting fails the message, not the stream."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


class FakeConvServe(convserve_pb2_grpc.ConvServeServicer):
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour

    def Predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        self.behaviour.enter("Predict", context)
        return self._predict(request, context)

    def PredictStream(self, request_iterator: Any, context: Any) -> Any:
        """Answers each message in turn, as Predict would (errors as error answers)."""
        for message in request_iterator:
            one = _MessageContext(context)
            try:
                self.behaviour.enter("PredictStream", one)
                response = self._predict(message.request, one)
            except _Aborted as aborted:
                error = pb.StreamError(code=aborted.code.value[0], message=aborted.details)
                yield pb.PredictStreamResponse(id=message.id, error=error)
            else:
                yield pb.PredictStreamResponse(id=message.id, response=response)

    def _predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        try:
            images = from_tensor(request.images, "images")
        except TensorError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if images.ndim not in (2, 3, 4) or images[0].size != 784:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"images: bad shape {images.shape}")
        if images.shape[0] > self.behaviour.max_images:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"images: {images.shape[0]} is more images than {self.behaviour.max_images}",
            )
        with self.behaviour._lock:
            self.behaviour.images.append(int(images.shape[0]))
            self.behaviour.dtypes.append(images.dtype.name)
        digits = digits_of(images)
        probs = probabilities_for(digits)
        return pb.PredictResponse(
            model_name=request.model_spec.name or "fake",
            model_version=request.model_spec.version
            if request.model_spec.HasField("version")
            else 7,
            digits=digits.tolist(),
            confidences=probs.max(axis=1).tolist(),
            probabilities=to_tensor(probs),
        )

    def Convolve(self, request: pb.ConvolveRequest, context: Any) -> pb.ConvolveResponse:
        self.behaviour.enter("Convolve", context)
        x = from_tensor(request.input, "input")
        k = from_tensor(request.kernel, "kernel")
        if x.ndim == 4:  # the load generator's [N,H,W,1] batches: answer with the input
            return pb.ConvolveResponse(output=to_tensor(x))
        if k.dtype != x.dtype:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "kernel: dtype differs from input")
        if request.options.mode == pb.CONVOLUTION_MODE_CONVOLUTION:
            k = k[::-1, ::-1]
        if k.shape[0] > x.shape[0] or k.shape[1] > x.shape[1]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "kernel: larger than the input")
        y = correlate(x, k)
        if request.HasField("bias"):
            y = y + from_tensor(request.bias, "bias")[0]
        return pb.ConvolveResponse(output=to_tensor(y))

    def FitKernel(self, request: pb.FitKernelRequest, context: Any) -> pb.FitKernelResponse:
        self.behaviour.enter("FitKernel", context)
        shape = tuple(request.kernel_shape)
        kernel = np.arange(np.prod(shape), dtype=np.float64).reshape(shape) / 10.0
        response = pb.FitKernelResponse(
            kernel=to_tensor(kernel),
            loss=[1.0, 0.5, 0.25, 0.125],
            steps=3,
            stop_reason="max_steps",
        )
        if request.fit_bias:
            response.bias.CopyFrom(to_tensor(np.array([0.5])))
        return response

    def GetFeatureMaps(
        self, request: pb.GetFeatureMapsRequest, context: Any
    ) -> pb.GetFeatureMapsResponse:
        self.behaviour.enter("GetFeatureMaps", context)
        image = from_tensor(request.image, "image")
        if image.size != 784:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image: expected one 28x28 image")
        shapes = {"conv1": (26, 26, 4), "conv2": (11, 11, 2)}
        wanted = list(request.layers) or list(shapes)
        maps = []
        for name in wanted:
            if name not in shapes:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"layers: unknown layer {name!r}")
            values = np.arange(np.prod(shapes[name]), dtype=np.float32).reshape(shapes[name])
            maps.append(pb.FeatureMap(layer=name, activations=to_tensor(values)))
        return pb.GetFeatureMapsResponse(model_name="fake", model_version=7, feature_maps=maps)

    def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: Any
    ) -> pb.GetModelMetadataResponse:
        self.behaviour.enter("GetModelMetadata", context)
        if request.model_spec.name not in ("", "fake"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model_spec.name!r} not found")
        return pb.GetModelMetadataResponse(
            model_name="fake",
            loaded_versions=[6, 7],
            serving_version=7,
            inputs=[
                pb.TensorSpec(
                    name="images",
                    dtypes=[tensor_pb2.DATA_TYPE_UINT8, tensor_pb2.DATA_TYPE_FLOAT32],
                    shape=[-1, 28, 28, 1],
                )
            ],
            outputs=[
                pb.TensorSpec(
                    name="probabilities", dtypes=[tensor_pb2.DATA_TYPE_FLOAT32], shape=[-1, 10]
                )
            ],
            layers=[
                pb.LayerInfo(
                    name="conv1",
                    type="Conv2D",
                    output_shape=[26, 26, 4],
                    parameters=40,
                    trainable=True,
                ),
                pb.LayerInfo(
                    name="dense", type="Dense", output_shape=[10], parameters=1210, trainable=True
                ),
            ],
            training=pb.TrainingRecord(
                dataset="sample",
                architecture="keras",
                hyperparameters={"epochs": "1", "batch_size": "32"},
                test_accuracy=0.9,
                train_examples=1000,
                test_examples=100,
                training_time_s=3.5,
                exported_at="2025-01-01T00:00:00Z",
                tensorflow_version="2.21.0",
                total_parameters=1250,
            ),
            device="/CPU:0",
        )


class FakeOip:
    """A tiny KServe v2 / Open Inference Protocol server (tritonclient's generated stubs)."""

    def __init__(self, behaviour: Behaviour, model: str = "mnist") -> None:
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.pb = service_pb2
        self.model = model
        self.behaviour = behaviour
        outer = self

        class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
            def ModelMetadata(self, request: Any, context: Any) -> Any:
                return outer.metadata(request, context)

            def ModelInfer(self, request: Any, context: Any) -> Any:
                return outer.infer(request, context)

        self.servicer = Servicer()
        self.add = service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server

    def metadata(self, request: Any, context: Any) -> Any:
        if request.name != self.model:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        response = self.pb.ModelMetadataResponse(name=self.model, versions=["1"], platform="fake")
        response.inputs.add(name="images", datatype="UINT8", shape=[-1, 28, 28, 1])
        response.outputs.add(name="probabilities", datatype="FP32", shape=[-1, 10])
        return response

    def infer(self, request: Any, context: Any) -> Any:
        self.behaviour.enter("ModelInfer", context)
        if request.model_name != self.model or len(request.inputs) != 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected one input for the model")
        tensor = request.inputs[0]
        shape = list(tensor.shape)
        raw = request.raw_input_contents[0]
        if tensor.datatype != "UINT8" or len(raw) != int(np.prod(shape)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "raw input does not match the shape")
        images = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
        with self.behaviour._lock:
            self.behaviour.images.append(shape[0])
        probs = probabilities_for(digits_of(images))
        response = self.pb.ModelInferResponse(model_name=self.model, model_version="1")
        response.outputs.add(name="probabilities", datatype="FP32", shape=list(probs.shape))
        response.raw_output_contents.append(probs.astype("<f4").tobytes())
        return response


@dataclass
class RunningFake:
    port: int
    behaviour: Behaviour
    health: health.HealthServicer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def serve_fake(
    behaviour: Behaviour | None = None,
    *,
    oip: bool = False,
    credentials: grpc.ServerCredentials | None = None,
) -> Iterator[RunningFake]:
    """Run a fake convserve (and optionally OIP) server with a health service on a free port."""
    behaviour = behaviour or Behaviour()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_WORKERS))
    convserve_pb2_grpc.add_ConvServeServicer_to_server(FakeConvServe(behaviour), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if oip:
        fake_oip = FakeOip(behaviour)
        fake_oip.add(fake_oip.servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield RunningFake(port=port, behaviour=behaviour, health=health_servicer)
    finally:
        server.stop(grace=None)
