"""Hostile input over all three protocols against one real server process.

Hand-written cases for the known hazards (out-of-range integers in every
numeric field, tensors whose shape claims far more than their bytes, huge
names), then hypothesis-built requests for every RPC of convserve.v1, the Open
Inference Protocol and TF Serving (a third to a half of them built valid and
checked for their exact answer), then a storm: hostile requests from eight
threads with valid Predict and Convolve requests among them. Throughout, every
answer must be OK or a client error with a short message, the process must
never exit, every valid request must get exactly its own answer, and the
server's memory must stay bounded. When the process dies, every later test
fails at once naming the request in flight.
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2 as tf_tensor_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2
from tritonclient.grpc import service_pb2

from convserve.v1 import convserve_pb2, tensor_pb2
from tests.interop.hostile import (
    LONG,
    MATE_KERNEL,
    MATE_SHAPE,
    MODEL,
    RPCS,
    Call,
    Code,
    Reference,
    Target,
    any_calls,
    check_answer,
    check_call,
    convolution_of,
    corr2d,
    cs_tensor,
    probabilities_of,
    rpc_calls,
    tf_shape,
    valid_convolve,
    valid_predict,
    wire_message,
    wire_varints,
)
from tests.server.wire_helpers import kill_process, start_server_process

pytestmark = pytest.mark.slow

# Limits small enough that no request the strategies build can cost much (a
# FitKernel stops after 50 steps or 1 s), so thousands of requests fit in a
# minute on two cores; the limits themselves are tested elsewhere.
LIMITS = {
    "max-images-per-request": 16,
    "max-conv-elements": 65536,
    "max-kernel-elements": 1024,
    "max-message-bytes": 4 << 20,
    "max-fit-steps": 50,
    "fit-time-budget-s": 1.0,
}
FIT_STEPS_LIMIT = 50
# The growth of the server's RSS from warm-up to the end of the suite. Its RSS
# after warm-up is about 1 GB (TensorFlow); allocator arenas of the gRPC and ops
# threads, and the functions traced for the few FitKernel geometries, add tens
# of MiB at most. A leak of one 100 KiB buffer per request (the size of a small
# batch of digits) over the suite's ~3,000 requests would exceed this bound.
RSS_GROWTH_BOUND = 300 * 2**20
STORM_THREADS = 8
HYPOTHESIS_EXAMPLES = 160
SLOW_RPCS = {"FitKernel": 70, "PredictStream": 90}
STORM_ROUNDS = 25
STORM_HOSTILE = 32

OK = Code.OK
INVALID = Code.INVALID_ARGUMENT
NOT_FOUND = Code.NOT_FOUND

FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=HYPOTHESIS_EXAMPLES)


# Reference digits whose idle feature maps are recorded (one request each).
FEATURE_MAP_DIGITS = 3


@dataclass
class Baseline:
    """What the idle server answered for the held-out digits, and its memory then."""

    reference: Reference
    rss: int
    children_rss: int

    @property
    def images(self) -> np.ndarray:
        return self.reference.images

    @property
    def probabilities(self) -> np.ndarray:
        return self.reference.probabilities


def _rss(pid: int) -> tuple[int, int]:
    """The RSS of the server process and the sum over its worker processes."""
    process = psutil.Process(pid)
    children = sum(child.memory_info().rss for child in process.children(recursive=True))
    return process.memory_info().rss, children


@pytest.fixture(scope="module")
def target(model_base_path: Path) -> Iterator[Target]:
    flags = ["--model-base-path", str(model_base_path), "--host", "127.0.0.1"]
    flags += ["--port", "0", "--metrics-port", "0"]
    for name, value in LIMITS.items():
        flags += [f"--{name}", str(value)]
    server = start_server_process(flags)
    channel = grpc.insecure_channel(server.target)
    try:
        target = Target(server, channel)
        yield target
        assert server.process.poll() is None, target.death or "the server process exited"
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=60)
        assert code == 0, f"exit code {code} after SIGTERM:\n" + "".join(server.lines[-20:])
    finally:
        channel.close()
        kill_process(server)


@pytest.fixture(scope="module")
def baseline(target: Target, sample_digits: tuple[np.ndarray, np.ndarray]) -> Baseline:
    """Idle answers per digit, after a warm-up of every valid RPC in every protocol."""
    images = np.ascontiguousarray(sample_digits[0], dtype=np.uint8)
    rows = []
    for image in images:
        call = valid_predict("convserve", image[None])
        outcome = target.send(call, timeout=60)
        assert outcome.code == OK, outcome.details
        rows.append(probabilities_of(call, outcome.response)[0])
    feature_maps = []
    for image in images[:FEATURE_MAP_DIGITS]:
        outcome = target.send(feature_maps_call(image), timeout=60)
        assert outcome.code == OK, outcome.details
        feature_maps.append(
            {
                m.layer: np.frombuffer(m.activations.content, "<f4").reshape(
                    tuple(m.activations.shape)
                )
                for m in outcome.response.feature_maps
            }
        )
    x = np.arange(36.0).reshape(MATE_SHAPE)
    warm_up = [
        valid_predict(p, images[:n]) for p in ("convserve", "oip", "tfserving") for n in (1, 8)
    ]
    warm_up += [valid_convolve(p, x, MATE_KERNEL) for p in ("convserve", "oip")]
    warm_up += [FIT_BASE_CALL, feature_maps_call(images[0])]
    for call in warm_up:
        outcome = target.send(call, timeout=60)
        assert outcome.code == OK, f"warm-up {call.label}: {outcome.code} {outcome.details}"
    rss, children = _rss(target.server.process.pid)
    reference = Reference(images, np.array(rows), tuple(feature_maps))
    return Baseline(reference, rss, children)


# -- hand-written cases ----------------------------------------------------------

X = np.arange(20.0).reshape(4, 5) * 0.5 - 3.0
K = np.array([[0.0, 1.0], [2.0, 3.0]])


def expect_conv(stride: tuple[int, int] = (1, 1), dtype: str = "float64") -> Any:
    """An OK answer must be the reference cross-correlation of X and K at `stride`."""
    rtol = 1e-12 if dtype == "float64" else 1e-5

    def check(call: Call, response: Any) -> None:
        got = convolution_of(call, response, dtype)
        np.testing.assert_allclose(got, corr2d(X, K, stride), rtol=rtol, atol=rtol)

    return check


def not_ready(call: Call, response: Any) -> None:
    assert response.ready is False, "an unknown model or version must not be ready"


def capped_steps(call: Call, response: Any) -> None:
    assert response.steps <= FIT_STEPS_LIMIT, f"{response.steps} steps over the server's limit"


@dataclass(frozen=True)
class Case:
    id: str
    call: Call
    expect: frozenset[grpc.StatusCode]
    check: Callable[[Call, Any], None] | None = None

    def __repr__(self) -> str:
        return f"Case({self.id})"


def case(id: str, call: Call, *codes: grpc.StatusCode, check: Any = None) -> Any:
    return pytest.param(Case(id, call, frozenset(codes), check), id=id)


def oip_conv(parameters: dict[str, Any], dtype: str = "float64") -> Call:
    """conv2d over OIP with X, K and these request parameters (int -> int64_param)."""
    call = valid_convolve("oip", X.astype(dtype), K.astype(dtype))
    for name, value in parameters.items():
        param = call.request.parameters[name]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int) and value >= 2**63:
            param.uint64_param = value
        elif isinstance(value, int):
            param.int64_param = value
        else:
            param.string_param = value
    return call


def cs_conv(dtype: str = "float64", **options: Any) -> Call:
    call = valid_convolve("convserve", X.astype(dtype), K.astype(dtype))
    call.request.options.CopyFrom(convserve_pb2.ConvolutionOptions(**options))
    return call


def raw_conv(options_payload: bytes, note: str) -> Call:
    """Convolve(X, K) as bytes with ConvolutionOptions fields the classes refuse to set."""
    request = valid_convolve("convserve", X, K).request.SerializeToString()
    return Call("convserve", "Convolve", request + wire_message(4, options_payload), note)


FIT_X = np.random.default_rng(3).normal(size=(5, 5))
FIT_BASE = convserve_pb2.FitKernelRequest(
    inputs=cs_tensor(FIT_X), targets=cs_tensor(corr2d(FIT_X, K)), kernel_shape=[2, 2], max_steps=5
)
FIT_BASE_CALL = Call("convserve", "FitKernel", FIT_BASE)


def fit(**fields: Any) -> Call:
    request = convserve_pb2.FitKernelRequest()
    request.CopyFrom(FIT_BASE)
    for name, value in fields.items():
        if name == "kernel_shape":
            request.ClearField("kernel_shape")
            request.kernel_shape.extend(value)
        elif isinstance(value, tensor_pb2.Tensor):
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return Call("convserve", "FitKernel", request)


def feature_maps_call(image: np.ndarray, **spec: Any) -> Call:
    request = convserve_pb2.GetFeatureMapsRequest(
        image=cs_tensor(image), model_spec=convserve_pb2.ModelSpec(**spec)
    )
    return Call("convserve", "GetFeatureMaps", request)


DIGIT = np.full((1, 28, 28), 7, dtype=np.uint8)


def cs_predict(**spec: Any) -> Call:
    call = valid_predict("convserve", DIGIT)
    call.request.model_spec.CopyFrom(convserve_pb2.ModelSpec(**spec))
    return call


def cs_metadata(**spec: Any) -> Call:
    request = convserve_pb2.GetModelMetadataRequest(model_spec=convserve_pb2.ModelSpec(**spec))
    return Call("convserve", "GetModelMetadata", request)


def oip_infer(name: str = MODEL, version: str = "") -> Call:
    call = valid_predict("oip", DIGIT)
    call.request.model_name, call.request.model_version = name, version
    return call


def oip_meta(rpc: str, name: str = MODEL, version: str = "") -> Call:
    message = (
        service_pb2.ModelMetadataRequest
        if rpc == "ModelMetadata"
        else service_pb2.ModelReadyRequest
    )
    return Call("oip", rpc, message(name=name, version=version))


def tf_spec(name: str = MODEL, version: int | None = None) -> Any:
    from tensorflow_serving.apis import model_pb2

    spec = model_pb2.ModelSpec(name=name)
    if version is not None:
        spec.version.value = version
    return spec


def tf_calls(name: str = MODEL, version: int | None = None) -> list[tuple[str, Call]]:
    """TF Serving's Predict, GetModelMetadata and GetModelStatus for one model spec."""
    predict = valid_predict("tfserving", DIGIT)
    predict.request.model_spec.CopyFrom(tf_spec(name, version))
    predict.request.model_spec.signature_name = "predict_uint8"
    meta = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=tf_spec(name, version), metadata_field=["signature_def"]
    )
    status = get_model_status_pb2.GetModelStatusRequest(model_spec=tf_spec(name, version))
    return [
        ("Predict", predict),
        ("GetModelMetadata", Call("tfserving", "GetModelMetadata", meta)),
        ("GetModelStatus", Call("tfserving", "GetModelStatus", status)),
    ]


