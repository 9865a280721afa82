"""The protocol servicers over the wire, with a stand-in runtime and the stock clients.

What is checked here is the servicers' own work: delegation, the status each
error becomes, metrics per call, and the methods they do not serve. The same
clients against the real server are in test_server.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pool, message_factory
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from convserve.server import convolution, types
from convserve.server.protocols import ADAPTERS
from convserve.server.protocols.tfserving_convert import proto_from_array
from tests.fake_metrics import FakeMetrics
from tests.fake_runtime import FakeRuntime, fake_probabilities
from tests.interop.loop_thread import running
from tests.interop.test_typed_limit import ld


@dataclass
class Served:
    port: int
    runtime: FakeRuntime
    metrics: FakeMetrics
    services: list[str]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    runtime, metrics = FakeRuntime(), FakeMetrics()

    async def start() -> tuple[grpc.aio.Server, Served]:
        # Above gRPC's default 4 MiB, so that typed payloads over the adapters' default
        # max_typed_payload_bytes (4 MiB) reach them.
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20)])
        services = [name for a in ADAPTERS for name in a.add_to_server(server, runtime, metrics)]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, Served(port, runtime, metrics, services)

    async def stop(started: tuple[grpc.aio.Server, Served]) -> None:
        await started[0].stop(None)

    with running(start, stop) as started:
        yield started[1]


@pytest.fixture(scope="module")
def channel(served: Served) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.target) as ch:
        yield ch


def test_adapters_name_their_services(served: Served) -> None:
    assert [a.name for a in ADAPTERS] == ["convserve", "oip", "tfserving"]
    assert served.services == [
        "convserve.v1.ConvServe",
        "inference.GRPCInferenceService",
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
    ]
    # Reflection answers from the default pool, so every service must be registered there.
    for name in served.services:
        assert descriptor_pool.Default().FindServiceByName(name).full_name == name


IMAGES = np.random.default_rng(3).integers(0, 256, size=(5, 28, 28, 1), dtype=np.uint8)


def test_triton_client_infer_and_health(served: Served) -> None:
    client = triton.InferenceServerClient(served.target)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mnist")
    assert client.is_model_ready("mnist", "1")
    assert not client.is_model_ready("mnist", "9")
    assert not client.is_model_ready("fashion")
    assert client.is_model_ready("conv2d")
    assert client.get_server_metadata().name == "convserve"
    assert client.get_model_metadata("mnist").versions == ["1", "2"]

    images = triton.InferInput("images", list(IMAGES.shape), "UINT8")
    images.set_data_from_numpy(IMAGES)
    result = client.infer("mnist", [images], request_id="abc", model_version="1")
    np.testing.assert_array_equal(result.as_numpy("probabilities"), fake_probabilities(IMAGES))
    response = result.get_response()
    assert (response.id, response.model_version) == ("abc", "1")
    assert ("predict", (None, (5, 28, 28, 1))) in served.runtime.calls
    assert ("oip", "ModelInfer", "OK") in served.metrics.finished


def test_deadline_reaches_the_runtime(served: Served) -> None:
    client = triton.InferenceServerClient(served.target)
    images = triton.InferInput("images", [1, 784], "UINT8")
    images.set_data_from_numpy(IMAGES[:1].reshape(1, 784))
    client.infer("mnist", [images], client_timeout=30.0)
    deadline = [c[1][0] for c in served.runtime.calls if c[0] == "predict"][-1]
    assert deadline is not None


@pytest.mark.parametrize(
    ("model", "version", "code"),
    [
        ("fashion", "", grpc.StatusCode.NOT_FOUND),
        ("mnist", "7", grpc.StatusCode.NOT_FOUND),
        ("mnist", "seven", grpc.StatusCode.INVALID_ARGUMENT),
        ("conv2d", "2", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_metadata_errors(channel: grpc.Channel, model: str, version: str, code: Any) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=model, version=version))
    assert exc.value.code() == code


def test_triton_errors_keep_status_and_field(served: Served) -> None:
    client = triton.InferenceServerClient(served.target)
    images = triton.InferInput("images", [1, 28, 28], "FP64")
    images.set_data_from_numpy(np.zeros((1, 28, 28)))
    with pytest.raises(InferenceServerException) as exc:
        client.infer("mnist", [images])
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "inputs[images].datatype" in exc.value.message()
    assert ("oip", "ModelInfer", "INVALID_ARGUMENT") in served.metrics.finished


def _finished(served: Served, protocol: str, rpc: str, code: str) -> int:
    with served.metrics.lock:
        return served.metrics.finished.count((protocol, rpc, code))


def packed(message: Any, field: str, array: np.ndarray) -> bytes:
    """Repeated float `field` of `message` holding `array`, packed: extend() is slow."""
    number = message.DESCRIPTOR.fields_by_name[field].number
    return ld(number, array.astype("<f4").tobytes())


def test_large_typed_payloads_are_refused_unparsed_and_counted(
    served: Served, channel: grpc.Channel
) -> None:
    # Over the default max_typed_payload_bytes (4 MiB); raw payloads are not limited.
    floats = np.zeros((1400, 28, 28, 1), np.float32)  # 4.2 MiB
    oip = service_pb2.ModelInferRequest(model_name="mnist")
    contents = oip.inputs.add(name="images", datatype="FP32", shape=list(floats.shape)).contents
    contents.MergeFromString(packed(contents, "fp32_contents", floats))
    tf = predict_pb2.PredictRequest()
    tf.model_spec.name = "mnist"
    proto = proto_from_array(floats)
    proto.ClearField("tensor_content")
    proto.MergeFromString(packed(proto, "float_val", floats))
    tf.inputs["images"].CopyFrom(proto)
    cases = [
        ("oip", "ModelInfer", "/inference.GRPCInferenceService/ModelInfer", oip, "inputs[0]"),
        ("tfserving", "Predict", "/tensorflow.serving.PredictionService/Predict", tf, "inputs['"),
    ]
    for protocol, rpc, path, request, field in cases:
        before = _finished(served, protocol, rpc, "INVALID_ARGUMENT")
        with pytest.raises(grpc.RpcError) as exc:
            channel.unary_unary(path)(request.SerializeToString(), timeout=30)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details().startswith(f"{field}")
        assert f"at most {4 << 20} bytes of typed values" in exc.value.details()
        assert _finished(served, protocol, rpc, "INVALID_ARGUMENT") == before + 1


@pytest.mark.parametrize(
    ("protocol", "rpc", "path"),
    [
        ("oip", "ModelInfer", "/inference.GRPCInferenceService/ModelInfer"),
        ("tfserving", "Predict", "/tensorflow.serving.PredictionService/Predict"),
    ],
)
def test_malformed_request_bytes_are_invalid_argument(
    served: Served, channel: grpc.Channel, protocol: str, rpc: str, path: str
) -> None:
    before = _finished(served, protocol, rpc, "INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as exc:
        channel.unary_unary(path)(b"\x2a\x7f", timeout=30)  # a length past the end
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith("request: a well-formed ")
    assert _finished(served, protocol, rpc, "INVALID_ARGUMENT") == before + 1


def test_conv2d_through_triton_client(served: Served) -> None:
    rng = np.random.default_rng(4)
    x = rng.random((2, 9, 9, 3)).astype(np.float32)
    k = rng.random((3, 3, 3, 2)).astype(np.float32)
    inputs = []
    for name, array in (("input", x), ("kernel", k)):
        tensor = triton.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = triton.InferenceServerClient(served.target)
    result = client.infer(
        "conv2d", inputs, parameters={"strides": "2,2", "padding": "SAME", "mode": "CONVOLUTION"}
    )
    options = types.ConvolutionOptions(strides=(2, 2), padding="SAME", mode="CONVOLUTION")
    expected = convolution.convolve(types.ConvolveInput(x, k, None, options)).output
    np.testing.assert_array_equal(result.as_numpy("output"), expected)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("conv2d", inputs, parameters={"strides": 0})
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "strides" in exc.value.message()


def test_unserved_methods_are_unimplemented(served: Served) -> None:
    client = triton.InferenceServerClient(served.target)
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_config("mnist")
    assert exc.value.status() == "StatusCode.UNIMPLEMENTED"


def test_tfserving_stubs(served: Served, channel: grpc.Channel) -> None:
    predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.signature_name = "predict_uint8"
    request.inputs["images"].CopyFrom(proto_from_array(IMAGES))
    response = predict.Predict(request, timeout=30)
    probs = np.frombuffer(response.outputs["probabilities"].tensor_content, "<f4").reshape(5, 10)
    np.testing.assert_array_equal(probs, fake_probabilities(IMAGES))
    assert (response.model_spec.version.value, response.model_spec.signature_name) == (
        2,
        "predict_uint8",
    )

    request.model_spec.version.value = 5
    with pytest.raises(grpc.RpcError) as exc:
        predict.Predict(request)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND

    meta = predict.GetModelMetadata(
        get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec={"name": "mnist"}, metadata_field=["signature_def"]
        )
    )
    assert meta.metadata["signature_def"].Is(get_model_metadata_pb2.SignatureDefMap.DESCRIPTOR)

    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist"})
    )
    assert [s.version for s in status.model_version_status] == [1, 2]
    assert ("tfserving", "GetModelStatus", "OK") in served.metrics.finished
    assert ("tfserving", "Predict", "NOT_FOUND") in served.metrics.finished


SERVED = {
    "inference.GRPCInferenceService": {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "RepositoryIndex",
    },
    "tensorflow.serving.PredictionService": {"Predict", "GetModelMetadata"},
    "tensorflow.serving.ModelService": {"GetModelStatus"},
}  # fmt: skip
# Every method of every service, from the descriptors, so that none can be missed.
UNSERVED = [
    method
    for service in (
        service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"],
        model_service_pb2.DESCRIPTOR.services_by_name["ModelService"],
    )
    for method in service.methods
    if method.name not in SERVED[service.full_name]
]


def test_every_service_method_is_either_served_or_listed() -> None:
    names = {m.full_name for m in UNSERVED}
    assert "inference.GRPCInferenceService.ModelStreamInfer" in names
    assert "tensorflow.serving.ModelService.HandleReloadConfigRequest" in names
    assert len(UNSERVED) == 13 + 3 + 1


@pytest.mark.parametrize("method", UNSERVED, ids=lambda m: m.full_name)
def test_unserved_methods_answer_unimplemented_naming_the_method(
    served: Served, channel: grpc.Channel, method: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    call = kind(
        path,
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    request = (
        iter([request_class(), request_class()]) if method.client_streaming else request_class()
    )

    def invoke() -> None:
        answer = call(request, timeout=30)
        if method.server_streaming:
            list(answer)  # the status comes with the end of the stream

    with pytest.raises(grpc.RpcError) as exc:
        invoke()
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Some add how to get what they would do (e.g. RepositoryModelLoad: the config file).
    assert exc.value.details().startswith(
        f"{method.containing_service.full_name}/{method.name} is not implemented by convserve"
    )
    assert [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG] == []
