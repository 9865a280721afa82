"""The Open Inference Protocol (KServe v2) gRPC service: ``inference.GRPCInferenceService``.

Serves the digit model and the ``conv2d`` convolution model (see
`oip_convert` for the tensor and parameter conventions) through the shared
runtime, so requests are batched, limited and counted with convserve.v1's.
The servicer only translates and delegates; the other methods of the service
(streaming, repository, shared memory, ...) answer UNIMPLEMENTED (see
`calls.unimplemented_answered`). ModelInfer requests whose typed contents exceed the
server's ``max_typed_payload_bytes`` are refused before they are parsed
(`oip_convert.infer_request_deserializer`).
"""

from __future__ import annotations

import logging
from typing import Any

from tritonclient.grpc import service_pb2, service_pb2_grpc

from convserve.server import errors, types
from convserve.server.protocols import oip_convert
from convserve.server.protocols.calls import (
    DEFAULT_MAX_TYPED_PAYLOAD_BYTES,
    Calls,
    add_servicer,
    off_loop,
    server_version,
    unimplemented_answered,
)
from convserve.server.protocols.wire import RefusedRequest

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PROTOCOL: types.Protocol = "oip"
log = logging.getLogger(__name__)


@unimplemented_answered(service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"])
class OipServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime: Any, metrics: Any) -> None:
        self._runtime = runtime
        self._calls = Calls(PROTOCOL, metrics)

    async def ServerLive(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            return service_pb2.ServerLiveResponse(live=True)

        return await self._calls.run("ServerLive", context, run)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            return service_pb2.ServerReadyResponse(ready=self._runtime.ready)

        return await self._calls.run("ServerReady", context, run)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            return service_pb2.ModelReadyResponse(ready=self._model_ready(request))

        return await self._calls.run("ModelReady", context, run)

    def _model_ready(self, request: Any) -> bool:
        # As Triton does, an unknown model or version is simply not ready.
        if not self._runtime.ready:
            return False
        try:
            if request.name == oip_convert.CONV_MODEL:
                oip_convert.check_conv_version(request.version)
            else:
                self._runtime.metadata(oip_convert.model_ref(request.name, request.version))
        except (errors.NotFound, errors.InvalidArgument):
            return False
        return True

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            return service_pb2.ServerMetadataResponse(name="convserve", version=server_version())

        return await self._calls.run("ServerMetadata", context, run)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        async def run() -> Any:
            if request.name == oip_convert.CONV_MODEL:
                oip_convert.check_conv_version(request.version)
                return oip_convert.conv_metadata_response()
            ref = oip_convert.model_ref(request.name, request.version, "version")
            meta = self._runtime.metadata(ref)
            return oip_convert.model_metadata_response(meta, ref.version)

        return await self._calls.run("ModelMetadata", context, run)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        # Converting a large payload runs in a thread (`off_loop`), so that it cannot
        # stall the other calls on the event loop.
        async def run() -> Any:
            if isinstance(request, RefusedRequest):
                raise request.error
            deadline = self._calls.deadline(context)
            size = oip_convert.request_bytes(request)
            if request.model_name == oip_convert.CONV_MODEL:
                conv, raw = await off_loop(oip_convert.convolve_request, request, size_bytes=size)
                result = await self._runtime.convolve(conv, deadline=deadline)
                return await off_loop(
                    oip_convert.convolve_response,
                    request,
                    result,
                    raw,
                    size_bytes=result.output.nbytes,
                )
            value, outputs, raw = await off_loop(self._predict_input, request, size_bytes=size)
            output = await self._runtime.predict(value, deadline=deadline, protocol=PROTOCOL)
            return await off_loop(
                oip_convert.predict_response,
                request,
                output,
                outputs,
                raw,
                size_bytes=output.probabilities.nbytes,
            )

        return await self._calls.run("ModelInfer", context, run)

    def _predict_input(self, request: Any) -> tuple[types.PredictInput, list[str], bool]:
        images, ref, outputs, raw = oip_convert.predict_request(request)
        checked = self._runtime.check_images(images, field="inputs[images]")
        return types.PredictInput(checked, ref), outputs, raw


class OipAdapter:
    """Adds the Open Inference Protocol service to a convserve server."""

    name = "oip"

    def add_to_server(
        self,
        server: Any,
        runtime: Any,
        metrics: Any,
        *,
        max_typed_payload_bytes: int = DEFAULT_MAX_TYPED_PAYLOAD_BYTES,
    ) -> list[str]:
        """Adds the service; ModelInfer requests with more than `max_typed_payload_bytes`
        of typed contents get INVALID_ARGUMENT without being parsed."""
        add_servicer(
            service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            OipServicer(runtime, metrics),
            server,
            {"ModelInfer": oip_convert.infer_request_deserializer(max_typed_payload_bytes)},
        )
        return [SERVICE]