def claims(dtype: int, shape: list[int], content: bytes = b"\x00" * 4) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, content=content)  # type: ignore[arg-type]


F32, F64, U8 = (
    tensor_pb2.DATA_TYPE_FLOAT32,
    tensor_pb2.DATA_TYPE_FLOAT64,
    tensor_pb2.DATA_TYPE_UINT8,
)
HUGE_SHAPES = {"2^40": [2**40], "2^20x2^20": [2**20, 2**20], "2^62x2^62": [2**62, 2**62]}


def huge_tensor_cases() -> list[Any]:
    out = []
    for label, shape in HUGE_SHAPES.items():
        out.append(
            case(
                f"cs-Predict-images-{label}",
                Call(
                    "convserve", "Predict", convserve_pb2.PredictRequest(images=claims(F32, shape))
                ),
                INVALID,
            )
        )
        conv = valid_convolve("convserve", X, K)
        conv.request.input.CopyFrom(claims(F64, shape, b"\x00" * 8))
        out.append(case(f"cs-Convolve-input-{label}", conv, INVALID))
        conv = valid_convolve("convserve", X, K)
        conv.request.kernel.CopyFrom(claims(F64, shape, b"\x00" * 8))
        out.append(case(f"cs-Convolve-kernel-{label}", conv, INVALID))
        out.append(
            case(
                f"cs-FitKernel-inputs-{label}", fit(inputs=claims(F64, shape, b"\x00" * 8)), INVALID
            )
        )
        maps = convserve_pb2.GetFeatureMapsRequest(image=claims(U8, shape))
        out.append(
            case(
                f"cs-GetFeatureMaps-image-{label}",
                Call("convserve", "GetFeatureMaps", maps),
                INVALID,
            )
        )
        raw = service_pb2.ModelInferRequest(model_name=MODEL)
        raw.inputs.add(name="images", datatype="UINT8", shape=shape)
        raw.raw_input_contents.append(b"\x00" * 4)
        out.append(case(f"oip-ModelInfer-raw-{label}", Call("oip", "ModelInfer", raw), INVALID))
        typed = service_pb2.ModelInferRequest(model_name=MODEL)
        typed.inputs.add(name="images", datatype="FP32", shape=shape).contents.fp32_contents.append(
            0.5
        )
        out.append(case(f"oip-ModelInfer-typed-{label}", Call("oip", "ModelInfer", typed), INVALID))
        conv_oip = valid_convolve("oip", X, K)
        del conv_oip.request.inputs[0].shape[:]
        conv_oip.request.inputs[0].shape.extend(shape)
        conv_oip.request.raw_input_contents[0] = b"\x00" * 8
        out.append(
            case(f"oip-conv2d-input-{label}", Call("oip", "ModelInfer", conv_oip.request), INVALID)
        )
        for how in ("content", "float_val"):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = MODEL
            tensor = tf_tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT, tensor_shape=tf_shape(shape)
            )
            if how == "content":
                tensor.tensor_content = b"\x00" * 4
            else:
                tensor.float_val.append(0.5)
            request.inputs["images"].CopyFrom(tensor)
            out.append(
                case(f"tf-Predict-{how}-{label}", Call("tfserving", "Predict", request), INVALID)
            )
    return out


