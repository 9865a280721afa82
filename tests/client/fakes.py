"""Small stand-in servers for client tests: convserve.v1 and the Open Inference Protocol.

They behave predictably on purpose: a fixed delay, a delay that grows with
the requests in flight, a capacity beyond which requests queue, a number of
UNAVAILABLE answers before succeeding, a one-second stall, a required token,
replica names in trailing metadata. The fake
convserve server holds the models in `MODELS` (different input shapes and
class counts; "fake" is the default); each predicts class (first pixel's
value as 0-255) modulo its class count, so tests can tell which image an
answer belongs to.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from convserve.server.types import VersionStatus
from convserve.v1 import convserve_pb2 as pb
from convserve.v1 import convserve_pb2_grpc, tensor_pb2
from convserve.v1.tensor_codec import TensorError, from_tensor, to_tensor

MAX_WORKERS = 128
REPLICA_KEY = "convserve-replica"


@dataclass
class Behaviour:
    """How a fake server misbehaves; shared by its servicers."""

    delay_s: float = 0.0
    first_call_delay_s: float = 0.0  # extra delay for the first Predict call only
    # Extra delay given the calls in their delay (this one included) when it arrives.
    latency: Callable[[int], float] | None = None
    # At most this many calls take their delay at once; the others queue for a slot.
    capacity: int | None = None
    fail_after: int = 0  # the first this many calls (per method) succeed before failing ones
    fail_first: int = 0  # answer this many calls (per method) with `fail_code` first
    fail_methods: frozenset[str] | None = None  # the methods fail_first applies to (None: all)
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    stall_after_s: float | None = None  # the first call this long after start stalls
    stall_s: float = 1.0  # ... the whole server for this long
    token: str | None = None  # required bearer token
    max_images: int = 1000
    calls: Counter[str] = field(default_factory=Counter)
    images: list[int] = field(default_factory=list)  # images per Predict request, in order
    dtypes: list[str] = field(default_factory=list)  # element type of each Predict request
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # of each Predict request
    # (method, model name as sent) of every call that names a model, in order.
    models: list[tuple[str, str]] = field(default_factory=list)
    # Names sent in turn as convserve-replica trailing metadata: one per unary call or
    # per stream (none when empty).
    replicas: tuple[str, ...] = ()
    # (time.monotonic() on arrival, method) of every call, in order.
    arrivals: list[tuple[float, str]] = field(default_factory=list)
    # (name, datatype, shape, raw bytes) of each OIP input the undeclared model received.
    oip_inputs: list[tuple[str, str, tuple[int, ...], int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _in_flight: int = 0
    _replica_turn: int = 0
    _slots: threading.Semaphore | None = None
    _stall_until: float = 0.0
    _stalled: bool = False
    _created: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.capacity is not None:
            self._slots = threading.Semaphore(self.capacity)

    def name_replica(self, context: grpc.ServicerContext) -> None:
        """Send the next of `replicas` as the call's trailing metadata (if any)."""
        if not self.replicas:
            return
        with self._lock:
            name = self.replicas[self._replica_turn % len(self.replicas)]
            self._replica_turn += 1
        context.set_trailing_metadata(((REPLICA_KEY, name),))

    def _take_delay(self) -> None:
        if self._slots is not None:
            with self._slots:
                time.sleep(self.delay_s)
            return
        with self._lock:
            self._in_flight += 1
            in_flight = self._in_flight
        try:
            time.sleep(self.delay_s + (self.latency(in_flight) if self.latency else 0.0))
        finally:
            with self._lock:
                self._in_flight -= 1

    def enter(self, method: str, context: grpc.ServicerContext) -> None:
        """Count the call, check the token, fail or wait as configured."""
        with self._lock:
            self.arrivals.append((time.monotonic(), method))
            self.calls[method] += 1
            attempt = self.calls[method]
            first_call = method == "Predict" and attempt == 1
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
        failing = attempt - self.fail_after
        if 0 < failing <= self.fail_first and (
            self.fail_methods is None or method in self.fail_methods
        ):
            context.abort(self.fail_code, f"failing on purpose ({failing}/{self.fail_first})")
        wait = stall_until - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        if self.delay_s or self.latency or self._slots:
            self._take_delay()
        if self.first_call_delay_s and first_call:
            time.sleep(self.first_call_delay_s)


