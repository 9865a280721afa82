"""The real convserve server spoken to by the stock Triton and TF Serving clients.

One server (port 0, the shared trained model) serves all three protocols;
predictions must equal convserve.v1's, bad input must get convserve.v1's
status codes, every request must be counted with its protocol label, and
requests from the three protocols must share batches.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from convserve.client import cli
from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from convserve.v1.tensor_codec import from_tensor, to_tensor
from tests.interop.loop_thread import serving
from tests.interop.three_protocols import (
    PREDICT_SENDERS,
    Convolution,
    Images,
    convolve_codes,
    predict_codes,
)
from tests.polling import wait_for

MAX_IMAGES = 16
pytestmark = pytest.mark.slow


def _settings(model_base_path: Path, **overrides: Any) -> Any:
    from convserve.server.settings import Settings

    values: dict[str, Any] = {
        "model_base_path": model_base_path,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "max_images_per_request": MAX_IMAGES,
    }
    values.update(overrides)
    return Settings(**values)


def _serve(settings: Any) -> Any:
    return serving(settings)


# Small limits, so that the bad-input table can step over each of them cheaply.
MAX_CONV_ELEMENTS = 4096
MAX_KERNEL_ELEMENTS = 256
MAX_MESSAGE_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def server(model_base_path: Path) -> Iterator[Any]:
    settings = _settings(
        model_base_path,
        max_conv_elements=MAX_CONV_ELEMENTS,
        max_kernel_elements=MAX_KERNEL_ELEMENTS,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )
    with _serve(settings) as running_server:
        yield running_server


@pytest.fixture(scope="module")
def target(server: Any) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def channel(target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(target) as ch:
        yield ch


@pytest.fixture(scope="module")
def digits(sample_digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Eight held-out digits, uint8 [8,28,28,1]."""
    return np.asarray(sample_digits[0][:8], dtype=np.uint8)[..., np.newaxis]


def convserve_probabilities(channel: grpc.Channel, images: np.ndarray) -> np.ndarray:
    stub = convserve_pb2_grpc.ConvServeStub(channel)
    response = stub.Predict(convserve_pb2.PredictRequest(images=to_tensor(images)), timeout=60)
    return from_tensor(response.probabilities, "probabilities")


def assert_same_predictions(probabilities: np.ndarray, expected: np.ndarray) -> None:
    # Batches of other sizes may round differently in the last bits.
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), expected.argmax(axis=1))


# -- Open Inference Protocol -------------------------------------------------


def test_triton_client_health_and_metadata(target: str) -> None:
    client = triton.InferenceServerClient(target)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mnist")
    assert client.is_model_ready("mnist", "1")
    assert not client.is_model_ready("mnist", "2")
    assert not client.is_model_ready("fashion")
    assert client.is_model_ready("conv2d")
    metadata = client.get_model_metadata("mnist")
    assert (metadata.name, list(metadata.versions)) == ("mnist", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("images", "UINT8", [-1, 28, 28, 1])
    ]
    assert [t.name for t in metadata.outputs] == ["probabilities", "digits", "labels"]
    assert client.get_server_metadata().name == "convserve"


def test_triton_client_raw_predictions_equal_convserve(
    target: str, channel: grpc.Channel, digits: np.ndarray
) -> None:
    expected = convserve_probabilities(channel, digits)
    client = triton.InferenceServerClient(target)
    images = triton.InferInput("images", list(digits.shape), "UINT8")
    images.set_data_from_numpy(digits)
    result = client.infer("mnist", [images], request_id="r-1", model_version="1")
    assert_same_predictions(result.as_numpy("probabilities"), expected)
    np.testing.assert_array_equal(result.as_numpy("digits"), expected.argmax(axis=1))
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("r-1", "mnist", "1")
    assert len(response.raw_output_contents) == 2

    only_digits = client.infer(
        "mnist", [images], outputs=[triton.InferRequestedOutput("digits")]
    ).get_response()
    assert [o.name for o in only_digits.outputs] == ["digits"]