def oip_conv_cases() -> list[Any]:
    out = []
    for name in ("strides", "dilations"):
        # A stride beyond the input is valid (one output row/column); a dilation that
        # large is not (the dilated kernel outgrows the input).
        big = (OK, INVALID) if name == "strides" else (INVALID,)
        for value in (
            2**31,
            2**32,
            2**32 + 1,
            2**40,
            2**63 - 1,
            "2147483648,1",
            "1,2147483648",
            "4294967297,1",
            "99999999999999999999",
            "9223372036854775808",
        ):
            if isinstance(value, int):
                stride = (value, value)
            else:
                parts = [int(p) for p in value.split(",")]
                stride = (parts[0], parts[-1])
            # float32 and float64 take different TensorFlow kernels.
            for dtype in ("float32", "float64"):
                check = expect_conv(stride, dtype) if name == "strides" else None
                call = oip_conv({name: value}, dtype)
                out.append(case(f"oip-conv2d-{dtype}-{name}-{value}", call, *big, check=check))
        for value in (-1, 0, -(2**63), "-1,1", "0", "1,-2147483649", 2**64 - 1):
            out.append(case(f"oip-conv2d-{name}-{value}", oip_conv({name: value}), INVALID))
    for value in (
        2**31,
        2**40,
        2**63 - 1,
        -1,
        "2147483647,0,0,0",
        "99999999999999999999",
        "0,0,0,-1",
        "0,0,0,4294967296",
    ):
        params = {"padding": "EXPLICIT", "explicit_padding": value}
        out.append(case(f"oip-conv2d-explicit_padding-{value}", oip_conv(params), INVALID))
    out.append(case("oip-conv2d-padding-int", oip_conv({"padding": 2**31}), INVALID))
    out.append(case("oip-conv2d-mode-9000", oip_conv({"mode": LONG}), INVALID))
    out.append(case("oip-conv2d-param-name-9000", oip_conv({LONG: 1}), INVALID))
    return out


