"""The ConvServe servicer over real gRPC, in front of a stand-in runtime.

Checks translation in both directions, delegation, the error -> status mapping
and the request accounting (protocol "convserve"), independent of the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from convserve.server import converters, errors, types
from convserve.server.app import RunningServer, start_server
from convserve.server.metrics import Metrics
from convserve.server.protocols.calls import OFFLOAD_MIN_BYTES, cancelled_code
from convserve.server.protocols.convserve_grpc import ConvServeServicer
from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from convserve.v1.tensor_codec import from_tensor, to_tensor
from tests.fake_metrics import FakeMetrics
from tests.fake_runtime import FakeModel, FakeRuntime, fake_probabilities
from tests.polling import until
from tests.server.wire_helpers import settings_for


@pytest.fixture
async def stub_client(
    stub: tuple[RunningServer, FakeRuntime, FakeMetrics],
) -> AsyncIterator[convserve_pb2_grpc.ConvServeStub]:
    async with grpc.aio.insecure_channel(stub[0].target) as channel:
        yield convserve_pb2_grpc.ConvServeStub(channel)


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_predict_translates_both_ways(
    stub: tuple[RunningServer, FakeRuntime, FakeMetrics],
    stub_client: convserve_pb2_grpc.ConvServeStub,
) -> None:
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    reply = await stub_client.Predict(convserve_pb2.PredictRequest(images=to_tensor(images)))
    expected = fake_probabilities(images)
    np.testing.assert_array_equal(from_tensor(reply.probabilities, "probabilities"), expected)
    assert list(reply.digits) == list(expected.argmax(axis=1))
    assert list(reply.confidences) == [1.0] * 5
    assert list(reply.labels) == [str(d) for d in expected.argmax(axis=1)]
    assert (reply.model_name, reply.model_version) == ("mnist", 2)
    assert stub[2].finished[-1] == ("convserve", "Predict", "OK")
    assert stub[2].started[-1] == ("convserve", "Predict")
    # A request naming no model is counted under the default model.
    assert stub[2].labelled[-1] == ("convserve", "Predict", "mnist", "OK")


async def test_predict_pins_a_version(stub_client: convserve_pb2_grpc.ConvServeStub) -> None:
    request = convserve_pb2.PredictRequest(images=to_tensor(np.zeros((1, 784), np.float32)))
    request.model_spec.version = 1
    reply = await stub_client.Predict(request)
    assert reply.model_version == 1
    request.model_spec.version = 9
    error = await failure(stub_client.Predict(request))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "version 9 is not loaded" in (error.details() or "")


async def test_predict_errors_are_counted_with_their_code(
    stub: tuple[RunningServer, FakeRuntime, FakeMetrics],
    stub_client: convserve_pb2_grpc.ConvServeStub,
) -> None:
    error = await failure(stub_client.Predict(convserve_pb2.PredictRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "images: a tensor is required, got none"
    assert stub[2].finished[-1] == ("convserve", "Predict", "INVALID_ARGUMENT")


async def test_client_errors_are_logged_at_debug_only(
    stub_client: convserve_pb2_grpc.ConvServeStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        await failure(stub_client.Predict(convserve_pb2.PredictRequest()))
    rejections = [r for r in caplog.records if r.name == "convserve.server.rejections"]
    assert [r.getMessage() for r in rejections if r.levelno == logging.DEBUG] == [
        "rejected convserve Predict with INVALID_ARGUMENT: images: a tensor is required, got none"
    ] * 5
    # The summary's INFO lines are rate-limited; nothing is logged as a server problem.
    assert len([r for r in rejections if r.levelno == logging.INFO]) <= 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_convolve_delegates(stub_client: convserve_pb2_grpc.ConvServeStub) -> None:
    x = np.arange(9, dtype=np.float64).reshape(3, 3)
    k = np.array([[0.0, 1.0], [2.0, 3.0]])
    reply = await stub_client.Convolve(
        convserve_pb2.ConvolveRequest(input=to_tensor(x), kernel=to_tensor(k))
    )
    np.testing.assert_allclose(from_tensor(reply.output, "output"), [[19, 25], [37, 43]])


async def test_fit_kernel_delegates(stub_client: convserve_pb2_grpc.ConvServeStub) -> None:
    x = np.ones((6, 8))
    x[:, 2:6] = 0
    y = x[:, :-1] - x[:, 1:]
    reply = await stub_client.FitKernel(
        convserve_pb2.FitKernelRequest(
            inputs=to_tensor(x), targets=to_tensor(y), kernel_shape=[1, 2], tolerance=1e-10
        )
    )
    np.testing.assert_allclose(from_tensor(reply.kernel, "kernel"), [[1, -1]], atol=0.05)
    assert reply.stop_reason in {"converged", "max_steps"}
    assert reply.steps >= 1
    assert len(reply.loss) == reply.steps + 1
    assert not reply.HasField("bias")


async def test_feature_maps_delegate(stub_client: convserve_pb2_grpc.ConvServeStub) -> None:
    image = np.arange(784, dtype=np.uint8).reshape(784) % 200
    reply = await stub_client.GetFeatureMaps(
        convserve_pb2.GetFeatureMapsRequest(image=to_tensor(image), layers=["conv2"])
    )
    assert [fm.layer for fm in reply.feature_maps] == ["conv2"]
    conv2 = from_tensor(reply.feature_maps[0].activations, "activations")
    np.testing.assert_array_equal(conv2, image.reshape(28, 28, 1)[::2, ::2].astype(np.float32) * 2)
    error = await failure(
        stub_client.GetFeatureMaps(
            convserve_pb2.GetFeatureMapsRequest(image=to_tensor(image), layers=["conv9"])
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("layers: ")


async def test_metadata_delegates(stub_client: convserve_pb2_grpc.ConvServeStub) -> None:
    reply = await stub_client.GetModelMetadata(convserve_pb2.GetModelMetadataRequest())
    assert (reply.model_name, list(reply.loaded_versions), reply.serving_version) == (
        "mnist",
        [1, 2],
        2,
    )
    assert reply.inputs[0].name == "images"
    assert list(reply.inputs[0].shape) == [-1, 28, 28, 1]
    assert reply.layers[0].name == "conv1"
    assert reply.training.dataset == "sample"
    assert list(reply.training.confusion_matrix) == (np.eye(10, dtype=int) * 3).ravel().tolist()
    assert list(reply.class_names) == [str(d) for d in range(10)]
    assert reply.device == "/CPU:0"
    error = await failure(
        stub_client.GetModelMetadata(
            convserve_pb2.GetModelMetadataRequest(model_spec=convserve_pb2.ModelSpec(name="cifar"))
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "model_spec.name: unknown model 'cifar' (served: 'mnist')"


async def test_unexpected_errors_become_internal_without_details(
    stub: tuple[RunningServer, FakeRuntime, FakeMetrics],
    stub_client: convserve_pb2_grpc.ConvServeStub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(value: types.ConvolveInput, *, deadline: float | None) -> Any:
        raise RuntimeError("secret internal detail")

    stub[1].convolve = broken  # type: ignore[method-assign]
    request = convserve_pb2.ConvolveRequest(
        input=to_tensor(np.ones((3, 3))), kernel=to_tensor(np.ones((2, 2)))
    )
    error = await failure(stub_client.Convolve(request))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (error.details() or "")
    assert "secret internal detail" in caplog.text
    assert stub[2].finished[-1] == ("convserve", "Convolve", "INTERNAL")


async def test_deadline_is_passed_as_absolute_monotonic_time(
    stub: tuple[RunningServer, FakeRuntime, FakeMetrics],
    stub_client: convserve_pb2_grpc.ConvServeStub,
) -> None:
    import time

    seen: list[float | None] = []
    real = stub[1].convolve

    async def recording(value: types.ConvolveInput, *, deadline: float | None) -> Any:
        seen.append(deadline)
        return await real(value, deadline=deadline)

    stub[1].convolve = recording  # type: ignore[method-assign]
    request = convserve_pb2.ConvolveRequest(
        input=to_tensor(np.ones((3, 3))), kernel=to_tensor(np.ones((2, 2)))
    )
    before = time.monotonic()
    await stub_client.Convolve(request, timeout=30)
    await stub_client.Convolve(request)
    assert seen[0] is not None
    # gRPC sends a 30 s timeout rounded up to 100 ms units: up to 0.1 s more.
    assert before + 25 < seen[0] <= time.monotonic() + 30.2
    assert seen[1] is None


async def finished_record(metrics: FakeMetrics, rpc: str) -> tuple[str, str, str]:
    """The accounting record of `rpc`, once the server's handler has ended.

    The client sees the status before the server's cancelled handler has run
    its accounting; nothing signals that moment, so this polls.
    """
    records = await until(
        lambda: [f for f in metrics.finished if f[1] == rpc], what=f"{rpc} counted as finished"
    )
    return records[-1]


async def test_a_call_that_outlives_its_deadline_is_counted_as_deadline_exceeded(
    stub: tuple[RunningServer, FakeRuntime, FakeMetrics],
    stub_client: convserve_pb2_grpc.ConvServeStub,
) -> None:
    _, runtime, metrics = stub
    runtime.gate = asyncio.Event()  # never set: the prediction waits until cancelled
    request = convserve_pb2.PredictRequest(images=to_tensor(np.zeros((1, 784), np.uint8)))
    error = await failure(stub_client.Predict(request, timeout=0.3))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await finished_record(metrics, "Predict") == (
        "convserve",
        "Predict",
        "DEADLINE_EXCEEDED",
    )


async def test_a_call_the_client_cancels_is_counted_as_cancelled(
    stub: tuple[RunningServer, FakeRuntime, FakeMetrics],
    stub_client: convserve_pb2_grpc.ConvServeStub,
) -> None:
    _, runtime, metrics = stub
    runtime.gate = asyncio.Event()
    request = convserve_pb2.PredictRequest(images=to_tensor(np.zeros((1, 784), np.uint8)))
    call = stub_client.Predict(request, timeout=60)
    for _ in range(1000):  # until the request has reached the model (up to 10 s)
        if runtime.started_predictions:
            break
        await asyncio.sleep(0.01)
    assert runtime.started_predictions == 1
    call.cancel()
    assert await finished_record(metrics, "Predict") == ("convserve", "Predict", "CANCELLED")


def test_cancelled_code_tells_deadlines_from_cancellations() -> None:
    class Context:
        def __init__(self, remaining: float | None) -> None:
            self.remaining = remaining

        def time_remaining(self) -> float | None:
            return self.remaining

    deadline, cancelled = grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED
    assert cancelled_code(Context(0.0), 0.3) == deadline
    assert cancelled_code(Context(0.2), 0.3) == cancelled
    # A 30 s timeout reaches the server rounded up by up to 100 ms: the client gives
    # up (and cancels) while the server still sees up to 0.1 s left.
    assert cancelled_code(Context(0.1), 30.0) == deadline
    assert cancelled_code(Context(2.0), 30.0) == cancelled
    assert cancelled_code(Context(None), None) == cancelled
    assert cancelled_code(None, None) == cancelled


async def test_a_huge_model_name_gets_a_short_status(
    stub_client: convserve_pb2_grpc.ConvServeStub,
) -> None:
    name = "a" * 9000
    images = to_tensor(np.zeros((1, 784), np.uint8))
    calls = [
        stub_client.Predict(
            convserve_pb2.PredictRequest(
                images=images, model_spec=convserve_pb2.ModelSpec(name=name)
            )
        ),
        stub_client.GetModelMetadata(
            convserve_pb2.GetModelMetadataRequest(model_spec=convserve_pb2.ModelSpec(name=name))
        ),
    ]
    for call in calls:
        error = await failure(call)
        # Echoed in full, the name would not fit the trailers (8 KiB) and the client
        # would see a metadata-size error instead.
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert (error.details() or "").startswith("model_spec.name: unknown model 'aaa")
        assert len(error.details() or "") <= errors.MAX_MESSAGE_CHARS


async def test_a_huge_repeated_field_is_shown_cut_short(
    stub_client: convserve_pb2_grpc.ConvServeStub,
) -> None:
    request = convserve_pb2.ConvolveRequest(
        input=to_tensor(np.ones((3, 3))),
        kernel=to_tensor(np.ones((2, 2))),
        options=convserve_pb2.ConvolutionOptions(strides=[1] * 100_000),
    )
    error = await failure(stub_client.Convolve(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert details.startswith("options.strides: two values [stride_h, stride_w]")
    assert details.endswith("(300000 characters)")
    assert len(details) < 200


def test_every_convserve_method_is_implemented() -> None:
    service = convserve_pb2.DESCRIPTOR.services_by_name["ConvServe"]
    for method in service.methods:
        # The generated base class answers UNIMPLEMENTED by raising an exception.
        own = getattr(ConvServeServicer, method.name)
        assert own is not getattr(convserve_pb2_grpc.ConvServeServicer, method.name), method.name


async def test_large_payloads_are_converted_off_the_event_loop(
    stub_client: convserve_pb2_grpc.ConvServeStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: dict[str, list[int]] = {"request": [], "response": []}

    def recording(name: str, which: str) -> None:
        real = getattr(converters, name)

        def record(*args: Any) -> Any:
            threads[which].append(threading.get_ident())
            return real(*args)

        monkeypatch.setattr(converters, name, record)

    recording("convolve_request_from_proto", "request")
    recording("convolve_response_to_proto", "response")
    loop_thread = threading.get_ident()  # the in-process server shares this loop
    small = np.ones((8, 8), np.float32)
    large = np.ones((1024, 512), np.float32)  # 2 MiB in and out: over OFFLOAD_MIN_BYTES
    assert large.nbytes >= OFFLOAD_MIN_BYTES > small.nbytes
    for x in (small, large):
        reply = await stub_client.Convolve(
            convserve_pb2.ConvolveRequest(
                input=to_tensor(x), kernel=to_tensor(np.ones((1, 1), np.float32))
            )
        )
        np.testing.assert_array_equal(from_tensor(reply.output, "output"), x)
    assert threads["request"][0] == loop_thread == threads["response"][0]
    assert threads["request"][1] != loop_thread != threads["response"][1]


# -- several models --------------------------------------------------------------

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS8 = FakeModel("digits8", versions=(3,), shape=(8, 8, 1), class_names=WORDS)
SERVED = "(served: 'digits8', 'mnist')"


@dataclass
class TwoModels:
    client: convserve_pb2_grpc.ConvServeStub
    runtime: FakeRuntime
    metrics: Metrics


@pytest.fixture
async def two_models() -> AsyncIterator[TwoModels]:
    """A server for "mnist" (28x28x1, the default) and "digits8" (8x8x1), with real metrics."""
    runtime = FakeRuntime([FakeModel("mnist"), DIGITS8], default_model="mnist")
    metrics = Metrics()
    running = await start_server(settings_for(), runtime=runtime, metrics=metrics)
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            yield TwoModels(convserve_pb2_grpc.ConvServeStub(channel), runtime, metrics)
    finally:
        await running.stop(0)


def predict_request(
    images: np.ndarray, model: str = "", version: int | None = None
) -> convserve_pb2.PredictRequest:
    spec = convserve_pb2.ModelSpec(name=model)
    if version is not None:
        spec.version = version
    return convserve_pb2.PredictRequest(model_spec=spec, images=to_tensor(images))


def requests_total(metrics: Metrics) -> dict[tuple[str, str, str, str], float]:
    """convserve_requests_total as {(protocol, rpc, model, code): count}, from a scrape."""
    text = prometheus_client.generate_latest(metrics.registry).decode()
    counts: dict[tuple[str, str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "convserve_requests_total":
                labels = sample.labels
                key = (labels["protocol"], labels["rpc"], labels["model"], labels["code"])
                counts[key] = sample.value
    return counts


async def test_predict_routes_by_model_name(two_models: TwoModels) -> None:
    small = np.random.default_rng(2).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    reply = await two_models.client.Predict(predict_request(small, "digits8"))
    expected = fake_probabilities(small)
    assert (reply.model_name, reply.model_version) == ("digits8", 3)
    np.testing.assert_array_equal(from_tensor(reply.probabilities, "probabilities"), expected)
    assert list(reply.digits) == expected.argmax(axis=1).tolist()
    assert list(reply.labels) == [WORDS[d] for d in expected.argmax(axis=1)]

    large = np.random.default_rng(3).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    reply = await two_models.client.Predict(predict_request(large))
    assert (reply.model_name, reply.model_version) == ("mnist", 2)
    assert list(reply.labels) == [str(d) for d in fake_probabilities(large).argmax(axis=1)]
    pinned = await two_models.client.Predict(predict_request(large, "mnist", 1))
    assert (pinned.model_name, pinned.model_version) == ("mnist", 1)

    error = await failure(two_models.client.Predict(predict_request(small, "digits8", 2)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == (
        "model_spec.version: model 'digits8' version 2 is not loaded (loaded versions: [3])"
    )
    shapes = [call[1][1] for call in two_models.runtime.calls if call[0] == "predict"]
    assert shapes == [(3, 8, 8, 1), (2, 28, 28, 1), (2, 28, 28, 1)]


async def test_images_are_checked_against_the_named_models_shape(two_models: TwoModels) -> None:
    cases: list[tuple[np.ndarray, str, str, list[int]]] = [
        (np.zeros((1, 28, 28), np.uint8), "digits8", "[N,8,8,1], [N,8,8] or [N,64]", [1, 28, 28]),
        (np.zeros((2, 8, 8, 1), np.uint8), "", "[N,28,28,1], [N,28,28] or [N,784]", [2, 8, 8, 1]),
        (np.zeros((1, 784), np.float32), "digits8", "[N,8,8,1], [N,8,8] or [N,64]", [1, 784]),
    ]
    for images, model, accepted, got in cases:
        error = await failure(two_models.client.Predict(predict_request(images, model)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == f"images: shape {accepted} expected, got {got}"
    assert two_models.runtime.started_predictions == 0


async def test_feature_maps_and_metadata_route_by_model_name(two_models: TwoModels) -> None:
    image = np.arange(64, dtype=np.uint8).reshape(1, 8, 8)
    reply = await two_models.client.GetFeatureMaps(
        convserve_pb2.GetFeatureMapsRequest(
            model_spec=convserve_pb2.ModelSpec(name="digits8"), image=to_tensor(image)
        )
    )
    assert (reply.model_name, reply.model_version) == ("digits8", 3)
    maps = {fm.layer: from_tensor(fm.activations, fm.layer) for fm in reply.feature_maps}
    assert list(maps) == ["conv1", "conv2"]
    np.testing.assert_array_equal(maps["conv1"], image.reshape(8, 8, 1).astype(np.float32))
    np.testing.assert_array_equal(
        maps["conv2"], image.reshape(8, 8, 1)[::2, ::2].astype(np.float32) * 2
    )
    # The default model takes 28x28: the runtime refuses the 8x8 image for it.
    error = await failure(
        two_models.client.GetFeatureMaps(
            convserve_pb2.GetFeatureMapsRequest(image=to_tensor(image))
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("image: shape [N,28,28,1]")

    meta = await two_models.client.GetModelMetadata(
        convserve_pb2.GetModelMetadataRequest(model_spec=convserve_pb2.ModelSpec(name="digits8"))
    )
    assert (meta.model_name, list(meta.loaded_versions), meta.serving_version) == (
        "digits8",
        [3],
        3,
    )
    assert list(meta.inputs[0].shape) == [-1, 8, 8, 1]
    assert list(meta.outputs[0].shape) == [-1, 10]
    assert list(meta.class_names) == list(WORDS)


async def test_an_unknown_model_is_not_found_naming_it_and_the_served_ones(
    two_models: TwoModels,
) -> None:
    spec = convserve_pb2.ModelSpec(name="fashion")
    image = to_tensor(np.zeros((1, 28, 28), np.uint8))
    calls = [
        two_models.client.Predict(convserve_pb2.PredictRequest(model_spec=spec, images=image)),
        two_models.client.GetFeatureMaps(
            convserve_pb2.GetFeatureMapsRequest(model_spec=spec, image=image)
        ),
        two_models.client.GetModelMetadata(convserve_pb2.GetModelMetadataRequest(model_spec=spec)),
    ]
    for call in calls:
        error = await failure(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == f"model_spec.name: unknown model 'fashion' {SERVED}"

    messages = [
        convserve_pb2.PredictStreamRequest(
            id=1, request=predict_request(np.zeros((1, 28, 28), np.uint8), "fashion")
        ),
        convserve_pb2.PredictStreamRequest(
            id=2, request=predict_request(np.ones((1, 8, 8), np.uint8), "digits8")
        ),
    ]
    answers = {a.id: a async for a in two_models.client.PredictStream(iter(messages))}
    assert answers[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert answers[1].error.message == f"model_spec.name: unknown model 'fashion' {SERVED}"
    assert answers[2].response.model_name == "digits8"
    assert list(answers[2].response.labels) == [WORDS[64 % 10]]


async def test_list_models(two_models: TwoModels) -> None:
    reply = await two_models.client.ListModels(convserve_pb2.ListModelsRequest())
    assert reply.default_model == "mnist"
    listed = [
        (m.name, m.ready, [(v.version, v.state, v.serving, v.error) for v in m.versions])
        for m in reply.models
    ]
    assert listed == [
        ("digits8", True, [(3, "AVAILABLE", True, "")]),
        ("mnist", True, [(1, "AVAILABLE", False, ""), (2, "AVAILABLE", True, "")]),
    ]


async def test_a_model_that_is_not_ready_is_listed_so_and_unavailable() -> None:
    runtime = FakeRuntime(
        [FakeModel("mnist"), FakeModel("fashion", versions=(1,), ready=False)],
        default_model="fashion",
    )
    running = await start_server(settings_for(), runtime=runtime, metrics=FakeMetrics())
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            client = convserve_pb2_grpc.ConvServeStub(channel)
            reply = await client.ListModels(convserve_pb2.ListModelsRequest())
            images = np.zeros((1, 28, 28), np.uint8)
            error = await failure(client.Predict(predict_request(images)))
            served = await client.Predict(predict_request(images, "mnist"))
    finally:
        await running.stop(0)
    assert reply.default_model == "fashion"
    assert [(m.name, m.ready) for m in reply.models] == [("fashion", False), ("mnist", True)]
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "model 'fashion' is not ready"
    assert served.model_name == "mnist"


async def test_requests_are_counted_by_the_model_they_name(two_models: TwoModels) -> None:
    client = two_models.client
    small, large = np.zeros((1, 8, 8), np.uint8), np.zeros((1, 28, 28), np.uint8)
    await client.Predict(predict_request(small, "digits8"))
    await client.Predict(predict_request(small, "digits8", 3))
    await client.Predict(predict_request(large))
    await failure(client.Predict(predict_request(large, "fashion")))
    await failure(client.Predict(predict_request(large, "digits8")))
    await client.GetModelMetadata(
        convserve_pb2.GetModelMetadataRequest(model_spec=convserve_pb2.ModelSpec(name="digits8"))
    )
    await client.Convolve(
        convserve_pb2.ConvolveRequest(
            input=to_tensor(np.ones((3, 3))), kernel=to_tensor(np.ones((2, 2)))
        )
    )
    await client.ListModels(convserve_pb2.ListModelsRequest())
    messages = [
        convserve_pb2.PredictStreamRequest(id=1, request=predict_request(small, "digits8")),
        convserve_pb2.PredictStreamRequest(id=2, request=predict_request(small, "a" * 300)),
    ]
    answers = [a async for a in client.PredictStream(iter(messages))]
    assert sorted(a.WhichOneof("result") for a in answers) == ["error", "response"]
    # Every call is counted before its answer is sent, so the scrape sees them all.
    assert requests_total(two_models.metrics) == {
        ("convserve", "Predict", "digits8", "OK"): 2,
        ("convserve", "Predict", "mnist", "OK"): 1,
        ("convserve", "Predict", "_unknown", "NOT_FOUND"): 1,
        ("convserve", "Predict", "digits8", "INVALID_ARGUMENT"): 1,
        ("convserve", "GetModelMetadata", "digits8", "OK"): 1,
        ("convserve", "Convolve", "", "OK"): 1,
        ("convserve", "ListModels", "", "OK"): 1,
        ("convserve", "PredictStream", "digits8", "OK"): 1,
        ("convserve", "PredictStream", "_unknown", "NOT_FOUND"): 1,
    }