def test_typed_fp32_contents_equal_convserve(channel: grpc.Channel, digits: np.ndarray) -> None:
    floats = digits.astype(np.float32) / 255.0
    expected = convserve_probabilities(channel, floats)
    request = service_pb2.ModelInferRequest(model_name="mnist", id="typed")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=[len(floats), 784])
    tensor.contents.fp32_contents.extend(floats.ravel().tolist())
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    response = stub.ModelInfer(request, timeout=60)
    assert len(response.raw_output_contents) == 0
    assert response.id == "typed"
    by_name = {o.name: o for o in response.outputs}
    probabilities = np.array(by_name["probabilities"].contents.fp32_contents, np.float32)
    assert_same_predictions(probabilities.reshape(-1, 10), expected)
    assert list(by_name["digits"].contents.int_contents) == expected.argmax(axis=1).tolist()


def test_typed_uint8_contents_equal_convserve(channel: grpc.Channel, digits: np.ndarray) -> None:
    expected = convserve_probabilities(channel, digits)
    request = service_pb2.ModelInferRequest(model_name="mnist")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[len(digits), 28, 28])
    tensor.contents.uint_contents.extend(digits.ravel().tolist())
    request.outputs.add(name="probabilities")
    response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    probabilities = np.array(response.outputs[0].contents.fp32_contents, np.float32)
    assert_same_predictions(probabilities.reshape(-1, 10), expected)


def test_conv2d_equals_convserve_convolve(target: str, channel: grpc.Channel) -> None:
    rng = np.random.default_rng(5)
    x = rng.random((2, 12, 12, 3))
    k = rng.standard_normal((3, 3, 3, 4))
    b = rng.standard_normal(4)
    stub = convserve_pb2_grpc.ConvServeStub(channel)
    options = convserve_pb2.ConvolutionOptions(
        strides=[2, 1],
        padding=convserve_pb2.PADDING_SAME,
        dilations=[1, 2],
        mode=convserve_pb2.CONVOLUTION_MODE_CONVOLUTION,
    )
    expected = from_tensor(
        stub.Convolve(
            convserve_pb2.ConvolveRequest(
                input=to_tensor(x), kernel=to_tensor(k), bias=to_tensor(b), options=options
            ),
            timeout=60,
        ).output,
        "output",
    )
    inputs = []
    for name, array in (("input", x), ("kernel", k), ("bias", b)):
        tensor = triton.InferInput(name, list(array.shape), "FP64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = triton.InferenceServerClient(target).infer(
        "conv2d",
        inputs,
        parameters={"strides": "2,1", "padding": "SAME", "dilations": "1,2", "mode": "CONVOLUTION"},
    )
    output = result.as_numpy("output")
    assert output.dtype == np.float64
    np.testing.assert_array_equal(output, expected)


# -- TensorFlow Serving -------------------------------------------------------


def tf_predict_request(images: Any, signature: str = "", version: int | None = None) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["images"].CopyFrom(
        images if not isinstance(images, np.ndarray) else tf.make_tensor_proto(images)
    )
    return request


def test_tfserving_predict_equals_convserve(channel: grpc.Channel, digits: np.ndarray) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    floats = digits.astype(np.float32) / 255.0

    response = stub.Predict(tf_predict_request(floats), timeout=60)
    proto = response.outputs["probabilities"]
    assert len(proto.tensor_content) == len(digits) * 10 * 4
    assert_same_predictions(tf.make_ndarray(proto), convserve_probabilities(channel, floats))
    spec = response.model_spec
    assert (spec.name, spec.version.value, spec.signature_name) == ("mnist", 1, "serving_default")

    response = stub.Predict(tf_predict_request(digits, "predict_uint8", version=1), timeout=60)
    assert_same_predictions(
        tf.make_ndarray(response.outputs["probabilities"]), convserve_probabilities(channel, digits)
    )

    typed = tf.make_tensor_proto(floats)
    typed.ClearField("tensor_content")
    typed.float_val.extend(floats.ravel().tolist())
    request = tf_predict_request(typed)
    # No labels are configured: "stable" and "latest" name the serving version.
    request.model_spec.version_label = "stable"
    response = stub.Predict(request, timeout=60)
    assert_same_predictions(
        tf.make_ndarray(response.outputs["probabilities"]),
        convserve_probabilities(channel, floats),
    )
    assert response.model_spec.version.value == 1

    typed_uint8 = tf.make_tensor_proto(digits)
    typed_uint8.ClearField("tensor_content")
    typed_uint8.int_val.extend(digits.ravel().tolist())
    request = tf_predict_request(typed_uint8, "predict_uint8")
    request.model_spec.version_label = "latest"
    response = stub.Predict(request, timeout=60)
    assert_same_predictions(
        tf.make_ndarray(response.outputs["probabilities"]), convserve_probabilities(channel, digits)
    )
    assert response.model_spec.version.value == 1