def cs_conv_cases() -> list[Any]:
    big, low = 2**31 - 1, -(2**31)
    out = []
    for dtype in ("float32", "float64"):
        for stride in ((big, 1), (1, big), (big, big)):
            call = cs_conv(dtype, strides=list(stride))
            check = expect_conv(stride, dtype)
            out.append(case(f"cs-{dtype}-strides-{stride}", call, OK, INVALID, check=check))
        call = cs_conv(dtype, dilations=[big, big])
        out.append(case(f"cs-{dtype}-dilations-int32max", call, INVALID))
    out += [
        case("cs-strides-int32min", cs_conv(strides=[low, 1]), INVALID),
        case("cs-strides-zero", cs_conv(strides=[0, 0]), INVALID),
        case("cs-strides-three", cs_conv(strides=[1, 1, 1]), INVALID),
        case("cs-dilations-int32min", cs_conv(dilations=[low, 1]), INVALID),
        case("cs-explicit-int32max", cs_conv(padding=3, explicit_padding=[big] * 4), INVALID),
        case(
            "cs-explicit-int32max-one", cs_conv(padding=3, explicit_padding=[0, 0, 0, big]), INVALID
        ),
        case("cs-explicit-int32min", cs_conv(padding=3, explicit_padding=[low, 0, 0, 0]), INVALID),
        case("cs-explicit-without-EXPLICIT", cs_conv(explicit_padding=[big] * 4), INVALID),
        case("cs-padding-unknown", cs_conv(padding=2**31 - 1), INVALID),
        case("cs-mode-unknown", cs_conv(mode=-1), INVALID),
    ]
    # Varints wider than int32 in int32 fields: parsers keep the low 32 bits.
    for values, codes, check in (
        ([2**31, 1], (INVALID,), None),
        ([2**40, 1], (INVALID,), None),
        ([2**64 - 1, 1], (INVALID,), None),
        ([2**32 + 1, 2**32 + 1], (OK, INVALID), expect_conv()),
    ):
        note = f"Convolve(X, K) with options.strides sent as varints {values}"
        out.append(
            case(
                f"cs-wire-strides-{values[0]}",
                raw_conv(wire_varints(1, values), note),
                *codes,
                check=check,
            )
        )
        note = f"Convolve(X, K) with options.dilations sent as varints {values}"
        out.append(
            case(
                f"cs-wire-dilations-{values[0]}",
                raw_conv(wire_varints(4, values), note),
                *codes,
                check=check,
            )
        )
    note = "Convolve(X, K), EXPLICIT with options.explicit_padding varints 2**40+1"
    payload = wire_varints(2, [3]) + wire_varints(3, [2**40 + 1] * 4)
    out.append(case("cs-wire-explicit-2^40+1", raw_conv(payload, note), OK, INVALID))
    return out


