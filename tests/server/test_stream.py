"""PredictStream: `Calls.stream` on its own, then the servicer and the SDK over real gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.client import AsyncConvServeClient, NotFoundError, UnauthenticatedError
from convserve.server import errors
from convserve.server.app import RunningServer, start_server
from convserve.server.protocols.calls import Calls
from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from convserve.v1.tensor_codec import to_tensor
from tests.fake_metrics import FakeMetrics
from tests.fake_runtime import FakeRuntime, fake_probabilities
from tests.polling import until
from tests.server.wire_helpers import settings_for

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
    metrics = FakeMetrics()
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
    answers = Calls("convserve", FakeMetrics()).stream(
        "PredictStream", source, handle, failed, max_in_flight=3
    )
    consumer = asyncio.create_task(_all(answers))
    await settle()
    assert source.taken == 3
    release.set()
    assert sorted(await consumer) == list(range(10))
    assert source.taken == 10


async def test_a_message_holds_its_slot_until_its_answer_is_taken() -> None:
    metrics = FakeMetrics()

    async def handle(message: int) -> int:
        return message

    source = Source(list(range(10)))
    answers = Calls("convserve", metrics).stream(
        "PredictStream", source, handle, failed, max_in_flight=3
    )
    # Answers are ready at once, but nobody takes them: reading stops at the limit.
    first = await anext(answers)
    await settle()
    assert source.taken == 3
    assert len(metrics.started) == 3
    # Taking one answer more frees the slot of the one taken before it (it was written).
    second = await anext(answers)
    await settle()
    assert source.taken == 4
    assert [first, second] == [0, 1]
    assert sorted([first, second, *await _all(answers)]) == list(range(10))


async def test_closing_a_stream_cancels_its_unanswered_messages() -> None:
    metrics = FakeMetrics()
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

    answers = Calls("convserve", FakeMetrics()).stream(
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
    stub: tuple[RunningServer, FakeRuntime, FakeMetrics],
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
    expected = fake_probabilities(images.reshape(40, 28, 28, 1))
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.predictions[0].probabilities, expected[i])
        assert result.predictions[0].digit == unary.predictions[i].digit
    assert pinned.model_version == 1
    assert len(pinned.predictions) == 3
    finished = [f for f in metrics.finished if f[1] == "PredictStream"]
    assert finished.count(("convserve", "PredictStream", "OK")) == 41
    assert finished.count(("convserve", "PredictStream", "NOT_FOUND")) == 1


async def test_stream_messages_are_handled_concurrently(
    stub: tuple[RunningServer, FakeRuntime, FakeMetrics],
) -> None:
    running, runtime, _ = stub
    runtime.gate = asyncio.Event()
    async with AsyncConvServeClient(running.target) as client, client.predict_stream() as stream:
        calls = [asyncio.ensure_future(stream.predict(numbered(3)[i])) for i in range(3)]
        # All three reach the model while none has been answered.
        await until(lambda: runtime.started_predictions == 3, what="three predictions started")
        assert not any(call.done() for call in calls)
        runtime.gate.set()
        results = await asyncio.gather(*calls)
    assert [r.predictions[0].digit for r in results] == [0, 1, 2]


async def test_bad_stream_messages_get_error_answers_naming_the_field(
    stub: tuple[RunningServer, FakeRuntime, FakeMetrics],
) -> None:
    async with grpc.aio.insecure_channel(stub[0].target) as channel:
        client = convserve_pb2_grpc.ConvServeStub(channel)
        good = convserve_pb2.PredictRequest(images=to_tensor(np.zeros((1, 784), np.float32)))
        wrong = convserve_pb2.PredictRequest(images=to_tensor(np.zeros((1, 5), np.float32)))
        messages = [
            convserve_pb2.PredictStreamRequest(id=1),
            convserve_pb2.PredictStreamRequest(id=2, request=wrong),
            convserve_pb2.PredictStreamRequest(id=3, request=good),
        ]
        answers = {a.id: a async for a in client.PredictStream(iter(messages))}
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[1].error.message == "images: a tensor is required, got none"
    assert answers[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[2].error.message == (
        "images: shape [N,28,28,1], [N,28,28] or [N,784] expected, got [1, 5]"
    )
    assert answers[3].WhichOneof("result") == "response"
    assert list(answers[3].response.digits) == [0]


async def test_a_stream_needs_the_token_like_any_call() -> None:
    runtime, metrics = FakeRuntime(), FakeMetrics()
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


# The client's HTTP/2 receive window: with BDP probing off it stays at the lookahead,
# so the client's transport accepts only a few answers that its application has not read.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


async def test_a_client_that_never_reads_holds_the_server_at_max_in_flight() -> None:
    max_in_flight, count = 8, 10_000
    runtime, metrics = FakeRuntime(), FakeMetrics()
    running = await start_server(
        settings_for(max_stream_in_flight=max_in_flight), runtime=runtime, metrics=metrics
    )
    images = numbered(256)
    try:
        async with grpc.aio.insecure_channel(running.target, options=SMALL_WINDOW) as channel:
            call = convserve_pb2_grpc.ConvServeStub(channel).PredictStream()

            async def write() -> None:
                for i in range(count):
                    request = convserve_pb2.PredictRequest(
                        images=to_tensor(images[i % 256 : i % 256 + 1])
                    )
                    await call.write(convserve_pb2.PredictStreamRequest(id=i, request=request))
                await call.done_writing()

            writer = asyncio.create_task(write())
            # Wait until the server stops handling messages. That is the absence of an
            # event, so it is waited for: no progress for 1 s, while a server that
            # buffers answers handles a message every fraction of a millisecond (the
            # bound below is passed within the first few ms). Up to 60 s in all.
            bound = max_in_flight + 64
            last, quiet_since = -1, asyncio.get_running_loop().time()
            while asyncio.get_running_loop().time() - quiet_since < 1.0:
                await asyncio.sleep(0.05)
                if runtime.started_predictions > bound:
                    break
                if runtime.started_predictions != last:
                    last, quiet_since = (
                        runtime.started_predictions,
                        asyncio.get_running_loop().time(),
                    )
            # Handled: the max_in_flight messages holding slots, plus the answers that
            # were written into the client's 1 KiB window (about 75 bytes each, so ~14)
            # and the ones gRPC's send path accepted. Without the bound all 10,000 are.
            assert max_in_flight <= runtime.started_predictions <= bound
            assert not writer.done()  # flow control holds the client back
            answers = [answer async for answer in call]
            await writer
    finally:
        await running.stop(0)
    assert sorted(answer.id for answer in answers) == list(range(count))
    for answer in answers:
        assert list(answer.response.digits) == [answer.id % 256 % 10]
    assert len(metrics.finished) == count
    assert {code for _, _, code in metrics.finished} == {"OK"}


async def test_stream_messages_cut_off_by_the_deadline_count_as_deadline_exceeded(
    stub: tuple[RunningServer, FakeRuntime, FakeMetrics],
) -> None:
    running, runtime, metrics = stub
    runtime.gate = asyncio.Event()  # never set: the predictions wait until cancelled
    async with grpc.aio.insecure_channel(running.target) as channel:
        call = convserve_pb2_grpc.ConvServeStub(channel).PredictStream(timeout=0.3)
        for i in range(2):
            request = convserve_pb2.PredictRequest(images=to_tensor(numbered(1)))
            await call.write(convserve_pb2.PredictStreamRequest(id=i, request=request))
        assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The client sees the status before the server's cancelled tasks have counted
    # themselves; nothing signals that moment, so this polls.
    await until(lambda: len(metrics.finished) == 2, what="both messages counted")
    assert metrics.finished == [("convserve", "PredictStream", "DEADLINE_EXCEEDED")] * 2
