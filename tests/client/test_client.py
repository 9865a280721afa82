"""ConvServeClient and AsyncConvServeClient against fake servers over real gRPC."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image

from convserve.client import (
    AsyncConvServeClient,
    ConvServeClient,
    DeadlineExceededError,
    InputError,
    InternalError,
    InvalidArgumentError,
    ModelStatus,
    NotFoundError,
    RetryPolicy,
    TlsConfig,
    UnauthenticatedError,
    UnavailableError,
    VersionStatus,
    convert,
)
from convserve.client.channel import channel_options
from convserve.v1 import convserve_pb2 as pb
from convserve.v1.tensor_codec import to_tensor

from . import fakes
from .conftest import Certs
from .fakes import Behaviour, RunningFake, nothing_listens, serve_fake

FAST_RETRIES = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


def numbered_images(count: int, dtype: type = np.uint8) -> np.ndarray:
    """Images whose first pixel is their index: the fake predicts index % 10."""
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(count) % 256
    return images if dtype == np.uint8 else (images / 255.0).astype(dtype)


class FakeClock:
    """Time that passes only when the client sleeps: waits are recorded, never spent.

    Pass the clock itself as `clock` and `sleep` (or `async_sleep`) as `sleep`.
    `on_sleep(n)` runs after the n-th sleep (1 for the first).
    """

    def __init__(self, on_sleep: Callable[[int], None] | None = None) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._on_sleep = on_sleep

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self._on_sleep is not None:
            self._on_sleep(len(self.sleeps))

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)


# --- Every method, sync and async ---------------------------------------------------------


def test_sync_client_every_method(fake: RunningFake) -> None:
    with ConvServeClient(fake.target) as client:
        result = client.predict(numbered_images(3))
        assert result.digits.tolist() == [0, 1, 2]
        assert result.class_indices.tolist() == [0, 1, 2]
        assert result.labels == ["0", "1", "2"]  # the default model names no classes
        assert (result[2].class_index, result[2].digit, result[2].label) == (2, 2, "2")
        assert (result.model_name, result.model_version) == ("fake", 7)
        assert result[1].top(2) == [(1, pytest.approx(0.91)), (0, pytest.approx(0.01))]
        assert result.probabilities.shape == (3, 10)

        out = client.convolve([[0, 1, 2], [3, 4, 5], [6, 7, 8]], [[0, 1], [2, 3]], bias=1)
        np.testing.assert_array_equal(out, [[20, 26], [38, 44]])
        assert out.dtype == np.float64

        fit = client.fit_kernel(np.zeros((4, 4)), np.zeros((4, 3)), (1, 2), fit_bias=True)
        np.testing.assert_allclose(fit.kernel, [[0.0, 0.1]])
        assert fit.bias is not None
        assert fit.bias.tolist() == [0.5]
        assert (fit.steps, fit.stop_reason, fit.loss) == (3, "max_steps", (1.0, 0.5, 0.25, 0.125))

        maps = client.feature_maps(numbered_images(1)[0], layers=["conv2"])
        assert list(maps.maps) == ["conv2"]
        assert maps.maps["conv2"].shape == (11, 11, 2)

        meta = client.metadata()
        assert meta.serving_version == 7
        assert meta.loaded_versions == (6, 7)
        assert meta.inputs[0].dtypes == ("uint8", "float32")
        assert meta.layers[0].name == "conv1"
        assert meta.training.total_parameters == 1250
        assert meta.training.hyperparameters == {"batch_size": "32", "epochs": "1"}
        assert meta.training.confusion_matrix is None
        assert meta.class_names == ()
        assert meta.input_shape == (28, 28, 1)

        assert client.health() == "SERVING"
    # The input shape came from the metadata once; every call went to the default model.
    assert fake.behaviour.calls["GetModelMetadata"] == 2
    assert {name for _, name in fake.behaviour.models} == {""}


async def test_async_client_every_method(fake: RunningFake) -> None:
    async with AsyncConvServeClient(fake.target) as client:
        result = await client.predict(numbered_images(3))
        assert result.digits.tolist() == [0, 1, 2]
        out = await client.convolve(
            np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]], np.float32), [[0, 1], [2, 3]]
        )
        np.testing.assert_array_equal(out, [[19, 25], [37, 43]])
        assert out.dtype == np.float32
        fit = await client.fit_kernel(np.zeros((4, 4)), np.zeros((4, 3)), (1, 2))
        assert fit.bias is None
        assert fit.kernel.shape == (1, 2)
        maps = await client.feature_maps(numbered_images(1))
        assert list(maps.maps) == ["conv1", "conv2"]
        assert (await client.metadata()).model_name == "fake"
        assert await client.health() == "SERVING"
    assert fake.behaviour.calls["Predict"] == 1


# --- What goes on the wire -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "dtype"),
    [
        (numbered_images(2), "uint8"),
        (numbered_images(2).reshape(2, 28, 28, 1), "uint8"),
        (numbered_images(2).reshape(2, 784), "uint8"),
        (numbered_images(2).astype(np.int64), "uint8"),  # integer-valued: sent as uint8
        (numbered_images(2, np.float64), "float32"),  # floats stay floats
        ([numbered_images(1)[0], numbered_images(2)[1]], "uint8"),
        ([numbered_images(1)[0], numbered_images(2, np.float32)[1]], "float32"),
    ],
)
def test_predict_inputs_and_wire_dtype(fake: RunningFake, images: Any, dtype: str) -> None:
    with ConvServeClient(fake.target) as client:
        assert client.predict(images).digits.tolist() == [0, 1]
    assert fake.behaviour.dtypes == [dtype]


def test_single_image_is_a_batch_of_one(fake: RunningFake) -> None:
    image = numbered_images(6)[5]
    with ConvServeClient(fake.target) as client:
        assert client.predict(image).digits.tolist() == [5]
        assert client.predict(image.reshape(784)).digits.tolist() == [5]
    assert fake.behaviour.images == [1, 1]


def test_bad_input_is_refused_before_sending(fake: RunningFake) -> None:
    with ConvServeClient(fake.target) as client:
        with pytest.raises(InputError, match=r"shape must be .*got \[2, 27, 27\]"):
            client.predict(np.zeros((2, 27, 27), np.uint8))
        with pytest.raises(InputError, match=r"float pixels must be in \[0, 1\]"):
            client.predict(np.full((1, 28, 28), 255.0))
        with pytest.raises(InputError, match=r"mode: expected"):
            client.convolve(np.zeros((3, 3)), np.ones((2, 2)), mode="sideways")
    # Only the model's input shape was asked for, once.
    assert fake.behaviour.calls == {"GetModelMetadata": 1}


def test_large_batches_are_split_and_reassembled_in_order() -> None:
    with (
        serve_fake(Behaviour(max_images=4)) as fake,
        ConvServeClient(fake.target, max_batch_images=4) as client,
    ):
        result = client.predict(numbered_images(10))
    assert result.digits.tolist() == [i % 10 for i in range(10)]
    assert fake.behaviour.images == [4, 4, 2]


async def test_async_split_keeps_order_when_parts_finish_out_of_order() -> None:
    # The first part is answered last, after the others.
    behaviour = Behaviour(first_call_delay_s=0.3)
    with serve_fake(behaviour) as fake:
        async with AsyncConvServeClient(fake.target, max_batch_images=3) as client:
            result = await client.predict(numbered_images(12))
    assert result.digits.tolist() == [i % 10 for i in range(12)]
    assert sorted(behaviour.images) == [3, 3, 3, 3]


def test_server_size_limit_is_reported_not_retried() -> None:
    with (
        serve_fake(Behaviour(max_images=2)) as fake,
        ConvServeClient(fake.target) as client,
        pytest.raises(InvalidArgumentError, match="more images than") as caught,
    ):
        client.predict(numbered_images(3))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.behaviour.calls["Predict"] == 1


# --- Retries and deadlines --------------------------------------------------------------


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_retryable_codes_are_retried(code: grpc.StatusCode) -> None:
    with (
        serve_fake(Behaviour(fail_first=2, fail_code=code)) as fake,
        ConvServeClient(fake.target, retries=FAST_RETRIES) as client,
    ):
        assert client.predict(numbered_images(1)).digits.tolist() == [0]
    # The model's metadata (for its input shape) was retried the same way.
    assert fake.behaviour.calls == {"GetModelMetadata": 3, "Predict": 3}


def test_invalid_argument_is_never_retried() -> None:
    behaviour = Behaviour(fail_first=5, fail_code=grpc.StatusCode.INVALID_ARGUMENT)
    with (
        serve_fake(behaviour) as fake,
        ConvServeClient(fake.target, retries=5) as client,
        pytest.raises(InvalidArgumentError) as caught,
    ):
        client.metadata()
    assert fake.behaviour.calls["GetModelMetadata"] == 1
    assert caught.value.attempts == 1
    assert caught.value.details == "failing on purpose (1/5)"


def test_retries_stop_after_max_attempts() -> None:
    with (
        serve_fake(Behaviour(fail_first=100, fail_methods=frozenset({"Predict"}))) as fake,
        ConvServeClient(fake.target, retries=FAST_RETRIES) as client,
        pytest.raises(UnavailableError) as caught,
    ):
        client.predict(numbered_images(1))
    assert caught.value.attempts == 4
    assert fake.behaviour.calls["Predict"] == 4


# Waits of 1, 2, 4, 8, 8, ... s without jitter: after 1 + 2 + 4 + 8 = 15 s of a 20 s
# deadline, the next 8 s wait would end past it, so the call fails then, at 15 s.
DEADLINE_BOUND = RetryPolicy(
    max_attempts=1000, initial_backoff_s=1.0, max_backoff_s=8.0, multiplier=2.0, jitter=0.0
)
DEADLINE_BOUND_WAITS = [1.0, 2.0, 4.0, 8.0]


def test_retrying_never_exceeds_the_deadline() -> None:
    clock = FakeClock()
    behaviour = Behaviour(fail_first=10**6, fail_methods=frozenset({"Predict"}))
    with (
        serve_fake(behaviour) as fake,
        ConvServeClient(
            fake.target, retries=DEADLINE_BOUND, timeout_s=20.0, clock=clock, sleep=clock.sleep
        ) as client,
        pytest.raises(UnavailableError) as caught,
    ):
        client.predict(numbered_images(1))
    assert clock.sleeps == DEADLINE_BOUND_WAITS
    assert clock.now == 15.0
    assert caught.value.attempts == fake.behaviour.calls["Predict"] == 5


async def test_async_retrying_never_exceeds_the_deadline() -> None:
    clock = FakeClock()
    behaviour = Behaviour(fail_first=10**6, fail_methods=frozenset({"Predict"}))
    with serve_fake(behaviour) as fake:
        async with AsyncConvServeClient(
            fake.target,
            retries=DEADLINE_BOUND,
            timeout_s=20.0,
            clock=clock,
            sleep=clock.async_sleep,
        ) as client:
            with pytest.raises(UnavailableError) as caught:
                await client.predict(numbered_images(1))
    assert clock.sleeps == DEADLINE_BOUND_WAITS
    assert clock.now == 15.0
    assert caught.value.attempts == fake.behaviour.calls["Predict"] == 5


async def test_async_retries_then_succeeds() -> None:
    with serve_fake(Behaviour(fail_first=2)) as fake:
        async with AsyncConvServeClient(fake.target, retries=FAST_RETRIES) as client:
            assert (await client.metadata()).serving_version == 7
    assert fake.behaviour.calls["GetModelMetadata"] == 3


def test_slow_server_hits_the_deadline_once() -> None:
    with (
        serve_fake(Behaviour(delay_s=2.0)) as fake,
        ConvServeClient(fake.target, timeout_s=0.3) as client,
    ):
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            client.metadata()
        assert time.monotonic() - start < 1.0  # the server would take 2 s
    assert fake.behaviour.calls["GetModelMetadata"] == 1


def test_per_call_timeout_overrides_the_default() -> None:
    with (
        serve_fake(Behaviour(delay_s=0.5)) as fake,
        ConvServeClient(fake.target, timeout_s=0.1) as client,
    ):
        assert client.metadata(timeout_s=5.0).model_name == "fake"


def test_unreachable_server_is_unavailable() -> None:
    with (
        nothing_listens() as target,
        ConvServeClient(target, retries=FAST_RETRIES) as client,
        pytest.raises(UnavailableError) as caught,
    ):
        client.health()
    assert caught.value.attempts == 4


def test_unknown_model_is_not_found(fake: RunningFake) -> None:
    with ConvServeClient(fake.target, model_name="nope") as client, pytest.raises(NotFoundError):
        client.metadata()
    with ConvServeClient(fake.target) as client:
        with pytest.raises(NotFoundError, match="model 'nope' not found"):
            client.predict(numbered_images(1), model="nope")
        with pytest.raises(NotFoundError, match="model 'nope' not found"):
            client.feature_maps(numbered_images(1), model="nope")
        with pytest.raises(UnavailableError, match="model 'broken' has no usable version"):
            client.predict(numbered_images(1), model="broken")
    assert fake.behaviour.calls["Predict"] == 0


# --- Several models ------------------------------------------------------------------------


def test_each_call_names_its_model_and_reads_images_in_its_shape(fake: RunningFake) -> None:
    digits8 = np.zeros((3, 8, 8), np.uint8)
    digits8[:, 0, 0] = [3, 4, 15]
    with ConvServeClient(fake.target) as client:
        small = client.predict(digits8, model="digits8")
        again = client.predict(digits8[0], model="digits8", model_version=1)
        fashion = client.predict(numbered_images(3), model="fashion")
        default = client.predict(numbered_images(2))
        with pytest.raises(InputError, match=r"shape must be \[N,8,8,1\], .*got \[1, 28, 28\]"):
            client.predict(numbered_images(1), model="digits8")
    assert (small.model_name, small.model_version) == ("digits8", 1)
    assert small.class_indices.tolist() == [3, 4, 5]
    assert small.labels == ["3", "4", "5"]
    assert again.labels == ["3"]
    assert fashion.labels == ["T-shirt/top", "Trouser", "Pullover"]
    assert fashion.model_name == "fashion"
    assert default.model_name == "fake"
    assert fake.behaviour.shapes == [(3, 8, 8, 1), (1, 8, 8, 1), (3, 28, 28, 1), (2, 28, 28, 1)]
    # Each model's input shape is asked for once, before its first prediction.
    assert fake.behaviour.models == [
        ("GetModelMetadata", "digits8"),
        ("Predict", "digits8"),
        ("Predict", "digits8"),
        ("GetModelMetadata", "fashion"),
        ("Predict", "fashion"),
        ("GetModelMetadata", ""),
        ("Predict", ""),
    ]


@pytest.fixture
def sent_specs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, pb.ModelSpec]]:
    """(method, ModelSpec) of every call the fake server reads a model spec from."""
    seen: list[tuple[str, pb.ModelSpec]] = []
    resolve = fakes.FakeConvServe._model

    def recording(self: Any, method: str, spec: pb.ModelSpec, context: Any) -> Any:
        seen.append((method, pb.ModelSpec.FromString(spec.SerializeToString())))
        return resolve(self, method, spec, context)

    monkeypatch.setattr(fakes.FakeConvServe, "_model", recording)
    return seen


def test_calls_by_version_label_send_the_label(
    fake: RunningFake, sent_specs: list[tuple[str, pb.ModelSpec]]
) -> None:
    canary = pb.ModelSpec(name="digits8", version_label="canary")
    with ConvServeClient(fake.target) as client:
        client.predict(np.zeros((8, 8), np.uint8), model="digits8", version_label="canary")
        client.feature_maps(np.zeros((8, 8), np.uint8), model="digits8", version_label="canary")
        client.metadata(model="digits8", version_label="stable")
        client.predict(np.zeros((8, 8), np.uint8), model="digits8", model_version=1)
    assert sent_specs == [
        ("GetModelMetadata", canary),  # the input shape, of the labelled version
        ("Predict", canary),
        ("GetFeatureMaps", canary),
        ("GetModelMetadata", pb.ModelSpec(name="digits8", version_label="stable")),
        ("Predict", pb.ModelSpec(name="digits8", version=1)),
    ]


async def test_async_calls_by_version_label_send_the_label(
    fake: RunningFake, sent_specs: list[tuple[str, pb.ModelSpec]]
) -> None:
    image = np.zeros((8, 8), np.uint8)
    async with AsyncConvServeClient(fake.target) as client:
        await client.predict(image, model="digits8", version_label="canary")
        await client.feature_maps(image, model="digits8", version_label="canary")
        await client.metadata(model="digits8", version_label="canary")
    canary = pb.ModelSpec(name="digits8", version_label="canary")
    assert sent_specs == [
        ("GetModelMetadata", canary),
        ("Predict", canary),
        ("GetFeatureMaps", canary),
        ("GetModelMetadata", canary),
    ]


async def test_a_version_and_a_label_together_are_refused_before_sending(
    fake: RunningFake,
) -> None:
    image = np.zeros((8, 8), np.uint8)
    with ConvServeClient(fake.target) as client:
        for call in (client.predict, client.feature_maps):
            with pytest.raises(InputError, match="give one or neither"):
                call(image, model="digits8", model_version=1, version_label="canary")
        with pytest.raises(InputError, match="give one or neither"):
            client.metadata(model="digits8", model_version=1, version_label="canary")
    async with AsyncConvServeClient(fake.target) as aclient:
        with pytest.raises(InputError, match="give one or neither"):
            await aclient.predict(image, model="digits8", model_version=1, version_label="c")
        with pytest.raises(InputError, match="give one or neither"):
            await aclient.metadata(model="digits8", model_version=1, version_label="c")
    assert sum(fake.behaviour.calls.values()) == 0


def test_client_model_name_is_the_default_for_every_call(fake: RunningFake) -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    image[0, 0, 0] = 5  # class 5 % 3 = 2
    with ConvServeClient(fake.target, model_name="rgb") as client:
        result = client.predict(image)
        maps = client.feature_maps(image, layers=["conv1"])
        meta = client.metadata()
        other = client.predict(numbered_images(2), model="fake")
    assert (result.class_indices.tolist(), result.labels) == ([2], ["blue"])
    assert result.probabilities.shape == (1, 3)
    np.testing.assert_allclose(result.probabilities[0], [0.01, 0.01, 0.98])
    assert maps.maps["conv1"].shape == (2, 2, 4)
    assert (maps.model_name, maps.model_version) == ("rgb", 3)
    assert meta.class_names == ("red", "green", "blue")
    assert meta.input_shape == (4, 4, 3)
    assert meta.training.confusion_matrix is not None
    assert meta.training.confusion_matrix.tolist() == [[5, 1, 0], [0, 6, 0], [1, 0, 4]]
    assert meta.training.confusion_matrix.dtype == np.int64
    assert other.model_name == "fake"
    assert fake.behaviour.models == [
        ("GetModelMetadata", "rgb"),
        ("Predict", "rgb"),
        ("GetFeatureMaps", "rgb"),
        ("GetModelMetadata", "rgb"),
        ("GetModelMetadata", "fake"),
        ("Predict", "fake"),
    ]


def test_image_files_are_prepared_at_the_model_size(fake: RunningFake) -> None:
    stroke = np.full((60, 40), 255, np.uint8)
    stroke[10:50, 15:25] = 0
    buffer = io.BytesIO()
    Image.fromarray(stroke).save(buffer, format="PNG")
    with ConvServeClient(fake.target) as client:
        client.predict(buffer.getvalue(), model="digits8")
        client.predict([buffer.getvalue(), buffer.getvalue()], model="rgb")
    assert fake.behaviour.shapes == [(1, 8, 8, 1), (2, 4, 4, 3)]
    assert fake.behaviour.dtypes == ["uint8", "uint8"]


def test_list_models(fake: RunningFake) -> None:
    with ConvServeClient(fake.target) as client:
        listing = client.list_models()
    assert listing.default_model == "fake"
    assert [m.name for m in listing] == ["broken", "digits8", "fake", "fashion", "rgb"]
    assert len(listing) == 5
    broken, digits8, default = listing.models[:3]
    assert broken == ModelStatus(
        "broken",
        False,
        (VersionStatus(1, "END", False, "no serving_default signature"),),
        error="no version loads",
    )
    assert default.memory_bytes == 96 * 2**20
    assert broken.serving_version is None
    assert digits8.versions == (
        VersionStatus(1, "AVAILABLE", True, ""),
        VersionStatus(2, "LOADING", False, ""),
    )
    assert (digits8.ready, digits8.serving_version) == (True, 1)
    assert default.serving_version == 7
    assert fake.behaviour.calls == {"ListModels": 1}


async def test_async_list_models_and_models_per_call(fake: RunningFake) -> None:
    digits8 = np.zeros((5, 8, 8), np.uint8)
    digits8[:, 0, 0] = np.arange(5)
    async with AsyncConvServeClient(fake.target) as client:
        listing = await client.list_models()
        # Concurrent calls for a model share one metadata call.
        results = await asyncio.gather(
            *(client.predict(digits8[i], model="digits8") for i in range(5))
        )
        meta = await client.metadata(model="fashion")
        maps = await client.feature_maps(numbered_images(1), model="fashion")
        with pytest.raises(NotFoundError, match="model 'nope' not found"):
            await client.predict(digits8, model="nope")
    assert listing.default_model == "fake"
    assert listing.models[2] == ModelStatus(
        "fake",
        True,
        (VersionStatus(6, "AVAILABLE", False, ""), VersionStatus(7, "AVAILABLE", True, "")),
        memory_bytes=96 * 2**20,
        labels=(("canary", 7), ("stable", 6)),
        label_errors=("label 'next' -> 8 not applied: version 8 is not loaded",),
    )
    assert [r.labels for r in results] == [["0"], ["1"], ["2"], ["3"], ["4"]]
    assert meta.class_names[9] == "Ankle boot"
    assert maps.model_name == "fashion"
    assert fake.behaviour.calls["GetModelMetadata"] == 3  # digits8, fashion, nope
    assert fake.behaviour.models.count(("Predict", "digits8")) == 5
    assert ("GetFeatureMaps", "fashion") in fake.behaviour.models


async def test_stream_calls_name_their_model(fake: RunningFake) -> None:
    colour = np.zeros((2, 4, 4, 3), np.uint8)
    colour[:, 0, 0, 0] = [1, 2]
    async with (
        AsyncConvServeClient(fake.target) as client,
        client.predict_stream(model="digits8") as stream,
    ):
        small = await stream.predict(np.zeros((8, 8), np.uint8))
        rgb = await stream.predict(colour, model="rgb")
        with pytest.raises(NotFoundError, match="version 2 of model 'digits8' is not loaded"):
            await stream.predict(np.zeros((8, 8), np.uint8), model_version=2)
    assert (small.model_name, small.labels) == ("digits8", ["0"])
    assert (rgb.model_name, rgb.labels) == ("rgb", ["green", "blue"])
    assert fake.behaviour.models == [
        ("GetModelMetadata", "digits8"),
        ("PredictStream", "digits8"),
        ("GetModelMetadata", "rgb"),
        ("PredictStream", "rgb"),
        ("PredictStream", "digits8"),
    ]


def test_responses_without_labels_or_with_bad_fields() -> None:
    request = convert.predict_requests(
        np.zeros((2, 2, 2), np.uint8),
        max_batch_images=8,
        spec=convert.model_spec(),
        shape=(2, 2, 1),
    )
    probabilities = np.array([[0.2, 0.8], [0.6, 0.4]], np.float32)
    old = pb.PredictResponse(
        model_name="m", model_version=1, digits=[1, 0], confidences=[0.8, 0.6],
        probabilities=to_tensor(probabilities),
    )  # fmt: skip
    result = convert.predict_result(request, [old])
    assert result.labels == ["1", "0"]  # a server that names no classes: the index as text
    np.testing.assert_array_equal(result.probabilities, probabilities)
    wrong = pb.PredictResponse()
    wrong.CopyFrom(old)
    wrong.labels.append("only one")
    with pytest.raises(InternalError, match="1 labels for 2 images"):
        convert.predict_result(request, [wrong])
    meta = pb.GetModelMetadataResponse(
        model_name="m",
        inputs=[pb.TensorSpec(name="x", shape=[-1, 784])],
        class_names=["a", "b"],
        training=pb.TrainingRecord(confusion_matrix=[1, 2, 3, 4]),
    )
    parsed = convert.metadata_result(meta)
    assert parsed.training.confusion_matrix is not None
    assert parsed.training.confusion_matrix.tolist() == [[1, 2], [3, 4]]
    with pytest.raises(InternalError, match=r"declares input shape \[-1, 784\], expected"):
        _ = parsed.input_shape
    meta.training.confusion_matrix.append(5)
    with pytest.raises(InternalError, match="confusion_matrix has 5 values, expected 2x2"):
        convert.metadata_result(meta)


# --- Health ------------------------------------------------------------------------------


def test_wait_for_serving_returns_once_serving(fake: RunningFake) -> None:
    def serving_after_three_polls(sleeps: int) -> None:
        if sleeps == 3:
            fake.health.set("", health_pb2.HealthCheckResponse.SERVING)

    fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    clock = FakeClock(on_sleep=serving_after_three_polls)
    with ConvServeClient(fake.target, clock=clock, sleep=clock.sleep) as client:
        assert client.health() == "NOT_SERVING"
        assert client.wait_for_serving(10.0, poll_interval_s=0.5) == "SERVING"
    assert clock.sleeps == [0.5, 0.5, 0.5]


async def test_async_wait_for_serving_gives_up_with_the_last_status(fake: RunningFake) -> None:
    fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    clock = FakeClock()
    async with AsyncConvServeClient(fake.target, clock=clock, sleep=clock.async_sleep) as client:
        # Polls at 0, 1, 2 and 3 s; at 3 s a poll 1 s later would come too late.
        assert await client.wait_for_serving(4.0, poll_interval_s=1.0) == "NOT_SERVING"
        assert clock.sleeps == [1.0, 1.0, 1.0]
        # The health protocol answers NOT_FOUND for a service it does not know.
        with pytest.raises(NotFoundError):
            await client.health("no.such.Service")


def test_wait_for_serving_raises_when_nothing_answers() -> None:
    with (
        nothing_listens() as target,
        ConvServeClient(target, retries=0) as client,
        pytest.raises(UnavailableError),
    ):
        client.wait_for_serving(0.3, poll_interval_s=0.05)


# --- Authentication and TLS ------------------------------------------------------------------


def test_token_is_sent_and_checked() -> None:
    with serve_fake(Behaviour(token="s3cret")) as fake:
        with ConvServeClient(fake.target, token="s3cret") as client:
            assert client.metadata().model_name == "fake"
        for token in ("wrong", None):
            with (
                ConvServeClient(fake.target, token=token) as client,
                pytest.raises(UnauthenticatedError, match="bearer token"),
            ):
                client.metadata()
    assert fake.behaviour.calls["GetModelMetadata"] == 3  # never retried


def _server_credentials(certs: Certs, *, require_client: bool) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
        root_certificates=certs.ca.read_bytes() if require_client else None,
        require_client_auth=require_client,
    )


def test_tls_with_a_private_ca(certs: Certs) -> None:
    credentials = _server_credentials(certs, require_client=False)
    with serve_fake(credentials=credentials) as fake:
        with ConvServeClient(fake.target, tls=TlsConfig(root_ca=certs.ca)) as client:
            assert client.health() == "SERVING"
        by_name = TlsConfig(root_ca=certs.ca.read_bytes(), server_name_override="localhost")
        with ConvServeClient(fake.target, tls=by_name) as client:
            assert client.metadata().model_name == "fake"
        # The system's roots do not trust the test CA; plaintext is refused too.
        for tls in (True, False):
            with (
                ConvServeClient(fake.target, tls=tls, retries=0) as client,
                pytest.raises(UnavailableError),
            ):
                client.health()


def test_mutual_tls(certs: Certs) -> None:
    credentials = _server_credentials(certs, require_client=True)
    with serve_fake(credentials=credentials) as fake:
        mtls = TlsConfig(
            root_ca=certs.ca, client_cert=certs.client_cert, client_key=certs.client_key
        )
        with ConvServeClient(fake.target, tls=mtls) as client:
            assert client.health() == "SERVING"
        with (
            ConvServeClient(fake.target, tls=TlsConfig(root_ca=certs.ca), retries=0) as client,
            pytest.raises(UnavailableError),
        ):
            client.health()


def test_tls_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="given together"):
        ConvServeClient("localhost:1", tls=TlsConfig(client_cert=b"x"))
    with pytest.raises(ValueError, match="cannot read"):
        ConvServeClient("localhost:1", tls=TlsConfig(root_ca=tmp_path / "missing.pem"))


# --- Balancing over replicas ------------------------------------------------------------------


def test_round_robin_spreads_calls_over_every_address() -> None:
    with serve_fake() as first, serve_fake() as second:
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
        with ConvServeClient(target) as client:
            for _ in range(20):
                client.metadata()
    assert first.behaviour.calls["GetModelMetadata"] >= 5
    assert second.behaviour.calls["GetModelMetadata"] >= 5
    assert (
        first.behaviour.calls["GetModelMetadata"] + second.behaviour.calls["GetModelMetadata"] == 20
    )


def test_channel_options_ask_for_round_robin_and_keepalive() -> None:
    options = dict(channel_options())
    assert '"round_robin"' in options["grpc.service_config"]
    assert options["grpc.keepalive_time_ms"] > 0
    assert options["grpc.keepalive_permit_without_calls"] == 0