def fit_cases() -> list[Any]:
    out = []
    for shape in (
        [2**62, 2**62],
        [2**63 - 1, 1],
        [-(2**63), 1],
        [0, 2],
        [-1, 2],
        [2**31, 2**31],
        [2**40],
        [],
        [2, 2, 1, 2**40],
    ):
        out.append(case(f"fit-kernel_shape-{shape}", fit(kernel_shape=shape), INVALID))
    out += [
        case("fit-max_steps-0", fit(max_steps=0), OK, check=capped_steps),
        case("fit-max_steps-int32max", fit(max_steps=2**31 - 1), OK, check=capped_steps),
        case("fit-max_steps--1", fit(max_steps=-1), INVALID),
        case("fit-max_steps-int32min", fit(max_steps=-(2**31)), INVALID),
    ]
    raw = FIT_BASE.SerializeToString() + wire_varints(7, [2**32 - 1])
    note = "FitKernel with max_steps sent as the varint 2**32-1 (int32: -1)"
    out.append(
        case("fit-wire-max_steps-2^32-1", Call("convserve", "FitKernel", raw, note), INVALID)
    )
    for seed in (0, 2**63, 2**64 - 1):
        out.append(case(f"fit-seed-{seed}", fit(seed=seed), OK))
    for rate in (math.nan, math.inf, -math.inf, -1.0, 1e308):
        out.append(case(f"fit-learning_rate-{rate}", fit(learning_rate=rate), INVALID))
    for rate in (5e-324, -0.0):
        out.append(case(f"fit-learning_rate-{rate}", fit(learning_rate=rate), OK))
    for tolerance in (math.nan, math.inf, -1.0):
        out.append(case(f"fit-tolerance-{tolerance}", fit(tolerance=tolerance), INVALID))
    out.append(case("fit-tolerance-1e308", fit(tolerance=1e308), OK))
    return out


