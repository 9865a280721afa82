"""The convserve.v1 ConvServe servicer.

Each method translates its request with `converters`, delegates to the shared
runtime and translates the result back. Request accounting and the error ->
status mapping (`errors.status_of`) are those of every other protocol
(`protocols.calls.Calls`), labelled ``protocol="convserve"``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from convserve.server import converters, types
from convserve.server.protocols.calls import Calls
from convserve.v1 import convserve_pb2, convserve_pb2_grpc

SERVICE = convserve_pb2.DESCRIPTOR.services_by_name["ConvServe"].full_name
PROTOCOL: types.Protocol = "convserve"

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class ConvServeServicer(convserve_pb2_grpc.ConvServeServicer):
    """Serves convserve.v1 from a runtime with the `Runtime` interface."""

    def __init__(self, runtime: Any, metrics: Any, *, max_stream_in_flight: int = 128) -> None:
        self._runtime = runtime
        self._calls = Calls(PROTOCOL, metrics)
        self._max_stream_in_flight = max_stream_in_flight

    async def Predict(
        self, request: convserve_pb2.PredictRequest, context: Context
    ) -> convserve_pb2.PredictResponse:
        async def run() -> convserve_pb2.PredictResponse:
            value = converters.predict_request_from_proto(request, self._runtime.check_images)
            result = await self._runtime.predict(
                value, deadline=self._calls.deadline(context), protocol=PROTOCOL
            )
            return converters.predict_response_to_proto(result)

        return await self._calls.run("Predict", context, run)

    async def PredictStream(
        self, request_iterator: AsyncIterator[convserve_pb2.PredictStreamRequest], context: Context
    ) -> AsyncIterator[convserve_pb2.PredictStreamResponse]:
        deadline = self._calls.deadline(context)

        async def handle(
            message: convserve_pb2.PredictStreamRequest,
        ) -> convserve_pb2.PredictStreamResponse:
            request_id, value = converters.predict_stream_request_from_proto(
                message, self._runtime.check_images
            )
            result = await self._runtime.predict(value, deadline=deadline, protocol=PROTOCOL)
            return converters.predict_stream_response_to_proto(request_id, result)

        def failed(
            message: convserve_pb2.PredictStreamRequest, code: grpc.StatusCode, text: str
        ) -> convserve_pb2.PredictStreamResponse:
            failure = types.StreamFailure(code.value[0], text)
            return converters.predict_stream_response_to_proto(message.id, failure)

        answers = self._calls.stream(
            "PredictStream", request_iterator, handle, failed, self._max_stream_in_flight
        )
        async for answer in answers:
            yield answer

    async def Convolve(
        self, request: convserve_pb2.ConvolveRequest, context: Context
    ) -> convserve_pb2.ConvolveResponse:
        async def run() -> convserve_pb2.ConvolveResponse:
            value = converters.convolve_request_from_proto(request)
            result = await self._runtime.convolve(value, deadline=self._calls.deadline(context))
            return converters.convolve_response_to_proto(result)

        return await self._calls.run("Convolve", context, run)

    async def FitKernel(
        self, request: convserve_pb2.FitKernelRequest, context: Context
    ) -> convserve_pb2.FitKernelResponse:
        async def run() -> convserve_pb2.FitKernelResponse:
            value = converters.fit_kernel_request_from_proto(request)
            result = await self._runtime.fit_kernel(value, deadline=self._calls.deadline(context))
            return converters.fit_kernel_response_to_proto(result)

        return await self._calls.run("FitKernel", context, run)

    async def GetFeatureMaps(
        self, request: convserve_pb2.GetFeatureMapsRequest, context: Context
    ) -> convserve_pb2.GetFeatureMapsResponse:
        async def run() -> convserve_pb2.GetFeatureMapsResponse:
            value = converters.feature_maps_request_from_proto(request, self._runtime.check_images)
            result = await self._runtime.feature_maps(value, deadline=self._calls.deadline(context))
            return converters.feature_maps_response_to_proto(result)

        return await self._calls.run("GetFeatureMaps", context, run)

    async def GetModelMetadata(
        self, request: convserve_pb2.GetModelMetadataRequest, context: Context
    ) -> convserve_pb2.GetModelMetadataResponse:
        async def run() -> convserve_pb2.GetModelMetadataResponse:
            ref = converters.metadata_request_from_proto(request)
            return converters.metadata_response_to_proto(self._runtime.metadata(ref))

        return await self._calls.run("GetModelMetadata", context, run)


def add_to_server(
    server: grpc.aio.Server, runtime: Any, metrics: Any, *, max_stream_in_flight: int = 128
) -> list[str]:
    """Adds the ConvServe service; returns its full name (for health and reflection)."""
    servicer = ConvServeServicer(runtime, metrics, max_stream_in_flight=max_stream_in_flight)
    convserve_pb2_grpc.add_ConvServeServicer_to_server(servicer, server)
    return [SERVICE]