@pytest.mark.parametrize(
    ("label", "code", "message"),
    [
        (
            "canary",
            grpc.StatusCode.NOT_FOUND,
            "model 'mnist' has no version label 'canary' (its labels: none; 'latest' names "
            "the serving version)",
        ),
        (
            "x y",
            grpc.StatusCode.INVALID_ARGUMENT,
            "model_spec.version_label: not a valid version label; 1 to 64 letters, digits, "
            "'_', '.' or '-', starting with a letter or digit expected, got 'x y'",
        ),
    ],
)
def test_tfserving_labels_the_model_lacks(
    channel: grpc.Channel, digits: np.ndarray, label: str, code: grpc.StatusCode, message: str
) -> None:
    prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    predict = tf_predict_request(digits, "predict_uint8")
    predict.model_spec.version_label = label
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name = "mnist"
    metadata.model_spec.version_label = label
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "mnist"
    status.model_spec.version_label = label
    calls = [
        (prediction.Predict, predict),
        (prediction.GetModelMetadata, metadata),
        (model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus, status),
    ]
    for call, request in calls:
        with pytest.raises(grpc.RpcError) as exc:
            call(request, timeout=60)
        assert (exc.value.code(), exc.value.details()) == (code, message)


def test_tfserving_metadata_and_status(channel: grpc.Channel) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "mnist"
    response = stub.GetModelMetadata(request, timeout=60)
    assert response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    assert {"serving_default", "predict_uint8"} <= set(signatures.signature_def)
    assert list(signatures.signature_def["serving_default"].outputs) == ["probabilities"]

    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist"}), timeout=60
    )
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]
    # By an implicit label: the serving version's metadata and status.
    request.model_spec.version_label = "latest"
    assert stub.GetModelMetadata(request, timeout=60).model_spec.version.value == 1
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(
            model_spec={"name": "mnist", "version_label": "stable"}
        ),
        timeout=60,
    )
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]
    with pytest.raises(grpc.RpcError) as exc:
        model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "fashion"}),
            timeout=60,
        )
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def _tensor_infos(infos: Any) -> dict[str, tuple[int, list[int]]]:
    return {k: (t.dtype, [d.size for d in t.tensor_shape.dim]) for k, t in infos.items()}


def test_tfserving_signatures_match_the_saved_model(
    channel: grpc.Channel, model_base_path: Path
) -> None:
    # What TF Serving itself would describe for the signatures convserve serves.
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((model_base_path / "1" / "saved_model.pb").read_bytes())
    exported = saved.meta_graphs[0].signature_def
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "mnist"
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
        request, timeout=60
    )
    served = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(served)
    assert set(served.signature_def) == {"serving_default", "predict_uint8"}
    for name, signature in served.signature_def.items():
        assert signature.method_name == exported[name].method_name
        assert _tensor_infos(signature.inputs) == _tensor_infos(exported[name].inputs)
        assert _tensor_infos(signature.outputs) == _tensor_infos(exported[name].outputs)


# -- Shared health, reflection and authentication -----------------------------


def test_health_and_reflection_list_every_protocol(channel: grpc.Channel) -> None:
    services = (
        "inference.GRPCInferenceService",
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
    )
    health = health_pb2_grpc.HealthStub(channel)
    for name in services:
        response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, name
    listed = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert set(services) | {"convserve.v1.ConvServe"} <= set(listed)