def version_cases() -> list[Any]:
    out = []
    for version, codes in (
        (0, (INVALID,)),
        (-1, (INVALID,)),
        (-(2**63), (INVALID,)),
        (2**63 - 1, (NOT_FOUND,)),
        (2, (NOT_FOUND,)),
    ):
        out.append(case(f"cs-Predict-version-{version}", cs_predict(version=version), *codes))
        out.append(
            case(f"cs-GetModelMetadata-version-{version}", cs_metadata(version=version), *codes)
        )
        out.append(
            case(
                f"cs-GetFeatureMaps-version-{version}",
                feature_maps_call(DIGIT[0], version=version),
                *codes,
            )
        )
        for rpc, call in tf_calls(version=version):
            out.append(case(f"tf-{rpc}-version-{version}", call, *codes))
    note = "GetModelMetadata with model_spec.version sent as the varint 2**63 (int64: -2**63)"
    raw = wire_message(1, wire_varints(2, [2**63]))
    out.append(
        case("cs-wire-version-2^63", Call("convserve", "GetModelMetadata", raw, note), INVALID)
    )
    # A version no int64 holds is not a version (convserve.v1's field is an int64),
    # or simply one that is not loaded: either answer is right.
    beyond_int64 = (INVALID, NOT_FOUND)
    texts: tuple[tuple[str, tuple[grpc.StatusCode, ...]], ...] = (
        ("0", (INVALID,)),
        ("-1", (INVALID,)),
        ("99999999999999999999", beyond_int64),
        (str(2**63), beyond_int64),
        (str(2**63 - 1), (NOT_FOUND,)),
        ("x1", (INVALID,)),
        (LONG, (INVALID,)),
    )
    for text, codes in texts:
        label = text if len(text) < 30 else "9000-chars"
        out.append(case(f"oip-ModelInfer-version-{label}", oip_infer(version=text), *codes))
        out.append(
            case(f"oip-conv2d-version-{label}", oip_infer(name="conv2d", version=text), *codes)
        )
        out.append(
            case(
                f"oip-ModelMetadata-version-{label}",
                oip_meta("ModelMetadata", version=text),
                *codes,
            )
        )
        out.append(
            case(
                f"oip-ModelReady-version-{label}",
                oip_meta("ModelReady", version=text),
                OK,
                check=not_ready,
            )
        )
    return out


def long_name_cases() -> list[Any]:
    out = [
        case("cs-Predict-name-9000", cs_predict(name=LONG), NOT_FOUND),
        case("cs-GetModelMetadata-name-9000", cs_metadata(name=LONG), NOT_FOUND),
        case("cs-GetFeatureMaps-name-9000", feature_maps_call(DIGIT[0], name=LONG), NOT_FOUND),
        case("oip-ModelInfer-name-9000", oip_infer(name=LONG), NOT_FOUND),
        case("oip-ModelMetadata-name-9000", oip_meta("ModelMetadata", name=LONG), NOT_FOUND),
        case("oip-ModelReady-name-9000", oip_meta("ModelReady", name=LONG), OK, check=not_ready),
    ]
    for rpc, call in tf_calls(name=LONG):
        out.append(case(f"tf-{rpc}-name-9000", call, NOT_FOUND))
    request = valid_predict("oip", DIGIT).request
    request.id = LONG
    out.append(case("oip-ModelInfer-id-9000", Call("oip", "ModelInfer", request), OK))
    request = valid_predict("oip", DIGIT).request
    request.inputs[0].name = LONG
    out.append(case("oip-ModelInfer-input-name-9000", Call("oip", "ModelInfer", request), INVALID))
    request = valid_predict("tfserving", DIGIT).request
    request.model_spec.signature_name = LONG
    out.append(case("tf-Predict-signature-9000", Call("tfserving", "Predict", request), INVALID))
    request = valid_predict("tfserving", DIGIT).request
    request.output_filter.append(LONG)
    out.append(
        case("tf-Predict-output_filter-9000", Call("tfserving", "Predict", request), INVALID)
    )
    maps = feature_maps_call(DIGIT[0]).request
    maps.layers.append(LONG)
    out.append(
        case("cs-GetFeatureMaps-layer-9000", Call("convserve", "GetFeatureMaps", maps), INVALID)
    )
    return out


CASES = (
    oip_conv_cases()
    + cs_conv_cases()
    + fit_cases()
    + huge_tensor_cases()
    + version_cases()
    + long_name_cases()
)


@pytest.mark.parametrize("case", CASES)
def test_hand_written_case(target: Target, baseline: Baseline, case: Case) -> None:
    outcome = target.send(case.call)
    check_answer(case.call, outcome)
    expected = ", ".join(sorted(c.name for c in case.expect))
    assert outcome.code in case.expect, (
        f"{case.id} ({case.call.label}): {outcome.code.name} {outcome.details[:300]!r}, "
        f"expected {expected}"
    )
    if outcome.code == OK and case.check is not None:
        case.check(case.call, outcome.response)


