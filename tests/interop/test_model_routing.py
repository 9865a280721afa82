"""Several models side by side, through the Open Inference Protocol and TF Serving adapters.

The real adapters run over gRPC against the shared fake runtime with models of
different input shapes and class counts: each request reaches the model it
names, is checked against that model's shape, and is described with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from convserve.server.protocols import ADAPTERS
from convserve.server.protocols.tfserving_convert import proto_from_array
from tests.fake_metrics import FakeMetrics
from tests.fake_runtime import FakeModel, FakeRuntime, fake_probabilities
from tests.interop.loop_thread import running

MNIST = FakeModel("mnist", versions=(1, 2), shape=(28, 28, 1))
SMALL = FakeModel("digits8", versions=(3,), shape=(8, 8, 1), class_names=("zero", "one", "two"))
# Configured, but it cannot serve.
BROKEN = FakeModel("fashion", versions=(1,), ready=False)
RNG = np.random.default_rng(11)


@dataclass
class Served:
    target: str
    runtime: FakeRuntime
    metrics: FakeMetrics


@contextmanager
def serve(runtime: FakeRuntime) -> Iterator[Served]:
    metrics = FakeMetrics()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        for adapter in ADAPTERS:
            adapter.add_to_server(server, runtime, metrics)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    async def stop(started: tuple[grpc.aio.Server, int]) -> None:
        await started[0].stop(None)

    with running(start, stop) as (_, port):
        yield Served(f"127.0.0.1:{port}", runtime, metrics)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with serve(FakeRuntime([MNIST, SMALL, BROKEN], default_model="mnist")) as started:
        yield started


@pytest.fixture(scope="module")
def channel(served: Served) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.target) as ch:
        yield ch


def images_for(model: FakeModel, n: int = 4) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, *model.shape), dtype=np.uint8)


def oip_infer(
    target: str, model: str, images: np.ndarray, version: str = "", outputs: tuple[str, ...] = ()
) -> triton.InferResult:
    client = triton.InferenceServerClient(target)
    tensor = triton.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    requested = [triton.InferRequestedOutput(name) for name in outputs] or None
    return client.infer(model, [tensor], model_version=version, outputs=requested, timeout=60)


def tf_predict(channel: grpc.Channel, model: str, images: np.ndarray) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = "predict_uint8"
    request.inputs["images"].CopyFrom(proto_from_array(images))
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)


def tf_spec(name: str, version: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name}
    if version is not None:
        spec["version"] = {"value": version}
    return spec


# -- predictions ---------------------------------------------------------------


@pytest.mark.parametrize("model", [MNIST, SMALL], ids=lambda m: m.name)
def test_oip_predicts_each_model(served: Served, model: FakeModel) -> None:
    images = images_for(model)
    result = oip_infer(
        served.target, model.name, images, outputs=("probabilities", "digits", "labels")
    )
    expected = fake_probabilities(images, len(model.class_names))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)
    classes = expected.argmax(axis=1)
    np.testing.assert_array_equal(result.as_numpy("digits"), classes)
    labels = result.as_numpy("labels")
    assert labels is not None
    assert [label.decode() for label in labels] == [model.class_names[c] for c in classes]
    response = result.get_response()
    assert (response.model_name, response.model_version) == (
        model.name,
        str(model.serving_version),
    )


def test_oip_default_outputs_leave_labels_out_and_versions_pin(served: Served) -> None:
    images = images_for(MNIST, 2)
    result = oip_infer(served.target, "mnist", images, version="1")
    assert [o.name for o in result.get_response().outputs] == ["probabilities", "digits"]
    assert result.get_response().model_version == "1"
    # An empty name is the default model.
    assert oip_infer(served.target, "", images).get_response().model_name == "mnist"


@pytest.mark.parametrize("model", [MNIST, SMALL], ids=lambda m: m.name)
def test_tfserving_predicts_each_model(
    served: Served, channel: grpc.Channel, model: FakeModel
) -> None:
    images = images_for(model)
    response = tf_predict(channel, model.name, images)
    classes = len(model.class_names)
    probabilities = np.frombuffer(response.outputs["probabilities"].tensor_content, "<f4").reshape(
        len(images), classes
    )
    np.testing.assert_array_equal(probabilities, fake_probabilities(images, classes))
    assert (response.model_spec.name, response.model_spec.version.value) == (
        model.name,
        model.serving_version,
    )


def test_images_are_checked_against_the_named_model(served: Served, channel: grpc.Channel) -> None:
    digits = images_for(MNIST, 1)  # 28x28: not what digits8 takes
    with pytest.raises(InferenceServerException) as oip:
        oip_infer(served.target, SMALL.name, digits)
    assert oip.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert oip.value.message() == (
        "inputs[images]: shape [N,8,8,1], [N,8,8] or [N,64] expected, got [1, 28, 28, 1]"
    )
    with pytest.raises(grpc.RpcError) as tf:
        tf_predict(channel, SMALL.name, digits)
    assert tf.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert tf.value.details() == oip.value.message()


def test_unknown_model_is_not_found_on_both_protocols(
    served: Served, channel: grpc.Channel
) -> None:
    client = triton.InferenceServerClient(served.target)
    for call in (
        lambda: oip_infer(served.target, "cifar", images_for(MNIST, 1)),
        lambda: client.get_model_metadata("cifar"),
    ):
        with pytest.raises(InferenceServerException) as oip:
            call()
        assert oip.value.status() == "StatusCode.NOT_FOUND"
        assert "unknown model 'cifar'" in oip.value.message()
    predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    status = model_service_pb2_grpc.ModelServiceStub(channel)
    for call in (
        lambda: tf_predict(channel, "cifar", images_for(MNIST, 1)),
        lambda: predict.GetModelMetadata(
            get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=tf_spec("cifar"), metadata_field=["signature_def"]
            )
        ),
        lambda: status.GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec=tf_spec("cifar"))
        ),
    ):
        with pytest.raises(grpc.RpcError) as tf:
            call()
        assert tf.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown model 'cifar'" in (tf.value.details() or "")


def test_calls_are_counted_by_the_model_they_name(served: Served) -> None:
    oip_infer(served.target, SMALL.name, images_for(SMALL, 1))
    assert served.metrics.labelled.count(("oip", "ModelInfer", "digits8", "OK")) >= 1
    with pytest.raises(InferenceServerException):
        oip_infer(served.target, "cifar", images_for(MNIST, 1))
    assert served.metrics.labelled.count(("oip", "ModelInfer", "_unknown", "NOT_FOUND")) >= 1
    x = np.ones((1, 5, 5, 1), np.float32)
    inputs = []
    for name, array in (("input", x), ("kernel", x[0, :3, :3, :, None])):
        tensor = triton.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = triton.InferenceServerClient(served.target).infer("conv2d", inputs, timeout=60)
    np.testing.assert_array_equal(result.as_numpy("output"), np.full((1, 3, 3, 1), 9.0))
    # conv2d is an operation: counted without a model, as convserve.v1's Convolve.
    assert served.metrics.labelled.count(("oip", "ModelInfer", "", "OK")) >= 1


# -- metadata and readiness ----------------------------------------------------


@pytest.mark.parametrize(
    ("model", "input_shape", "output_shape"),
    [(MNIST, [-1, 28, 28, 1], [-1, 10]), (SMALL, [-1, 8, 8, 1], [-1, 3])],
    ids=lambda v: getattr(v, "name", None),
)
def test_metadata_shapes_per_model(
    served: Served,
    channel: grpc.Channel,
    model: FakeModel,
    input_shape: list[int],
    output_shape: list[int],
) -> None:
    meta = triton.InferenceServerClient(served.target).get_model_metadata(model.name)
    assert (meta.name, list(meta.versions)) == (model.name, [str(v) for v in model.versions])
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("images", "UINT8", input_shape)
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probabilities", "FP32", output_shape),
        ("digits", "INT32", [-1]),
        ("labels", "BYTES", [-1]),
    ]

    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
        get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=tf_spec(model.name), metadata_field=["signature_def"]
        )
    )
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    for signature in signatures.signature_def.values():
        assert [d.size for d in signature.inputs["images"].tensor_shape.dim] == input_shape
        assert [d.size for d in signature.outputs["probabilities"].tensor_shape.dim] == (
            output_shape
        )
    assert response.model_spec.name == model.name


def test_model_ready_per_model(served: Served) -> None:
    client = triton.InferenceServerClient(served.target)
    ready = {
        (name, version): client.is_model_ready(name, version)
        for name, version in [
            ("mnist", ""),
            ("mnist", "1"),
            ("mnist", "9"),
            ("mnist", "one"),
            ("digits8", ""),
            ("digits8", "3"),
            ("fashion", ""),
            ("fashion", "1"),
            ("cifar", ""),
            ("conv2d", ""),
            ("conv2d", "2"),
        ]
    }
    assert ready == {
        ("mnist", ""): True,
        ("mnist", "1"): True,
        ("mnist", "9"): False,
        ("mnist", "one"): False,
        ("digits8", ""): True,
        ("digits8", "3"): True,
        ("fashion", ""): False,
        ("fashion", "1"): False,
        ("cifar", ""): False,
        ("conv2d", ""): True,
        ("conv2d", "2"): False,
    }
    # One configured model cannot serve, so the server as a whole is not ready.
    assert served.runtime.ready is False
    assert client.is_server_ready() is False
    assert client.is_server_live()


def test_server_ready_when_every_model_is() -> None:
    with serve(FakeRuntime([MNIST, SMALL], default_model="digits8")) as served:
        client = triton.InferenceServerClient(served.target)
        assert client.is_server_ready()
        served.runtime.ready = False
        assert not client.is_server_ready()
        assert not client.is_model_ready("digits8")
        assert not client.is_model_ready("conv2d")
        index = client.get_model_repository_index(as_json=True)
        assert [(m["name"], m["state"]) for m in index["models"]] == [
            ("digits8", "UNAVAILABLE"),
            ("mnist", "UNAVAILABLE"),
            ("conv2d", "UNAVAILABLE"),
        ]


# -- the model repository ------------------------------------------------------


def _index(channel: grpc.Channel, **fields: Any) -> list[tuple[str, str, str, str]]:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    response = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(**fields), timeout=30)
    return [(m.name, m.version, m.state, m.reason) for m in response.models]


def test_repository_index_lists_every_model(served: Served, channel: grpc.Channel) -> None:
    assert _index(channel) == [
        ("digits8", "3", "READY", ""),
        ("fashion", "1", "UNAVAILABLE", "version 1 is AVAILABLE but cannot serve"),
        ("mnist", "2", "READY", ""),
        ("conv2d", "1", "READY", ""),
    ]
    assert _index(channel, ready=True) == [
        ("digits8", "3", "READY", ""),
        ("mnist", "2", "READY", ""),
        ("conv2d", "1", "READY", ""),
    ]
    # The stock client reads the same index.
    index = triton.InferenceServerClient(served.target).get_model_repository_index()
    assert [m.name for m in index.models] == ["digits8", "fashion", "mnist", "conv2d"]
    with pytest.raises(grpc.RpcError) as exc:
        _index(channel, repository_name="models")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (exc.value.details() or "").startswith("repository_name: ")


def test_models_are_not_loaded_through_the_protocol(served: Served) -> None:
    client = triton.InferenceServerClient(served.target)
    for call, method in (
        (client.load_model, "RepositoryModelLoad"),
        (client.unload_model, "RepositoryModelUnload"),
    ):
        with pytest.raises(InferenceServerException) as exc:
            call("digits8")
        assert exc.value.status() == "StatusCode.UNIMPLEMENTED"
        assert exc.value.message() == (
            f"inference.GRPCInferenceService/{method} is not implemented by convserve: the "
            "served models are those of --model and --model-config-file (edit the file to add "
            "or remove one)"
        )


# -- TF Serving model status ---------------------------------------------------


def _status(channel: grpc.Channel, name: str, version: int | None = None) -> list[tuple[int, str]]:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    response = stub.GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec=tf_spec(name, version)), timeout=30
    )
    state = get_model_status_pb2.ModelVersionStatus.State.Name
    return [(s.version, state(s.state)) for s in response.model_version_status]


def test_get_model_status_per_model(served: Served, channel: grpc.Channel) -> None:
    assert _status(channel, "mnist") == [(1, "AVAILABLE"), (2, "AVAILABLE")]
    assert _status(channel, "mnist", 1) == [(1, "AVAILABLE")]
    assert _status(channel, "digits8") == [(3, "AVAILABLE")]
    assert _status(channel, "") == [(1, "AVAILABLE"), (2, "AVAILABLE")]  # the default model
    with pytest.raises(grpc.RpcError) as exc:
        _status(channel, "digits8", 1)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert exc.value.details() == (
        "model_spec.version: model 'digits8' has no version 1 (versions: 3)"
    )
    assert (
        served.metrics.labelled.count(("tfserving", "GetModelStatus", "digits8", "NOT_FOUND")) == 1
    )