def test_every_protocol_needs_the_token(model_base_path: Path, digits: np.ndarray) -> None:
    token = "interop-token"
    bearer = (("authorization", f"Bearer {token}"),)
    settings = _settings(model_base_path, auth_token=token)
    with _serve(settings) as secured, grpc.insecure_channel(f"127.0.0.1:{secured.port}") as ch:
        target = f"127.0.0.1:{secured.port}"
        client = triton.InferenceServerClient(target)
        images = triton.InferInput("images", list(digits[:2].shape), "UINT8")
        images.set_data_from_numpy(digits[:2])
        with pytest.raises(InferenceServerException) as exc:
            client.infer("mnist", [images])
        assert exc.value.status() == "StatusCode.UNAUTHENTICATED"
        result = client.infer("mnist", [images], headers=dict(bearer))
        assert result.as_numpy("probabilities").shape == (2, 10)

        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        request = tf_predict_request(digits[:2], "predict_uint8")
        with pytest.raises(grpc.RpcError) as rpc_exc:
            stub.Predict(request, timeout=60)
        assert rpc_exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        response = stub.Predict(request, timeout=60, metadata=bearer)
        assert tf.make_ndarray(response.outputs["probabilities"]).shape == (2, 10)


# -- The same bad input, the same status ------------------------------------

_RNG = np.random.default_rng(6)
_GOOD = _RNG.integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
_NAN = np.full((1, 28, 28, 1), 0.5, np.float32)
_NAN[0, 3, 3, 0] = np.nan
_INF = np.full((1, 28, 28, 1), 0.5, np.float32)
_INF[0, 0, 0, 0] = np.inf
_SHORT = Images.of(_GOOD)