# -- generated requests, one RPC at a time -----------------------------------------


@pytest.mark.parametrize("entry", RPCS, ids=[entry[0] for entry in RPCS])
def test_generated_requests(
    target: Target, baseline: Baseline, entry: tuple[str, str, str, Any]
) -> None:
    examples = SLOW_RPCS.get(entry[2], HYPOTHESIS_EXAMPLES)

    @settings(FUZZ, max_examples=examples)
    @given(call=rpc_calls(entry, baseline.reference))
    def run(call: Call) -> None:
        outcome = target.send(call)
        target.count_generated("the per-RPC tests", call, outcome)
        check_call(call, outcome)

    target.require_alive()
    run()


# -- the storm: hostile requests with valid batch-mates ---------------------------


@dataclass(frozen=True)
class Job:
    call: Call
    check: Callable[[Any], None] | None  # None: a hostile request


def _valid_jobs(rng: np.random.Generator, baseline: Baseline) -> list[Job]:
    jobs = []
    for index in range(6):
        size = int(rng.integers(1, 9))
        picked = rng.choice(len(baseline.images), size=size, replace=False)
        call = valid_predict(("convserve", "oip", "tfserving")[index % 3], baseline.images[picked])
        expected = baseline.probabilities[picked]

        def same_answer(response: Any, call: Call = call, expected: np.ndarray = expected) -> None:
            got = probabilities_of(call, response)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=call.label)

        jobs.append(Job(call, same_answer))
    for protocol in ("convserve", "oip"):
        x = rng.normal(size=MATE_SHAPE)
        call = valid_convolve(protocol, x, MATE_KERNEL)

        def reference(response: Any, call: Call = call, x: np.ndarray = x) -> None:
            got = convolution_of(call, response)
            np.testing.assert_allclose(
                got, corr2d(x, MATE_KERNEL), rtol=1e-12, atol=1e-12, err_msg=call.label
            )

        jobs.append(Job(call, reference))
    return jobs


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(STORM_THREADS, thread_name_prefix="hostile") as executor:
        yield executor


def test_valid_requests_get_their_own_answers_among_hostile_ones(
    target: Target, baseline: Baseline, pool: ThreadPoolExecutor
) -> None:
    @settings(FUZZ, max_examples=STORM_ROUNDS)
    @given(
        hostile=st.lists(
            any_calls(baseline.reference), min_size=STORM_HOSTILE, max_size=STORM_HOSTILE
        ),
        seed=st.integers(0, 2**32 - 1),
    )
    def storm(hostile: list[Call], seed: int) -> None:
        rng = np.random.default_rng(seed)
        jobs = [Job(call, None) for call in hostile] + _valid_jobs(rng, baseline)
        jobs = [jobs[i] for i in rng.permutation(len(jobs))]
        outcomes = list(pool.map(lambda job: target.send(job.call), jobs))
        for job, outcome in zip(jobs, outcomes, strict=True):
            if job.check is None:
                target.count_generated("the storm", job.call, outcome)
                check_call(job.call, outcome)
                continue
            assert outcome.code == OK, (
                f"valid {job.call.label} among hostile requests: {outcome.code.name} "
                f"{outcome.details[:300]!r}"
            )
            job.check(outcome.response)

    target.require_alive()
    storm()


def test_the_server_survived_with_bounded_memory(target: Target, baseline: Baseline) -> None:
    target.require_alive()
    # Memory settles after the last answers; give the allocator a moment's work
    # by asking once more, then read.
    assert target.send(valid_predict("convserve", baseline.images[:1])).code == OK
    rss, children = _rss(target.server.process.pid)
    grown = rss - baseline.rss
    report = (
        f"{target.sent} requests; server RSS {baseline.rss / 2**20:.0f} MiB after warm-up, "
        f"{rss / 2**20:.0f} MiB at the end ({grown / 2**20:+.1f} MiB); engine workers "
        f"{baseline.children_rss / 2**20:.0f} -> {children / 2**20:.0f} MiB"
    )
    tally = "\n".join(f"  {key}: {n}" for key, n in sorted(target.tally.items()))
    print(f"{report}\nanswers:\n{tally}\n{target.generated_table()}", file=sys.stderr)
    assert grown < RSS_GROWTH_BOUND, report
    assert target.server.process.poll() is None, target.death
