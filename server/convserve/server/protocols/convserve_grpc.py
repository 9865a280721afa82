"""convserve.v1 over gRPC: the ``convserve.v1.ConvServe`` service.

Each unary method is one translation (`protocols.calls.unary`): the request
through `converters` into a typed value, the runtime's answer back. Translations
of payloads of at least `calls.OFFLOAD_MIN_BYTES` run in a thread
(`calls.off_loop`), so that a large message never holds up the event loop.
Request accounting and the error -> status mapping (`errors.status_of`) are
those of every other protocol (`protocols.calls.Calls`), labelled
``protocol="convserve"`` and with the model the request names
(`api.RuntimeApi.model_label`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from convserve.server import api, converters, types
from convserve.server.protocols.calls import (
    DEFAULT_ADAPTER_OPTIONS,
    DEFAULT_MAX_STREAM_IN_FLIGHT,
    AdapterOptions,
    Calls,
    off_loop,
    unary,
)
from convserve.v1 import convserve_pb2, convserve_pb2_grpc

SERVICE = convserve_pb2.DESCRIPTOR.services_by_name["ConvServe"].full_name
PROTOCOL: types.Protocol = "convserve"

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class ConvServeServicer(convserve_pb2_grpc.ConvServeServicer):
    """Serves convserve.v1 from a runtime (`api.RuntimeApi`)."""

    def __init__(
        self,
        runtime: api.RuntimeApi,
        metrics: api.RequestMetrics,
        *,
        max_stream_in_flight: int = DEFAULT_MAX_STREAM_IN_FLIGHT,
        replica: str = "",
    ) -> None:
        self._runtime = runtime
        self._calls = Calls(PROTOCOL, metrics, model_label=runtime.model_label, replica=replica)
        self._max_stream_in_flight = max_stream_in_flight

    @unary("Predict", model=lambda request: request.model_spec.name)
    async def Predict(
        self, request: convserve_pb2.PredictRequest, context: Context
    ) -> convserve_pb2.PredictResponse:
        value = await off_loop(
            converters.predict_request_from_proto, request, size_bytes=request.ByteSize()
        )
        result = await self._runtime.predict(value, deadline=self._calls.deadline(context))
        return await off_loop(
            converters.predict_response_to_proto,
            result,
            size_bytes=_nbytes(result.probabilities),
        )

    async def PredictStream(
        self, request_iterator: AsyncIterator[convserve_pb2.PredictStreamRequest], context: Context
    ) -> AsyncIterator[convserve_pb2.PredictStreamResponse]:
        deadline = self._calls.deadline(context)

        async def handle(
            message: convserve_pb2.PredictStreamRequest,
        ) -> convserve_pb2.PredictStreamResponse:
            request_id, value = await off_loop(
                converters.predict_stream_request_from_proto,
                message,
                size_bytes=message.ByteSize(),
            )
            result = await self._runtime.predict(value, deadline=deadline)
            return await off_loop(
                converters.predict_stream_response_to_proto,
                request_id,
                result,
                size_bytes=_nbytes(result.probabilities),
            )

        def failed(
            message: convserve_pb2.PredictStreamRequest, code: grpc.StatusCode, text: str
        ) -> convserve_pb2.PredictStreamResponse:
            failure = types.StreamFailure(code.value[0], text)
            return converters.predict_stream_response_to_proto(message.id, failure)

        answers = self._calls.stream(
            "PredictStream",
            request_iterator,
            handle,
            failed,
            self._max_stream_in_flight,
            context=context,
            model_of=lambda message: message.request.model_spec.name,
        )
        # Closed as soon as this stream ends, so its unanswered messages are cancelled then.
        async with contextlib.aclosing(answers):
            async for answer in answers:
                yield answer

    @unary("Convolve")
    async def Convolve(
        self, request: convserve_pb2.ConvolveRequest, context: Context
    ) -> convserve_pb2.ConvolveResponse:
        value = await off_loop(
            converters.convolve_request_from_proto, request, size_bytes=request.ByteSize()
        )
        result = await self._runtime.convolve(value, deadline=self._calls.deadline(context))
        return await off_loop(
            converters.convolve_response_to_proto, result, size_bytes=_nbytes(result.output)
        )

    @unary("FitKernel")
    async def FitKernel(
        self, request: convserve_pb2.FitKernelRequest, context: Context
    ) -> convserve_pb2.FitKernelResponse:
        value = await off_loop(
            converters.fit_kernel_request_from_proto, request, size_bytes=request.ByteSize()
        )
        result = await self._runtime.fit_kernel(value, deadline=self._calls.deadline(context))
        # The answer is a kernel and a loss curve: small, whatever the request's size.
        return converters.fit_kernel_response_to_proto(result)

    @unary("GetFeatureMaps", model=lambda request: request.model_spec.name)
    async def GetFeatureMaps(
        self, request: convserve_pb2.GetFeatureMapsRequest, context: Context
    ) -> convserve_pb2.GetFeatureMapsResponse:
        value = await off_loop(
            converters.feature_maps_request_from_proto, request, size_bytes=request.ByteSize()
        )
        result = await self._runtime.feature_maps(value, deadline=self._calls.deadline(context))
        return await off_loop(
            converters.feature_maps_response_to_proto,
            result,
            size_bytes=sum(_nbytes(maps) for _, maps in result.maps),
        )

    @unary("GetModelMetadata", model=lambda request: request.model_spec.name)
    async def GetModelMetadata(
        self, request: convserve_pb2.GetModelMetadataRequest, context: Context
    ) -> convserve_pb2.GetModelMetadataResponse:
        ref = converters.metadata_request_from_proto(request)
        return converters.metadata_response_to_proto(self._runtime.metadata(ref))

    @unary("ListModels")
    async def ListModels(
        self, request: convserve_pb2.ListModelsRequest, context: Context
    ) -> convserve_pb2.ListModelsResponse:
        return converters.list_models_response_to_proto(
            self._runtime.models(), self._runtime.default_model
        )


def _nbytes(array: Any) -> int:
    """The size of an answer's array (0 for anything that is not an array)."""
    return int(getattr(array, "nbytes", 0))


class ConvServeAdapter:
    """Adds the convserve.v1 ConvServe service to a convserve server."""

    name = "convserve"

    def add_to_server(
        self,
        server: Any,
        runtime: api.RuntimeApi,
        metrics: api.RequestMetrics,
        options: AdapterOptions = DEFAULT_ADAPTER_OPTIONS,
    ) -> list[str]:
        """Adds the service; each PredictStream stream has at most
        `options.max_stream_in_flight` messages in flight. convserve.v1's tensors are
        bytes, not typed values: `max_typed_payload_bytes` does not concern it."""
        servicer = ConvServeServicer(
            runtime,
            metrics,
            max_stream_in_flight=options.max_stream_in_flight,
            replica=options.replica,
        )
        convserve_pb2_grpc.add_ConvServeServicer_to_server(servicer, server)
        return [SERVICE]
