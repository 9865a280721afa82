"""Three models in one real server: MNIST, Fashion-MNIST and 8x8 digits.

Each protocol must predict each model exactly as the model's own SavedModel
does in-process, route by model name (an unknown one is NOT_FOUND), report
each model in its own health status and metrics series, and a model added to
or removed from the model config file must come and go under load without a
single failed request to the others.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tritonclient.grpc import service_pb2_grpc

from convserve.trainer.data import FASHION_MNIST_CLASS_NAMES
from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from convserve.v1.tensor_codec import from_tensor
from tests.conftest import samples_of
from tests.interop.loop_thread import serving
from tests.interop.three_protocols import (
    Images,
    convserve_predict_request,
    oip_predict_request,
    predict_codes,
    tfserving_predict_request,
)
from tests.polling import wait_for
from tests.server.runtime_helpers import saved_model_probabilities

pytestmark = pytest.mark.slow
# What the trainer exported (tests/trainer/test_datasets.py pins the published order).
FASHION_NAMES = FASHION_MNIST_CLASS_NAMES


def _settings(**values: Any) -> Any:
    from convserve.server.settings import Settings

    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "device": "cpu",
        "max_images_per_request": 64,
    }
    base.update(values)
    return Settings(**base)


@pytest.fixture(scope="module")
def bases(
    trained_model_dir: Path, fashion_model_dir: Path, digits8_model_dir: Path
) -> dict[str, Path]:
    return {"mnist": trained_model_dir, "fashion": fashion_model_dir, "digits8": digits8_model_dir}


@pytest.fixture(scope="module")
def server(bases: dict[str, Path]) -> Iterator[Any]:
    settings = _settings(
        model=[f"{name}={path}" for name, path in bases.items()], poll_interval_s=3600
    )
    with serving(settings) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def held_out(base: Path, count: int = 12) -> np.ndarray:
    """`count` held-out images of the model's data set, uint8 [k,H,W,1]."""
    images, _ = samples_of(base)
    return np.asarray(images[:count], dtype=np.uint8)[..., np.newaxis]


def expected_probabilities(base: Path, images: np.ndarray) -> np.ndarray:
    """The model's own SavedModel, in-process, on the same images."""
    return saved_model_probabilities(base / "1", images.astype(np.float32) / np.float32(255.0))


def _convserve(channel: grpc.Channel, model: str, images: np.ndarray) -> np.ndarray:
    stub = convserve_pb2_grpc.ConvServeStub(channel)
    response = stub.Predict(convserve_predict_request(Images.of(images, model=model)), timeout=60)
    assert response.model_name == model
    probabilities = from_tensor(response.probabilities, "probabilities")
    return probabilities


def _oip(channel: grpc.Channel, model: str, images: np.ndarray) -> np.ndarray:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    response = stub.ModelInfer(oip_predict_request(Images.of(images, model=model)), timeout=60)
    assert response.model_name == model
    index = [o.name for o in response.outputs].index("probabilities")
    shape = tuple(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], "<f4").reshape(shape)


def _tfserving(channel: grpc.Channel, model: str, images: np.ndarray) -> np.ndarray:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.Predict(tfserving_predict_request(Images.of(images, model=model)), timeout=60)
    assert response.model_spec.name == model
    return np.asarray(tf.make_ndarray(response.outputs["probabilities"]))


PROTOCOLS: dict[str, Callable[[grpc.Channel, str, np.ndarray], np.ndarray]] = {
    "convserve": _convserve,
    "oip": _oip,
    "tfserving": _tfserving,
}


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("model", ["mnist", "fashion", "digits8"])
def test_each_protocol_predicts_each_model_as_its_saved_model_does(
    channel: grpc.Channel, bases: dict[str, Path], protocol: str, model: str
) -> None:
    images = held_out(bases[model])
    probabilities = PROTOCOLS[protocol](channel, model, images)
    expected = expected_probabilities(bases[model], images)
    assert probabilities.shape == expected.shape
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), expected.argmax(axis=1))