PREDICT_CASES: dict[str, tuple[Images, grpc.StatusCode | None]] = {
    # None: whatever convserve.v1 answers (a server limit), but not OK.
    "wrong dtype": (Images.of(_GOOD.astype(np.float64) / 255.0), grpc.StatusCode.INVALID_ARGUMENT),
    "bad shape": (Images.of(_GOOD[:, :27, :27].copy()), grpc.StatusCode.INVALID_ARGUMENT),
    "byte length mismatch": (
        Images(_SHORT.dtype, _SHORT.shape, _SHORT.content[:-1]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "no images": (Images("uint8", (0, 28, 28), b""), grpc.StatusCode.INVALID_ARGUMENT),
    "NaN": (Images.of(_NAN), grpc.StatusCode.INVALID_ARGUMENT),
    "Inf": (Images.of(_INF), grpc.StatusCode.INVALID_ARGUMENT),
    "float above 1": (
        Images.of(np.full((1, 28, 28), 1.5, np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "negative float": (
        Images.of(np.full((1, 784), -0.1, np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "zero dimension": (Images("uint8", (1, 0, 28), b""), grpc.StatusCode.INVALID_ARGUMENT),
    "negative dimension": (
        Images("uint8", (1, -28, 28), bytes(784)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "overflowing shape": (
        Images("uint8", (2**31, 2**31, 2**31), bytes(784)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "too many images": (Images.of(np.zeros((MAX_IMAGES + 1, 28, 28), np.uint8)), None),
    "message over the size limit": (
        Images.of(np.zeros((MAX_MESSAGE_BYTES // 784 + 1, 28, 28), np.uint8)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
    "version zero": (Images.of(_GOOD, version=0), grpc.StatusCode.INVALID_ARGUMENT),
    "unknown model": (Images.of(_GOOD, model="fashion"), grpc.StatusCode.NOT_FOUND),
    "unknown version": (Images.of(_GOOD, version=99), grpc.StatusCode.NOT_FOUND),
}

_X = _RNG.random((1, 6, 6, 1)).astype(np.float32)
_K = _RNG.random((3, 3, 1, 2)).astype(np.float32)
CONVOLVE_CASES: dict[str, Convolution] = {
    "kernel larger than the input": Convolution(_X, _RNG.random((9, 9, 1, 2)).astype(np.float32)),
    "zero stride": Convolution(_X, _K, strides=(0, 0)),
    "negative stride": Convolution(_X, _K, strides=(-1, 1)),
    "zero dilation": Convolution(_X, _K, dilations=(0, 0)),
    "negative dilation": Convolution(_X, _K, dilations=(1, -2)),
    "input over the element limit": Convolution(_RNG.random((1, 70, 70, 1)).astype(np.float32), _K),
    "kernel over the element limit": Convolution(
        _RNG.random((1, 20, 20, 1)).astype(np.float32),
        _RNG.random((17, 17, 1, 1)).astype(np.float32),
    ),
    "unknown padding": Convolution(_X, _K, padding="FULL"),
    "unknown mode": Convolution(_X, _K, mode="CORRELATE"),
    "kernel dtype differs": Convolution(_X, _K.astype(np.float64)),
    "integer input": Convolution(_X.astype(np.int32), _K.astype(np.int32)),
}


@pytest.mark.parametrize("case", list(PREDICT_CASES))
def test_bad_predict_input_gets_the_same_status(channel: grpc.Channel, case: str) -> None:
    images, expected = PREDICT_CASES[case]
    codes = predict_codes(channel, images)
    assert codes["convserve"] != grpc.StatusCode.OK
    if expected is not None:
        assert codes["convserve"] == expected
    assert codes == dict.fromkeys(codes, codes["convserve"])


def test_the_table_requests_succeed_when_corrected(channel: grpc.Channel) -> None:
    assert predict_codes(channel, Images.of(_GOOD)) == dict.fromkeys(
        ("convserve", "oip", "tfserving"), grpc.StatusCode.OK
    )
    assert convolve_codes(channel, Convolution(_X, _K)) == dict.fromkeys(
        ("convserve", "oip"), grpc.StatusCode.OK
    )


@pytest.mark.parametrize("case", list(CONVOLVE_CASES))
def test_bad_convolve_input_gets_the_same_status(channel: grpc.Channel, case: str) -> None:
    codes = convolve_codes(channel, CONVOLVE_CASES[case])
    assert codes["convserve"] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["oip"] == codes["convserve"]


# -- Shared metrics and batches ----------------------------------------------


def scrape(metrics_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics: (name, sorted labels) -> value."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests_total(
    samples: dict[Any, float], protocol: str, rpc: str, code: str, model: str | None = None
) -> float:
    """convserve_requests_total for these labels, summed over models unless `model` is given."""
    wanted = {"code": code, "protocol": protocol, "rpc": rpc}
    if model is not None:
        wanted["model"] = model
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "convserve_requests_total"
        and all(dict(labels).get(k) == v for k, v in wanted.items())
    )


def test_every_protocol_is_counted_in_the_same_metrics(server: Any, channel: grpc.Channel) -> None:
    before = scrape(server.metrics_port)
    assert predict_codes(channel, Images.of(_GOOD)) == dict.fromkeys(
        ("convserve", "oip", "tfserving"), grpc.StatusCode.OK
    )
    predict_codes(channel, PREDICT_CASES["NaN"][0])
    after = scrape(server.metrics_port)
    for protocol, rpc in (
        ("convserve", "Predict"),
        ("oip", "ModelInfer"),
        ("tfserving", "Predict"),
    ):
        for code in ("OK", "INVALID_ARGUMENT"):
            gained = requests_total(after, protocol, rpc, code) - requests_total(
                before, protocol, rpc, code
            )
            assert gained == 1, (protocol, rpc, code)


def _histogram(samples: dict[Any, float], name: str, suffix: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == f"{name}_{suffix}")


def _wait_for(metrics_port: int, done: Callable[[dict[Any, float]], bool], what: str) -> None:
    """Scrape until `done(samples)` holds. Scrapes come fast: the state awaited may last
    only as long as one batch runs."""
    wait_for(lambda: done(scrape(metrics_port)), what=what, interval_s=0.005)


def _gained(before: dict[Any, float], after: dict[Any, float], name: str, suffix: str) -> float:
    return _histogram(after, name, suffix) - _histogram(before, name, suffix)


def _send_together(
    pool: ThreadPoolExecutor, channel: grpc.Channel, parts: list[tuple[str, np.ndarray]]
) -> list[grpc.StatusCode]:
    """Send each (protocol, images) from its own thread, all released at once."""
    start = threading.Barrier(len(parts))

    def send(protocol: str, images: np.ndarray) -> grpc.StatusCode:
        start.wait(timeout=30)
        return PREDICT_SENDERS[protocol](channel, Images.of(images))

    futures = [pool.submit(send, protocol, images) for protocol, images in parts]
    return [f.result(timeout=120) for f in futures]


def _behind_a_large_request(
    pool: ThreadPoolExecutor,
    channel: grpc.Channel,
    metrics_port: int,
    blocker_images: int,
    parts: list[tuple[str, np.ndarray]],
) -> tuple[dict[Any, float], dict[Any, float]]:
    """Send `parts` while a large convserve.v1 request is in the batcher.

    Returns the metrics scraped before and after.
    """
    before = scrape(metrics_port)
    batches_before = _histogram(before, "convserve_batch_size", "count")
    blocker = pool.submit(
        PREDICT_SENDERS["convserve"],
        channel,
        Images.of(np.zeros((blocker_images, 28, 28, 1), np.uint8)),
    )
    # Its first batch ran: it is in the batcher, the rest of it queued.
    _wait_for(
        metrics_port,
        lambda s: _histogram(s, "convserve_batch_size", "count") > batches_before,
        what="the large request's first batch",
    )
    assert _send_together(pool, channel, parts) == [grpc.StatusCode.OK] * len(parts)
    assert blocker.result(timeout=120) == grpc.StatusCode.OK
    return before, scrape(metrics_port)


def test_requests_from_three_protocols_share_one_batch(
    model_base_path: Path, digits: np.ndarray
) -> None:
    # One model call at a time, at most 8 images each. A large convserve.v1
    # request is split into full batches that run one after another; requests
    # that arrive meanwhile queue behind it and are merged into the next batch:
    # 1 + 2 + 4 images from the three protocols make exactly one batch of 7.
    settings = _settings(
        model_base_path,
        max_batch_size=8,
        max_concurrent_batches=1,
        max_images_per_request=8192,
        max_queued_images=16384,
    )
    parts = [("convserve", digits[:1]), ("oip", digits[1:3]), ("tfserving", digits[3:7])]
    with (
        _serve(settings) as batching,
        grpc.insecure_channel(f"127.0.0.1:{batching.port}") as ch,
        ThreadPoolExecutor(4) as pool,
    ):
        # Should the large request finish before the three arrive (a stalled
        # machine), there is no batch to join: try again with a larger one.
        for blocker_images in (1024, 4096, 8192):
            before, after = _behind_a_large_request(
                pool, ch, batching.metrics_port, blocker_images, parts
            )

            expected_images = blocker_images + 7
            assert _gained(before, after, "convserve_batch_size", "sum") == expected_images
            assert _gained(before, after, "convserve_images_processed", "total") == expected_images
            batches = _gained(before, after, "convserve_batch_size", "count")
            if batches == blocker_images // 8 + 1:
                break
        else:
            pytest.fail(f"the three requests never shared a batch ({batches} batches)")
    for protocol, rpc in (
        ("convserve", "Predict"),
        ("oip", "ModelInfer"),
        ("tfserving", "Predict"),
    ):
        count = requests_total(after, protocol, rpc, "OK") - requests_total(
            before, protocol, rpc, "OK"
        )
        assert count == (2 if protocol == "convserve" else 1), protocol


# -- The load generator over the Open Inference Protocol ---------------------


def test_bench_over_oip(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        [
            "bench", "--protocol", "oip", "--model", "mnist", "--target", target,
            "--concurrency", "2", "--images-per-request", "4",
            "--duration-s", "1", "--warmup-s", "0.2", "--no-progress", "--json",
        ]
    )  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["protocol"] == "oip"
    (phase,) = report["phases"]
    assert phase["requests_ok"] > 0
    assert phase["errors"] == {}
