"""PredictStream: `Calls.stream` on its own, then the servicer and the SDK over real gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.client import AsyncConvServeClient, NotFoundError, UnauthenticatedError
from convserve.client.tensor import to_tensor
from convserve.server import errors
from convserve.server.app import RunningServer, start_server
from convserve.server.protocols.calls import Calls
from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from tests.server.wire_helpers import StubMetrics, StubRuntime, settings_for, stub_probabilities

# -- Calls.stream, without gRPC -------------------------------------------------


class Source:
    """An async message source that records how many messages were taken from it."""

    def __init__(self, messages: list[Any]) -> None:
        self.messages = messages
        self.taken = 0

    async def __aiter__(self) -> AsyncIterator[Any]:
        for message in self.messages:
            self.taken += 1
            yield message


async def settle() -> None:
    """Let every task that can run, run (loop turns, no wall-clock waiting)."""
    for _ in range(20):
        await asyncio.sleep(0)


def failed(message: Any, code: grpc.StatusCode, text: str) -> tuple[Any, str, str]:
    return (message, code.name, text)


async def test_stream_answers_as_messages_finish_and_failures_become_answers() -> None:
    metrics = StubMetrics()
    gates = {name: asyncio.Event() for name in ("a", "b", "c")}

    async def handle(message: str) -> tuple[str, str, str]:
        await gates[message].wait()
        if message == "b":
            raise errors.NotFound("version 9 is not loaded")
        return (message, "OK", "")

    answers = Calls("convserve", metrics).stream(
        "PredictStream", Source(["a", "b", "c"]), handle, failed, max_in_flight=8
    )
    collected: list[Any] = []

    async def collect() -> None:
        async for answer in answers:
            collected.append(answer)

    consumer = asyncio.create_task(collect())
    await settle()
    assert collected == []  # all three are held: they run concurrently
    for name in ("c", "b", "a"):
        gates[name].set()
        await settle()
    await consumer
    assert collected == [
        ("c", "OK", ""),
        ("b", "NOT_FOUND", "version 9 is not loaded"),
        ("a", "OK", ""),
    ]
    assert metrics.started == [("convserve", "PredictStream")] * 3
    assert sorted(code for _, _, code in metrics.finished) == ["NOT_FOUND", "OK", "OK"]


async def test_stream_reads_no_further_than_max_in_flight() -> None:
    release = asyncio.Event()

    async def handle(message: int) -> int:
        await release.wait()
        return message

    source = Source(list(range(10)))
    answers = Calls("convserve", StubMetrics()).stream(
        "PredictStream", source, handle, failed, max_in_flight=3
    )
    consumer = asyncio.create_task(_all(answers))
    await settle()
    assert source.taken == 3
    release.set()
    assert sorted(await consumer) == list(range(10))
    assert source.taken == 10


async def test_closing_a_stream_cancels_its_unanswered_messages() -> None:
    metrics = StubMetrics()
    cancelled: list[int] = []

    async def handle(message: int) -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(message)
            raise
        return message

    answers = Calls("convserve", metrics).stream(
        "PredictStream", Source([1, 2]), handle, failed, max_in_flight=8
    )
    consumer = asyncio.ensure_future(anext(answers))
    await settle()
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await answers.aclose()
    await settle()
    assert sorted(cancelled) == [1, 2]
    assert [code for _, _, code in metrics.finished] == ["CANCELLED", "CANCELLED"]


async def test_unexpected_handler_errors_are_internal_without_details() -> None:
    async def handle(message: int) -> int:
        raise RuntimeError("secret detail")

    answers = Calls("convserve", StubMetrics()).stream(
        "PredictStream", Source([1]), handle, failed, max_in_flight=1
    )
    assert await _all(answers) == [(1, "INTERNAL", "internal error; see the server log")]


async def _all(answers: AsyncIterator[Any]) -> list[Any]:
    return [answer async for answer in answers]


# -- over gRPC ----------------------------------------------------------------------


def numbered(count: int) -> np.ndarray:
    """uint8 images whose first pixel is their index (the stub model's answer)."""
    images = np.zeros((count, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(count)
    return images


async def test_sdk_stream_gives_each_caller_its_own_result(
    stub: tuple[RunningServer, StubRuntime, StubMetrics],
) -> None:
    running, _, metrics = stub
    images = numbered(40)
    async with AsyncConvServeClient(running.target) as client:
        unary = await client.predict(images)
    async with AsyncConvServeClient(running.target) as client, client.predict_stream() as stream:
        results = await asyncio.gather(*(stream.predict(images[i]) for i in range(40)))
        with pytest.raises(NotFoundError, match="version 9 is not loaded"):
            await stream.predict(images[:2], model_version=9)
        # The stream goes on after a failed request.
        pinned = await stream.predict(images[:3], model_version=1)
    expected = stub_probabilities(images.reshape(40, 28, 28, 1))
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.predictions[0].probabilities, expected[i])
        assert result.predictions[0].digit == unary.predictions[i].digit
    assert pinned.model_version == 1
    assert len(pinned.predictions) == 3
    finished = [f for f in metrics.finished if f[1] == "PredictStream"]
    assert finished.count(("convserve", "PredictStream", "OK")) == 41
    assert finished.count(("convserve", "PredictStream", "NOT_FOUND")) == 1


async def test_stream_messages_are_handled_concurrently(
    stub: tuple[RunningServer, StubRuntime, StubMetrics],
) -> None:
    running, runtime, _ = stub
    runtime.gate = asyncio.Event()
    async with AsyncConvServeClient(running.target) as client, client.predict_stream() as stream:
        calls = [asyncio.ensure_future(stream.predict(numbered(3)[i])) for i in range(3)]
        for _ in range(500):
            if runtime.started_predictions == 3:
                break
            await asyncio.sleep(0.01)
        # All three reached the model while none had been answered.
        assert runtime.started_predictions == 3
        assert not any(call.done() for call in calls)
        runtime.gate.set()
        results = await asyncio.gather(*calls)
    assert [r.predictions[0].digit for r in results] == [0, 1, 2]


async def test_bad_stream_messages_get_error_answers_naming_the_field(
    stub: tuple[RunningServer, StubRuntime, StubMetrics],
) -> None:
    async with grpc.aio.insecure_channel(stub[0].target) as channel:
        stub = convserve_pb2_grpc.ConvServeStub(channel)
        good = convserve_pb2.PredictRequest(images=to_tensor(np.zeros((1, 784), np.float32)))
        wrong = convserve_pb2.PredictRequest(images=to_tensor(np.zeros((1, 5), np.float32)))
        messages = [
            convserve_pb2.PredictStreamRequest(id=1),
            convserve_pb2.PredictStreamRequest(id=2, request=wrong),
            convserve_pb2.PredictStreamRequest(id=3, request=good),
        ]
        answers = {a.id: a async for a in stub.PredictStream(iter(messages))}
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[1].error.message == "images: a tensor is required, got none"
    assert answers[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[2].error.message == (
        "images: [N,28,28], [N,28,28,1] or [N,784] expected, got [1, 5]"
    )
    assert answers[3].WhichOneof("result") == "response"
    assert list(answers[3].response.digits) == [0]


async def test_a_stream_needs_the_token_like_any_call() -> None:
    runtime, metrics = StubRuntime(), StubMetrics()
    running = await start_server(
        settings_for(auth_token="s3cret-token"), runtime=runtime, metrics=metrics
    )
    try:
        async with (
            AsyncConvServeClient(running.target) as client,
            client.predict_stream() as stream,
        ):
            with pytest.raises(UnauthenticatedError):
                await stream.predict(numbered(1))
            # Once the stream has ended, later calls fail at once with its error.
            with pytest.raises(UnauthenticatedError):
                await stream.predict(numbered(1))
        async with (
            AsyncConvServeClient(running.target, token="s3cret-token") as client,
            client.predict_stream() as stream,
        ):
            assert (await stream.predict(numbered(2))).model_version == 2
    finally:
        await running.stop(0)
    assert runtime.started_predictions == 1