def test_the_models_differ_in_shape_and_classes(
    channel: grpc.Channel, bases: dict[str, Path]
) -> None:
    stub = convserve_pb2_grpc.ConvServeStub(channel)
    shapes = {}
    for name in bases:
        meta = stub.GetModelMetadata(
            convserve_pb2.GetModelMetadataRequest(model_spec=convserve_pb2.ModelSpec(name=name)),
            timeout=30,
        )
        shapes[name] = (list(meta.inputs[0].shape), list(meta.outputs[0].shape))
        if name == "fashion":
            assert tuple(meta.class_names) == FASHION_NAMES
    assert shapes == {
        "mnist": ([-1, 28, 28, 1], [-1, 10]),
        "fashion": ([-1, 28, 28, 1], [-1, 10]),
        "digits8": ([-1, 8, 8, 1], [-1, 10]),
    }
    # An MNIST digit is not an 8x8 digit: the error names what digits8 takes.
    with pytest.raises(grpc.RpcError) as caught:
        _convserve(channel, "digits8", held_out(bases["mnist"], 1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images: shape [N,8,8,1], [N,8,8] or [N,64] expected" in caught.value.details()


def test_predictions_carry_the_models_labels(channel: grpc.Channel, bases: dict[str, Path]) -> None:
    images = held_out(bases["fashion"])
    stub = convserve_pb2_grpc.ConvServeStub(channel)
    request = convserve_predict_request(Images.of(images, model="fashion"))
    response = stub.Predict(request, timeout=60)
    assert list(response.labels) == [FASHION_NAMES[i] for i in response.digits]
    expected = expected_probabilities(bases["fashion"], images).argmax(axis=1)
    assert list(response.digits) == expected.tolist()


def test_an_unknown_model_is_not_found_on_every_protocol(
    channel: grpc.Channel, bases: dict[str, Path]
) -> None:
    images = Images.of(held_out(bases["mnist"], 2), model="cifar")
    assert predict_codes(channel, images) == dict.fromkeys(
        ("convserve", "oip", "tfserving"), grpc.StatusCode.NOT_FOUND
    )
    stub = convserve_pb2_grpc.ConvServeStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(convserve_predict_request(images), timeout=30)
    assert "'cifar' is not served here" in caught.value.details()
    assert "'mnist', 'fashion', 'digits8'" in caught.value.details()


def test_list_models_and_per_model_health(channel: grpc.Channel) -> None:
    listed = convserve_pb2_grpc.ConvServeStub(channel).ListModels(
        convserve_pb2.ListModelsRequest(), timeout=30
    )
    assert listed.default_model == "mnist"
    assert [(m.name, m.ready) for m in listed.models] == [
        ("digits8", True),
        ("fashion", True),
        ("mnist", True),
    ]
    for model in listed.models:
        assert [(v.version, v.state, v.serving) for v in model.versions] == [(1, "AVAILABLE", True)]
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "mnist", "fashion", "digits8"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="cifar"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_per_model_metrics_move_independently(
    server: Any, channel: grpc.Channel, bases: dict[str, Path]
) -> None:
    def images_processed(samples: dict[Any, float], model: str) -> float:
        key = frozenset({"rpc": "Predict", "model": model}.items())
        return samples.get(("convserve_images_processed_total", key), 0.0)

    def requests(samples: dict[Any, float], model: str) -> float:
        labels = {"protocol": "convserve", "rpc": "Predict", "model": model, "code": "OK"}
        return samples.get(("convserve_requests_total", frozenset(labels.items())), 0.0)

    before = scrape(server.metrics_port)
    _convserve(channel, "digits8", held_out(bases["digits8"], 5))
    _convserve(channel, "digits8", held_out(bases["digits8"], 3))
    _convserve(channel, "fashion", held_out(bases["fashion"], 2))
    after = scrape(server.metrics_port)
    gained = {
        model: (
            images_processed(after, model) - images_processed(before, model),
            requests(after, model) - requests(before, model),
        )
        for model in ("mnist", "fashion", "digits8")
    }
    assert gained == {"mnist": (0, 0), "fashion": (2, 1), "digits8": (8, 2)}


# -- the model config file, changed under load ---------------------------------------


def _config(bases: dict[str, Path], names: list[str]) -> str:
    entries = "\n".join(
        f'  config {{ name: "{name}" base_path: "{bases[name]}" model_platform: "tensorflow" }}'
        for name in names
    )
    return f"model_config_list {{\n{entries}\n}}\n"


def _write(path: Path, text: str) -> None:
    # A reader must never see half a file: write beside it, then rename over it.
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


# Loading a model under load on two cores can take minutes.
LOAD_TIMEOUT_S = 180.0


def test_models_added_to_and_removed_from_the_config_file_under_load(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    config = tmp_path / "models.config"
    _write(config, _config(bases, ["mnist", "fashion"]))
    settings = _settings(
        model_config_file=config, model_config_file_poll_wait_s=0.2, poll_interval_s=0.2
    )
    mnist_images = held_out(bases["mnist"], 4)
    expected = expected_probabilities(bases["mnist"], mnist_images).argmax(axis=1)
    with serving(settings) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        stub = convserve_pb2_grpc.ConvServeStub(ch)
        stop = threading.Event()
        failures: list[str] = []
        answered = [0]

        def load() -> None:
            request = convserve_predict_request(Images.of(mnist_images, model="mnist"))
            while not stop.is_set():
                try:
                    response = stub.Predict(request, timeout=30)
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code()}: {exc.details()}")
                    continue
                if list(response.digits) != expected.tolist():
                    failures.append(f"wrong answer {list(response.digits)}")
                answered[0] += 1

        def listed() -> dict[str, bool]:
            models = stub.ListModels(convserve_pb2.ListModelsRequest(), timeout=30).models
            return {m.name: m.ready for m in models}

        clients = [threading.Thread(target=load) for _ in range(3)]
        for client in clients:
            client.start()
        try:
            wait_for(lambda: answered[0] >= 20, what="traffic", timeout_s=LOAD_TIMEOUT_S)
            # Added: loaded in the background while mnist serves on.
            _write(config, _config(bases, ["mnist", "fashion", "digits8"]))
            wait_for(
                lambda: listed().get("digits8") is True,
                what="digits8 ready",
                timeout_s=LOAD_TIMEOUT_S,
            )
            digits = held_out(bases["digits8"], 6)
            np.testing.assert_allclose(
                _convserve(ch, "digits8", digits),
                expected_probabilities(bases["digits8"], digits),
                rtol=1e-5,
                atol=1e-6,
            )
            at_add = answered[0]
            # Removed: new requests to it are NOT_FOUND, it drains and unloads.
            _write(config, _config(bases, ["mnist", "digits8"]))
            wait_for(
                lambda: "fashion" not in listed(), what="fashion removed", timeout_s=LOAD_TIMEOUT_S
            )
            codes = predict_codes(ch, Images.of(held_out(bases["fashion"], 1), model="fashion"))
            assert set(codes.values()) == {grpc.StatusCode.NOT_FOUND}
            health = health_pb2_grpc.HealthStub(ch)
            gone = health.Check(health_pb2.HealthCheckRequest(service="fashion"), timeout=10)
            assert gone.status == health_pb2.HealthCheckResponse.NOT_SERVING
            wait_for(
                lambda: answered[0] >= at_add + 20,
                what="traffic after the changes",
                timeout_s=LOAD_TIMEOUT_S,
            )
        finally:
            stop.set()
            for client in clients:
                client.join(60)
        assert failures == []
        assert listed() == {"mnist": True, "digits8": True}
    print(f"mnist requests answered while models came and went: {answered[0]}, failed: 0")
