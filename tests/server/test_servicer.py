"""The ConvServe servicer over real gRPC, in front of a stand-in runtime.

Checks translation in both directions, delegation, the error -> status mapping
and the request accounting (protocol "convserve"), independent of the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.client.tensor import from_tensor, to_tensor
from convserve.server import converters, errors, types
from convserve.server.app import RunningServer
from convserve.server.protocols.calls import OFFLOAD_MIN_BYTES, cancelled_code
from convserve.server.servicer import ConvServeServicer
from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from tests.server.wire_helpers import StubMetrics, StubRuntime, stub_probabilities


@pytest.fixture
async def stub_client(
    stub: tuple[RunningServer, StubRuntime, StubMetrics],
) -> AsyncIterator[convserve_pb2_grpc.ConvServeStub]:
    async with grpc.aio.insecure_channel(stub[0].target) as channel:
        yield convserve_pb2_grpc.ConvServeStub(channel)


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_predict_translates_both_ways(
    stub: tuple[RunningServer, StubRuntime, StubMetrics],
    stub_client: convserve_pb2_grpc.ConvServeStub,
) -> None:
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    reply = await stub_client.Predict(convserve_pb2.PredictRequest(images=to_tensor(images)))
    expected = stub_probabilities(images)
    np.testing.assert_array_equal(from_tensor(reply.probabilities, "probabilities"), expected)
    assert list(reply.digits) == list(expected.argmax(axis=1))
    assert list(reply.confidences) == [1.0] * 5
    assert (reply.model_name, reply.model_version) == ("mnist", 2)
    assert stub[2].finished[-1] == ("convserve", "Predict", "OK")
    assert stub[2].started[-1] == ("convserve", "Predict")


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
    stub: tuple[RunningServer, StubRuntime, StubMetrics],
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
    assert reply.device == "/CPU:0"
    error = await failure(
        stub_client.GetModelMetadata(
            convserve_pb2.GetModelMetadataRequest(model_spec=convserve_pb2.ModelSpec(name="cifar"))
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "cifar" in (error.details() or "")


async def test_unexpected_errors_become_internal_without_details(
    stub: tuple[RunningServer, StubRuntime, StubMetrics],
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
    stub: tuple[RunningServer, StubRuntime, StubMetrics],
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


async def finished_record(metrics: StubMetrics, rpc: str) -> tuple[str, str, str]:
    """The accounting record of `rpc`, once the server's handler has ended.

    The client sees the status before the server's cancelled handler has run
    its accounting; nothing signals that moment, so this polls (up to 10 s).
    """
    for _ in range(1000):
        records = [f for f in metrics.finished if f[1] == rpc]
        if records:
            return records[-1]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{rpc} was never counted as finished")


async def test_a_call_that_outlives_its_deadline_is_counted_as_deadline_exceeded(
    stub: tuple[RunningServer, StubRuntime, StubMetrics],
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
    stub: tuple[RunningServer, StubRuntime, StubMetrics],
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