def probabilities_for(digits: np.ndarray, classes: int = 10) -> np.ndarray:
    """0.01 for every class but the chosen one, which gets the rest (0.91 of ten)."""
    probs = np.full((digits.shape[0], classes), 0.01, dtype=np.float32)
    probs[np.arange(digits.shape[0]), digits] = 1.0 - 0.01 * (classes - 1)
    return probs


def digits_of(images: np.ndarray, classes: int = 10) -> np.ndarray:
    """The fake's "model": the first pixel (as 0-255) modulo the number of classes."""
    flat = images.reshape(images.shape[0], -1)
    first = flat[:, 0] if flat.dtype == np.uint8 else np.rint(flat[:, 0] * 255.0)
    return (first.astype(np.int64) % classes).astype(np.int32)


@dataclass(frozen=True)
class FakeModel:
    name: str
    shape: tuple[int, int, int]  # (H, W, C)
    classes: int
    class_names: tuple[str, ...]  # empty: the model names none
    versions: tuple[VersionStatus, ...]
    ready: bool = True
    confusion_matrix: tuple[int, ...] = ()  # row-major [K,K]; empty: none recorded
    error: str = ""  # why no version serves
    memory_bytes: int = 0
    labels: tuple[tuple[str, int], ...] = ()  # version labels in effect
    label_errors: tuple[str, ...] = ()

    @property
    def serving_version(self) -> int | None:
        return next((v.version for v in self.versions if v.serving), None)

    def label(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)


