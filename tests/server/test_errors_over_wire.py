"""Every class of bad input, sent over real gRPC to the real runtime.

Each case checks the status code and that the message starts with the name of
the offending field. A final hostile run sends thousands of random malformed
requests; the server must answer each with a proper status, stay correct and
keep its memory bounded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.server import errors
from convserve.v1 import convserve_pb2, convserve_pb2_grpc, tensor_pb2
from convserve.v1.tensor_codec import PROTO_TO_DTYPE, to_tensor
from tests.interop.loop_thread import serving
from tests.server.wire_helpers import settings_for

pytestmark = pytest.mark.slow

MAX_IMAGES = 16
MAX_CONV_ELEMENTS = 10_000
MAX_KERNEL_ELEMENTS = 100
MAX_MESSAGE_BYTES = 1 << 20
LIMITS = {
    "max_images_per_request": MAX_IMAGES,
    "max_conv_elements": MAX_CONV_ELEMENTS,
    "max_kernel_elements": MAX_KERNEL_ELEMENTS,
    "max_message_bytes": MAX_MESSAGE_BYTES,
    "max_fit_steps": 50,
    "fit_time_budget_s": 2.0,
}
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CORR_X = np.arange(9, dtype=np.float64).reshape(3, 3)
CORR_K = np.array([[0.0, 1.0], [2.0, 3.0]])


@pytest.fixture(scope="module")
def server(model_base_path: Path) -> Iterator[Any]:
    with serving(settings_for(model_base_path, **LIMITS)) as running_server:
        yield running_server


@pytest.fixture(scope="module")
def stub(server: Any) -> Iterator[convserve_pb2_grpc.ConvServeStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield convserve_pb2_grpc.ConvServeStub(channel)


def raw(dtype: int, shape: list[int], content: bytes = b"") -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, content=content)  # type: ignore[arg-type]


def status(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=60)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


U8 = tensor_pb2.DATA_TYPE_UINT8
F32 = tensor_pb2.DATA_TYPE_FLOAT32
F64 = tensor_pb2.DATA_TYPE_FLOAT64
DIGIT_BYTES = b"\x07" * 784


def predict(images: tensor_pb2.Tensor, **spec: Any) -> convserve_pb2.PredictRequest:
    return convserve_pb2.PredictRequest(images=images, model_spec=convserve_pb2.ModelSpec(**spec))


def floats(values: np.ndarray) -> tensor_pb2.Tensor:
    return to_tensor(values.astype(np.float32))


def convolve(
    x: np.ndarray = CORR_X, k: np.ndarray = CORR_K, **options: Any
) -> convserve_pb2.ConvolveRequest:
    return convserve_pb2.ConvolveRequest(
        input=to_tensor(x),
        kernel=to_tensor(k),
        options=convserve_pb2.ConvolutionOptions(**options),
    )


NAN_IMAGE = np.zeros((1, 28, 28), np.float32)
NAN_IMAGE[0, 3, 4] = np.nan
INF_IMAGE = np.zeros((1, 28, 28), np.float32)
INF_IMAGE[0, 0, 0] = np.inf

PREDICT_CASES = {
    "wrong dtype float64": (to_tensor(np.zeros((1, 28, 28))), "images"),
    "wrong dtype int32": (to_tensor(np.zeros((1, 28, 28), np.int32)), "images"),
    "unknown dtype": (raw(42, [1, 784], DIGIT_BYTES), "images"),
    "shape not allowed": (to_tensor(np.zeros((2, 28, 27), np.uint8)), "images"),
    "rank 1": (to_tensor(np.zeros((784,), np.uint8)), "images"),
    "no dimensions": (raw(U8, [], b"\x01"), "images"),
    "byte length": (raw(U8, [1, 28, 28], DIGIT_BYTES[:-1]), "images"),
    "N = 0": (raw(U8, [0, 28, 28]), "images"),
    "negative dimension": (raw(U8, [-1, 28, 28], DIGIT_BYTES), "images"),
    "overflowing shape": (raw(U8, [2**62, 2**62, 28], DIGIT_BYTES), "images"),
    "NaN": (floats(NAN_IMAGE), "images"),
    "Inf": (floats(INF_IMAGE), "images"),
    "float above 1": (floats(np.full((1, 28, 28), 1.5)), "images"),
    "float below 0": (floats(np.full((1, 784), -0.01)), "images"),
    "too many images": (to_tensor(np.zeros((MAX_IMAGES + 1, 784), np.uint8)), "images"),
}


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_bad_images(stub: convserve_pb2_grpc.ConvServeStub, case: str) -> None:
    tensor, field = PREDICT_CASES[case]
    code, details = status(stub.Predict, predict(tensor))
    assert code == INVALID, details
    assert details.startswith(f"{field}: "), details


def test_missing_images(stub: convserve_pb2_grpc.ConvServeStub) -> None:
    code, details = status(stub.Predict, convserve_pb2.PredictRequest())
    assert code == INVALID
    assert details.startswith("images: ")


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ({"name": "fashion"}, grpc.StatusCode.NOT_FOUND),
        ({"version": 99}, grpc.StatusCode.NOT_FOUND),
        ({"version": 0}, INVALID),
    ],
)
def test_unknown_models(
    stub: convserve_pb2_grpc.ConvServeStub, spec: dict[str, Any], code: grpc.StatusCode
) -> None:
    request = predict(raw(U8, [1, 784], DIGIT_BYTES), **spec)
    got, details = status(stub.Predict, request)
    assert got == code, details
    assert str(next(iter(spec.values()))) in details


@pytest.mark.parametrize("rpc", ["Predict", "GetModelMetadata", "GetFeatureMaps"])
def test_a_huge_model_name_gets_a_short_status(
    stub: convserve_pb2_grpc.ConvServeStub, rpc: str
) -> None:
    spec = convserve_pb2.ModelSpec(name="a" * 9000)
    requests = {
        "Predict": predict(raw(U8, [1, 784], DIGIT_BYTES), name=spec.name),
        "GetModelMetadata": convserve_pb2.GetModelMetadataRequest(model_spec=spec),
        "GetFeatureMaps": convserve_pb2.GetFeatureMapsRequest(
            model_spec=spec, image=raw(U8, [28, 28], DIGIT_BYTES)
        ),
    }
    got, details = status(getattr(stub, rpc), requests[rpc])
    # Echoed in full, the name would overflow the trailers (8 KiB by default) and the
    # client would get a metadata-size error instead of the status.
    assert got in (grpc.StatusCode.NOT_FOUND, INVALID), details[:200]
    assert "'aaaa" in details
    assert len(details) <= errors.MAX_MESSAGE_CHARS


CONVOLVE_CASES = {
    "input over the element limit": (convolve(np.zeros((101, 100))), "input"),
    "kernel over the element limit": (convolve(np.zeros((20, 20)), np.zeros((11, 10))), "kernel"),
    "kernel larger than the input": (convolve(CORR_X, np.zeros((4, 4))), "kernel"),
    "kernel larger than the padded input": (
        convolve(
            CORR_X,
            np.zeros((6, 6)),
            padding=convserve_pb2.PADDING_EXPLICIT,
            explicit_padding=[1, 1, 1, 1],
        ),
        "kernel",
    ),
    "zero stride": (convolve(strides=[0, 1]), "options.strides"),
    "negative stride": (convolve(strides=[1, -2]), "options.strides"),
    "three strides": (convolve(strides=[1, 1, 1]), "options.strides"),
    "zero dilation": (convolve(dilations=[1, 0]), "options.dilations"),
    "negative dilation": (convolve(dilations=[-1, 1]), "options.dilations"),
    "unknown mode": (convolve(mode=9), "options.mode"),
    "unknown padding": (convolve(padding=9), "options.padding"),
    "explicit padding arity": (
        convolve(padding=convserve_pb2.PADDING_EXPLICIT, explicit_padding=[1, 1]),
        "options.explicit_padding",
    ),
    "negative explicit padding": (
        convolve(padding=convserve_pb2.PADDING_EXPLICIT, explicit_padding=[1, -1, 0, 0]),
        "options.explicit_padding",
    ),
    "kernel dtype differs": (convolve(CORR_X, CORR_K.astype(np.float32)), "kernel"),
    "integer input": (convolve(np.zeros((3, 3), np.int32), np.zeros((2, 2), np.int32)), "input"),
    "NaN input": (convolve(np.full((3, 3), np.nan)), "input"),
    "rank 3 input": (convolve(np.zeros((3, 3, 3)), CORR_K), "input"),
    "kernel rank": (convolve(np.zeros((1, 3, 3, 1)), CORR_K), "kernel"),
}


@pytest.mark.parametrize("case", sorted(CONVOLVE_CASES))
def test_bad_convolutions(stub: convserve_pb2_grpc.ConvServeStub, case: str) -> None:
    request, field = CONVOLVE_CASES[case]
    code, details = status(stub.Convolve, request)
    assert code == INVALID, details
    assert details.startswith(f"{field}: "), details


def test_bad_bias(stub: convserve_pb2_grpc.ConvServeStub) -> None:
    request = convolve()
    request.bias.CopyFrom(to_tensor(np.zeros(3)))
    code, details = status(stub.Convolve, request)
    assert code == INVALID
    assert details.startswith("bias: ")


def fit(inputs: np.ndarray, targets: np.ndarray, kernel_shape: list[int], **kw: Any) -> Any:
    return convserve_pb2.FitKernelRequest(
        inputs=to_tensor(inputs), targets=to_tensor(targets), kernel_shape=kernel_shape, **kw
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (fit(np.ones((6, 8)), np.ones((6, 6)), [1, 2]), "targets"),
        (fit(np.ones((6, 8)), np.ones((6, 7), np.float32), [1, 2]), "targets"),
        (fit(np.ones((6, 8)), np.ones((6, 7)), [1, 2, 3]), "kernel_shape"),
        (fit(np.ones((6, 8)), np.ones((6, 7)), [0, 2]), "kernel_shape"),
        (fit(np.ones((6, 8)), np.ones((6, 7)), [1, 2], learning_rate=-1), "learning_rate"),
        (fit(np.ones((6, 8)), np.ones((6, 7)), [1, 2], max_steps=-3), "max_steps"),
        (fit(np.ones((6, 8)), np.ones((6, 7)), [1, 2], tolerance=-1), "tolerance"),
    ],
)
def test_bad_fits(stub: convserve_pb2_grpc.ConvServeStub, request_: Any, field: str) -> None:
    code, details = status(stub.FitKernel, request_)
    assert code == INVALID, details
    assert details.startswith(f"{field}: "), details


@pytest.mark.parametrize(
    ("image", "field"),
    [
        (to_tensor(np.zeros((2, 28, 28), np.uint8)), "image"),
        (to_tensor(np.zeros((28, 28))), "image"),
        (floats(np.full((28, 28), 2.0)), "image"),
        (raw(U8, [28, 28], b"short"), "image"),
    ],
)
def test_bad_feature_map_images(
    stub: convserve_pb2_grpc.ConvServeStub, image: tensor_pb2.Tensor, field: str
) -> None:
    code, details = status(stub.GetFeatureMaps, convserve_pb2.GetFeatureMapsRequest(image=image))
    assert code == INVALID, details
    assert details.startswith(f"{field}: "), details


def test_unknown_feature_map_layer(stub: convserve_pb2_grpc.ConvServeStub) -> None:
    request = convserve_pb2.GetFeatureMapsRequest(
        image=raw(U8, [28, 28], DIGIT_BYTES), layers=["no_such_layer"]
    )
    code, details = status(stub.GetFeatureMaps, request)
    assert code in (INVALID, grpc.StatusCode.NOT_FOUND)
    assert "no_such_layer" in details


def test_messages_over_the_limit_are_refused(stub: convserve_pb2_grpc.ConvServeStub) -> None:
    big = np.zeros((MAX_MESSAGE_BYTES // 8 + 1,))
    code, _ = status(stub.Convolve, convolve(big.reshape(1, -1), np.zeros((1, 1))))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # And the server is fine afterwards.
    reply = stub.Convolve(convolve(), timeout=60)
    np.testing.assert_allclose(np.frombuffer(reply.output.content), [19, 25, 37, 43])


# -- hostile run ---------------------------------------------------------------

FIELD_MESSAGE = re.compile(r"^[A-Za-z_][\w.\[\]]*: \S")
SANE_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
DIMS = [-3, -1, 0, 1, 2, 3, 5, 28, 784, 2**31, 2**62]


def random_tensor(rng: np.random.Generator) -> tensor_pb2.Tensor:
    """Mostly malformed: odd dtypes, shapes, byte counts and values; sometimes valid."""
    dtype = int(rng.choice([-1, 0, 1, 2, 3, 4, 5, 6, 1000]))
    rank = int(rng.integers(0, 6))
    shape = [int(rng.choice(DIMS)) for _ in range(rank)]
    if rng.random() < 0.5 and rank:
        # A small, well-formed shape with the right byte count and nasty values.
        shape = [int(d) for d in rng.integers(1, 9, rank)]
        if rng.random() < 0.3:
            shape = [int(rng.integers(1, 4)), 28, 28][: max(rank, 2)]
        numpy_dtype = PROTO_TO_DTYPE.get(dtype, np.dtype(np.float32))
        values = rng.choice([0.0, 0.5, 1.0, -1.0, 255.0, 1e300, np.nan, np.inf], size=shape)
        with np.errstate(all="ignore"):
            content = values.astype(numpy_dtype).tobytes()
    else:
        content = rng.bytes(int(rng.integers(0, 64)))
    return raw(dtype, shape, content)


def random_options(rng: np.random.Generator) -> convserve_pb2.ConvolutionOptions:
    def pair() -> list[int]:
        return [int(v) for v in rng.choice([-1, 0, 1, 2, 3], size=int(rng.choice([0, 1, 2, 3])))]

    return convserve_pb2.ConvolutionOptions(
        strides=pair(),
        dilations=pair(),
        padding=int(rng.integers(0, 6)),  # type: ignore[arg-type]
        mode=int(rng.integers(0, 5)),  # type: ignore[arg-type]
        explicit_padding=[int(v) for v in rng.integers(-2, 4, int(rng.choice([0, 4, 3])))],
    )


def random_request(rng: np.random.Generator) -> tuple[str, Any]:
    kind = int(rng.integers(0, 5))
    spec = convserve_pb2.ModelSpec(name=str(rng.choice(["", "mnist", "other", "\u00e9\x00"])))
    if rng.random() < 0.3:
        spec.version = int(rng.choice([-5, 0, 1, 2, 2**62]))
    if kind == 0:
        return "Predict", convserve_pb2.PredictRequest(images=random_tensor(rng), model_spec=spec)
    if kind == 1 and rng.random() < 0.3:
        # Well-formed convolutions keep the compute paths busy between the bad ones.
        height, width = (int(v) for v in rng.integers(3, 24, 2))
        kernel = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        return "Convolve", convolve(
            rng.standard_normal((height, width)),
            rng.standard_normal(kernel),
            strides=[int(v) for v in rng.integers(1, 3, 2)],
            padding=int(rng.integers(0, 3)),
            mode=int(rng.integers(0, 3)),
        )
    if kind == 2 and rng.random() < 0.2:
        inputs = rng.standard_normal((6, 8))
        return "FitKernel", fit(inputs, inputs[:, :-1] - inputs[:, 1:], [1, 2], max_steps=3)
    if kind == 1:
        request = convserve_pb2.ConvolveRequest(
            input=random_tensor(rng), kernel=random_tensor(rng), options=random_options(rng)
        )
        if rng.random() < 0.3:
            request.bias.CopyFrom(random_tensor(rng))
        return "Convolve", request
    if kind == 2:
        return "FitKernel", convserve_pb2.FitKernelRequest(
            inputs=random_tensor(rng),
            targets=random_tensor(rng),
            kernel_shape=[int(rng.choice(DIMS)) for _ in range(int(rng.integers(0, 5)))],
            options=random_options(rng),
            learning_rate=float(rng.choice([0.0, -1.0, 1e9, np.nan, 0.01])),
            max_steps=int(rng.choice([-1, 0, 1, 3])),
            tolerance=float(rng.choice([0.0, -1.0, np.inf])),
        )
    if kind == 3:
        return "GetFeatureMaps", convserve_pb2.GetFeatureMapsRequest(
            image=random_tensor(rng),
            layers=list(rng.choice(["", "conv1", "x"], 2)),
            model_spec=spec,
        )
    return "GetModelMetadata", convserve_pb2.GetModelMetadataRequest(model_spec=spec)


def _flags(model_base_path: Path) -> list[str]:
    flags = ["--model-base-path", str(model_base_path), "--host", "127.0.0.1"]
    flags += ["--port", "0", "--metrics-port", "0"]
    for name, value in LIMITS.items():
        flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def _send_all(
    stub: convserve_pb2_grpc.ConvServeStub, rng: np.random.Generator, count: int
) -> dict[grpc.StatusCode, int]:
    """Send `count` random requests, 64 in flight at a time; check every answer."""
    codes: dict[grpc.StatusCode, int] = {}
    for start in range(0, count, 64):
        batch = [random_request(rng) for _ in range(min(64, count - start))]
        futures = [(rpc, getattr(stub, rpc).future(req, timeout=60)) for rpc, req in batch]
        for rpc, future in futures:
            try:
                future.result()
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            assert code in SANE_CODES, f"{rpc}: {code} {details}"
            if code == INVALID:
                assert FIELD_MESSAGE.match(details), f"{rpc}: {details!r}"
            codes[code] = codes.get(code, 0) + 1
    return codes


def test_hostile_run_leaves_the_server_correct_and_bounded(
    model_base_path: Path, sample_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    import signal

    import psutil

    from tests.server.wire_helpers import kill_process, start_server_process

    server = start_server_process(_flags(model_base_path))
    try:
        process = psutil.Process(server.process.pid)
        digits = np.ascontiguousarray(sample_digits[0][:8], dtype=np.uint8)
        with grpc.insecure_channel(server.target) as channel:
            stub = convserve_pb2_grpc.ConvServeStub(channel)
            before = stub.Predict(predict(to_tensor(digits)), timeout=60)
            rng = np.random.default_rng(20261122)
            _send_all(stub, rng, 500)  # warm-up: traces, caches and pools reach their size
            warm_rss = process.memory_info().rss
            codes = _send_all(stub, rng, 3000)
            grown = process.memory_info().rss - warm_rss
            # Undecodable request bodies are refused by gRPC itself.
            garbage = channel.unary_unary("/convserve.v1.ConvServe/Predict")
            for size in (1, 7, 300):
                with pytest.raises(grpc.RpcError):
                    garbage(rng.bytes(size) + b"\xff\xff\xff", timeout=30)
            after = stub.Predict(predict(to_tensor(digits)), timeout=60)
            corr = stub.Convolve(convolve(), timeout=60)
        assert codes[INVALID] > 1000
        assert codes.get(grpc.StatusCode.OK, 0) > 0
        assert list(after.digits) == list(before.digits)
        np.testing.assert_allclose(
            np.frombuffer(after.probabilities.content, np.float32),
            np.frombuffer(before.probabilities.content, np.float32),
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(np.frombuffer(corr.output.content), [19, 25, 37, 43])
        assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 3000 requests"
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    finally:
        kill_process(server)
