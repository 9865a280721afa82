"""Many Predict requests over one PredictStream call.

Unary calls each cost a full HTTP/2 request in gRPC; on one stream, requests
are messages and cost a fraction of that, which matters for many small
concurrent requests. The server answers each message when it finishes, with
the message's id, so answers may come back in any order.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from convserve.client import convert
from convserve.client.aio import AsyncClosing, gather_or_cancel
from convserve.client.errors import ConvServeError, error_for, from_rpc_error
from convserve.client.images import ImagesInput
from convserve.client.results import PredictResult
from convserve.v1 import convserve_pb2 as pb
from convserve.v1 import convserve_pb2_grpc
from convserve.v1.images import ImageShape

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class PredictStream(AsyncClosing):
    """One PredictStream call shared by any number of concurrent `predict` calls.

    Made by `AsyncConvServeClient.predict_stream()`; use ``async with`` (or
    await `close()`). A failed request raises its `ConvServeError` and the
    stream goes on. If the stream itself ends (the server went away, the
    stream's timeout passed), every unanswered and every later `predict`
    raises the stream's error. Requests on a stream are not retried.
    """

    def __init__(
        self,
        stub: convserve_pb2_grpc.ConvServeStub,
        *,
        metadata: tuple[tuple[str, str], ...],
        model_name: str,
        input_shape: Callable[[str, int | None, str | None], Awaitable[ImageShape]],
        max_batch_images: int,
        timeout_s: float | None,
    ) -> None:
        """`input_shape(model, version, version_label)` gives a model's (H, W, C) (the
        client's cache)."""
        self._model_name = model_name
        self._input_shape = input_shape
        self._max_batch_images = max_batch_images
        self._outbox: asyncio.Queue[pb.PredictStreamRequest | None] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[pb.PredictResponse]] = {}
        self._ids = itertools.count()
        self._ended: ConvServeError | None = None
        self._call = stub.PredictStream(self._requests(), timeout=timeout_s, metadata=metadata)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def predict(
        self,
        images: ImagesInput,
        *,
        model: str = "",
        model_version: int | None = None,
        version_label: str | None = None,
    ) -> PredictResult:
        """Classify images like `AsyncConvServeClient.predict`, over this stream.

        `model`: empty for the stream's model; `model_version` or `version_label` (a
        label of the server's model config file) pins a version. A batch larger than the
        client's `max_batch_images` goes as several messages whose answers are
        joined in order. The model's input shape, when the client does not
        know it yet, is asked for with one unary GetModelMetadata call.
        """
        model = model or self._model_name
        spec = convert.model_spec(model, model_version, version_label)
        shape = await self._input_shape(model, model_version, version_label)
        requests = convert.predict_requests(
            images,
            max_batch_images=self._max_batch_images,
            spec=spec,
            shape=shape,
        )
        responses = await gather_or_cancel([self._send(request) for request in requests])
        return convert.predict_result(requests, responses)

    def _send(self, request: pb.PredictRequest) -> asyncio.Future[pb.PredictResponse]:
        if self._ended is not None:
            raise error_for(self._ended.code, self._ended.details)
        request_id = next(self._ids)
        waiter: asyncio.Future[pb.PredictResponse] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = waiter
        waiter.add_done_callback(lambda _: self._waiting.pop(request_id, None))
        self._outbox.put_nowait(pb.PredictStreamRequest(id=request_id, request=request))
        return waiter

    async def _requests(self) -> AsyncIterator[pb.PredictStreamRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        ended = error_for(grpc.StatusCode.CANCELLED, "the stream was closed")
        try:
            async for answer in self._call:
                waiter = self._waiting.get(answer.id)
                if waiter is None or waiter.done():
                    continue  # cancelled by its caller meanwhile
                if answer.HasField("response"):
                    waiter.set_result(answer.response)
                else:
                    code = _CODES.get(answer.error.code, grpc.StatusCode.UNKNOWN)
                    waiter.set_exception(error_for(code, answer.error.message))
        except grpc.RpcError as error:
            ended = from_rpc_error(error)
        except asyncio.CancelledError:
            pass
        self._ended = ended
        for waiter in list(self._waiting.values()):
            if not waiter.done():
                waiter.set_exception(ended)

    async def close(self) -> None:
        """Finish sending, wait for the answers still owed, and end the stream."""
        if not self._reader.done():
            self._outbox.put_nowait(None)
            await self._reader