FASHION = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DEFAULT_MODEL = "fake"
MODELS = {
    m.name: m
    for m in (
        FakeModel(
            "fake",
            (28, 28, 1),
            10,
            (),
            (VersionStatus(6, "AVAILABLE"), VersionStatus(7, "AVAILABLE", serving=True)),
            memory_bytes=96 * 2**20,
            labels=(("canary", 7), ("stable", 6)),
            label_errors=("label 'next' -> 8 not applied: version 8 is not loaded",),
        ),
        FakeModel("fashion", (28, 28, 1), 10, FASHION, (VersionStatus(1, "AVAILABLE", True),)),
        FakeModel(
            "digits8",
            (8, 8, 1),
            10,
            tuple("0123456789"),
            (VersionStatus(1, "AVAILABLE", serving=True), VersionStatus(2, "LOADING")),
        ),
        FakeModel(
            "rgb",
            (4, 4, 3),
            3,
            ("red", "green", "blue"),
            (VersionStatus(3, "AVAILABLE", serving=True),),
            confusion_matrix=(5, 1, 0, 0, 6, 0, 1, 0, 4),
        ),
        FakeModel(
            "broken",
            (28, 28, 1),
            10,
            (),
            (VersionStatus(1, "END", error="no serving_default signature"),),
            ready=False,
            error="no version loads",
        ),
    )
}


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

    def _model(self, method: str, spec: pb.ModelSpec, context: Any) -> tuple[FakeModel, int]:
        """The model and version a request asks for, or abort as the real server would."""
        with self.behaviour._lock:
            self.behaviour.models.append((method, spec.name))
        model = MODELS.get(spec.name or DEFAULT_MODEL)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {spec.name!r} not found")
        assert model is not None
        if not model.ready:
            context.abort(
                grpc.StatusCode.UNAVAILABLE, f"model {model.name!r} has no usable version"
            )
        available = [v.version for v in model.versions if v.state == "AVAILABLE"]
        if spec.HasField("version"):
            if spec.version not in available:
                context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"version {spec.version} of model {model.name!r} is not loaded",
                )
            return model, spec.version
        serving = model.serving_version
        assert serving is not None
        return model, serving

    def Predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        self.behaviour.enter("Predict", context)
        response = self._predict(request, context, "Predict")
        self.behaviour.name_replica(context)
        return response

    def PredictStream(self, request_iterator: Any, context: Any) -> Any:
        """Answers each message in turn, as Predict would (errors as error answers)."""
        self.behaviour.name_replica(context)  # sent when the stream ends
        for message in request_iterator:
            one = _MessageContext(context)
            try:
                self.behaviour.enter("PredictStream", one)
                response = self._predict(message.request, one, "PredictStream")
            except _Aborted as aborted:
                error = pb.StreamError(code=aborted.code.value[0], message=aborted.details)
                yield pb.PredictStreamResponse(id=message.id, error=error)
            else:
                yield pb.PredictStreamResponse(id=message.id, response=response)

    def _predict(self, request: pb.PredictRequest, context: Any, method: str) -> pb.PredictResponse:
        model, version = self._model(method, request.model_spec, context)
        try:
            images = from_tensor(request.images, "images")
        except TensorError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        h, w, c = model.shape
        accepted = [(h, w, c), (h * w * c,)] + ([(h, w)] if c == 1 else [])
        if images.ndim < 2 or images.shape[1:] not in accepted:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"images: [N,{h},{w},{c}] expected, got {list(images.shape)}",
            )
        if images.shape[0] > self.behaviour.max_images:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"images: {images.shape[0]} is more images than {self.behaviour.max_images}",
            )
        with self.behaviour._lock:
            self.behaviour.images.append(int(images.shape[0]))
            self.behaviour.dtypes.append(images.dtype.name)
            self.behaviour.shapes.append(tuple(images.shape))
        digits = digits_of(images, model.classes)
        probs = probabilities_for(digits, model.classes)
        return pb.PredictResponse(
            model_name=model.name,
            model_version=version,
            digits=digits.tolist(),
            confidences=probs.max(axis=1).tolist(),
            probabilities=to_tensor(probs),
            labels=[model.label(int(d)) for d in digits],
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

    @staticmethod
    def layer_shapes(model: FakeModel) -> dict[str, tuple[int, int, int]]:
        """conv1 (3x3 valid, 4 filters), conv2 (after 2x2 pooling, 3x3 valid, 2 filters)."""
        h, w, _ = model.shape
        return {
            "conv1": (h - 2, w - 2, 4),
            "conv2": (max(1, (h - 2) // 2 - 2), max(1, (w - 2) // 2 - 2), 2),
        }

    def GetFeatureMaps(
        self, request: pb.GetFeatureMapsRequest, context: Any
    ) -> pb.GetFeatureMapsResponse:
        self.behaviour.enter("GetFeatureMaps", context)
        model, version = self._model("GetFeatureMaps", request.model_spec, context)
        image = from_tensor(request.image, "image")
        h, w, c = model.shape
        if image.size != h * w * c:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"image: expected one {h}x{w}x{c} image, got {list(image.shape)}",
            )
        with self.behaviour._lock:
            self.behaviour.shapes.append(tuple(image.shape))
        shapes = self.layer_shapes(model)
        wanted = list(request.layers) or list(shapes)
        maps = []
        for name in wanted:
            if name not in shapes:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"layers: unknown layer {name!r}")
            values = np.arange(np.prod(shapes[name]), dtype=np.float32).reshape(shapes[name])
            maps.append(pb.FeatureMap(layer=name, activations=to_tensor(values)))
        return pb.GetFeatureMapsResponse(
            model_name=model.name, model_version=version, feature_maps=maps
        )

    def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: Any
    ) -> pb.GetModelMetadataResponse:
        self.behaviour.enter("GetModelMetadata", context)
        model, version = self._model("GetModelMetadata", request.model_spec, context)
        shapes = self.layer_shapes(model)
        return pb.GetModelMetadataResponse(
            model_name=model.name,
            loaded_versions=[v.version for v in model.versions if v.state == "AVAILABLE"],
            serving_version=version,
            inputs=[
                pb.TensorSpec(
                    name="images",
                    dtypes=[tensor_pb2.DATA_TYPE_UINT8, tensor_pb2.DATA_TYPE_FLOAT32],
                    shape=[-1, *model.shape],
                )
            ],
            outputs=[
                pb.TensorSpec(
                    name="probabilities",
                    dtypes=[tensor_pb2.DATA_TYPE_FLOAT32],
                    shape=[-1, model.classes],
                )
            ],
            layers=[
                pb.LayerInfo(
                    name="conv1",
                    type="Conv2D",
                    output_shape=shapes["conv1"],
                    parameters=40,
                    trainable=True,
                ),
                pb.LayerInfo(
                    name="dense",
                    type="Dense",
                    output_shape=[model.classes],
                    parameters=1210,
                    trainable=True,
                ),
            ],
            training=pb.TrainingRecord(
                dataset="sample" if model.name == DEFAULT_MODEL else model.name,
                architecture="keras",
                hyperparameters={"epochs": "1", "batch_size": "32"},
                test_accuracy=0.9,
                train_examples=1000,
                test_examples=100,
                training_time_s=3.5,
                exported_at="2025-01-01T00:00:00Z",
                tensorflow_version="2.21.0",
                total_parameters=1250,
                confusion_matrix=model.confusion_matrix,
            ),
            device="/CPU:0",
            class_names=model.class_names,
        )

    def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        self.behaviour.enter("ListModels", context)
        return pb.ListModelsResponse(
            models=[
                pb.ModelStatus(
                    name=model.name,
                    ready=model.ready,
                    versions=[
                        pb.ModelVersionStatus(
                            version=v.version, state=v.state, serving=v.serving, error=v.error
                        )
                        for v in model.versions
                    ],
                    error=model.error,
                    memory_bytes=model.memory_bytes,
                    version_labels=dict(model.labels),
                    label_errors=model.label_errors,
                )
                for model in sorted(MODELS.values(), key=lambda m: m.name)
            ],
            default_model=DEFAULT_MODEL,
        )


