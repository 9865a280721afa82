"""The ConvServe servicer over real gRPC, in front of a stand-in runtime.

Checks translation in both directions, delegation, the error -> status mapping
and the request accounting (protocol "convserve"), independent of the model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.client.tensor import from_tensor, to_tensor
from convserve.server import types
from convserve.server.app import RunningServer
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
    assert before + 25 < seen[0] <= time.monotonic() + 30
    assert seen[1] is None