class FakeOip:
    """A tiny KServe v2 / Open Inference Protocol server (tritonclient's generated stubs).

    The model `UNDECLARED` declares no inputs in its metadata (as MLServer's
    default does) and takes any one input, recorded in `Behaviour.oip_inputs`.
    """

    # Model name -> its input's image shape (H, W, C); UINT8 input, ten classes.
    MODELS: ClassVar[dict[str, tuple[int, int, int]]] = {
        "mnist": (28, 28, 1),
        "digits8": (8, 8, 1),
    }
    UNDECLARED = "undeclared"

    def __init__(self, behaviour: Behaviour) -> None:
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.pb = service_pb2
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
        if request.name == self.UNDECLARED:
            return self.pb.ModelMetadataResponse(name=request.name, platform="fake")
        if request.name not in self.MODELS:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        response = self.pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="fake")
        response.inputs.add(name="images", datatype="UINT8", shape=[-1, *self.MODELS[request.name]])
        response.outputs.add(name="probabilities", datatype="FP32", shape=[-1, 10])
        return response

    def infer(self, request: Any, context: Any) -> Any:
        self.behaviour.enter("ModelInfer", context)
        self.behaviour.name_replica(context)
        if request.model_name == self.UNDECLARED and len(request.inputs) == 1:
            tensor = request.inputs[0]
            with self.behaviour._lock:
                self.behaviour.oip_inputs.append(
                    (
                        tensor.name,
                        tensor.datatype,
                        tuple(tensor.shape),
                        len(request.raw_input_contents[0]),
                    )
                )
            return self.pb.ModelInferResponse(model_name=request.model_name, model_version="1")
        if request.model_name not in self.MODELS or len(request.inputs) != 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected one input for the model")
        with self.behaviour._lock:
            self.behaviour.models.append(("ModelInfer", request.model_name))
        tensor = request.inputs[0]
        shape = list(tensor.shape)
        raw = request.raw_input_contents[0]
        if (
            tensor.datatype != "UINT8"
            or len(raw) != int(np.prod(shape))
            or tuple(shape[1:]) != self.MODELS[request.model_name]
        ):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "raw input does not match the shape")
        images = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
        with self.behaviour._lock:
            self.behaviour.images.append(shape[0])
            self.behaviour.shapes.append(tuple(shape))
        probs = probabilities_for(digits_of(images))
        response = self.pb.ModelInferResponse(model_name=request.model_name, model_version="1")
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


@contextmanager
def nothing_listens() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a socket that is bound but never listens: connections are refused.

    The port stays bound until the block ends, so nothing else can start listening on it.
    """
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{bound.getsockname()[1]}"
