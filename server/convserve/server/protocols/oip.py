"""The Open Inference Protocol (KServe v2) gRPC service: ``inference.GRPCInferenceService``.

Serves every configured image classifier under its name, and the built-in
``conv2d`` convolution model (see `oip_convert` for the tensor and parameter
conventions), through the shared runtime, so requests are batched, limited and
counted with convserve.v1's. The servicer only translates and delegates.
`RepositoryIndex` lists the models; loading and unloading them through the
protocol is not offered (the model config file says which models are served),
and the other methods of the service (streaming, shared memory, ...) answer
UNIMPLEMENTED (see `calls.unimplemented_answered`). ModelInfer requests whose
typed contents exceed the server's ``max_typed_payload_bytes`` are refused
before they are parsed (`oip_convert.infer_request_deserializer`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from convserve.server import api, errors, types
from convserve.server.protocols import oip_convert
from convserve.server.protocols.calls import (
    DEFAULT_ADAPTER_OPTIONS,
    UNIMPLEMENTED_MARK,
    AdapterOptions,
    Calls,
    add_servicer,
    off_loop,
    server_version,
    unary,
    unimplemented_answered,
)
from convserve.server.protocols.wire import RefusedRequest

_SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE = _SERVICE.full_name
PROTOCOL: types.Protocol = "oip"
log = logging.getLogger(__name__)


def _not_offered(method: str, why: str) -> Callable[[Any, Any, Any], Awaitable[None]]:
    """A method the protocol defines that convserve refuses on purpose: UNIMPLEMENTED,
    saying why, the request never parsed (as for `calls.unimplemented_answered`)."""
    message = f"{SERVICE}/{method} is not implemented by convserve: {why}"

    async def answer(self: Any, request: Any, context: Any) -> None:
        log.debug("%s", message)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    answer.__name__ = answer.__qualname__ = method
    setattr(answer, UNIMPLEMENTED_MARK, True)
    return answer


_MODELS_ARE_CONFIGURED = (
    "the served models are those of --model and --model-config-file "
    "(edit the file to add or remove one)"
)


class OipModels:
    """What the protocol's methods do, over the shared runtime, in its gRPC messages:
    the gRPC servicer and the HTTP API (`oip_http`) both translate to and from these."""

    def __init__(self, runtime: api.RuntimeApi) -> None:
        self._runtime = runtime

    def model_label(self, requested: str) -> str:
        """The `model` metrics label; conv2d is an operation, not a model: counted without
        one, as convserve.v1's Convolve."""
        return "" if requested == oip_convert.CONV_MODEL else self._runtime.model_label(requested)

    @property
    def server_ready(self) -> bool:
        return self._runtime.ready

    def model_ready(self, name: str, version: str) -> bool:
        """Whether the model (pinned version) can serve; as Triton does, an unknown model or
        version is simply not ready."""
        try:
            if name == oip_convert.CONV_MODEL:
                oip_convert.check_conv_version(version)
                return self.conv_ready()
            ref = oip_convert.model_ref(name, version)
            status = self._runtime.model_status(ref.name or self._runtime.default_model)
        except (errors.NotFound, errors.InvalidArgument):
            return False
        if ref.version is None:
            return status.ready
        # A pinned version: loaded and available, and the model's engine usable.
        return status.ready and any(
            v.version == ref.version and v.state == "AVAILABLE" for v in status.versions
        )

    def conv_ready(self) -> bool:
        """conv2d needs no model of its own: it is served while the runtime is up, which a
        ready model shows (one model that cannot serve must not take conv2d down)."""
        return any(status.ready for status in self._runtime.models())

    def server_metadata(self) -> Any:
        return service_pb2.ServerMetadataResponse(name="convserve", version=server_version())

    def model_metadata(self, name: str, version: str) -> Any:
        if name == oip_convert.CONV_MODEL:
            oip_convert.check_conv_version(version)
            return oip_convert.conv_metadata_response()
        ref = oip_convert.model_ref(name, version, "version")
        meta = self._runtime.metadata(ref)
        return oip_convert.model_metadata_response(meta, ref.version)

    def repository_index(self, repository_name: str, ready_only: bool) -> Any:
        oip_convert.check_repository_name(repository_name)
        return oip_convert.repository_index_response(
            self._runtime.models(), self.conv_ready(), ready_only=ready_only
        )

    async def infer(self, request: Any, *, deadline: float | None) -> Any:
        """A ModelInferRequest's answer. Converting a large payload runs in a thread
        (`off_loop`), so that it cannot stall the other calls on the event loop."""
        size = oip_convert.request_bytes(request)
        if request.model_name == oip_convert.CONV_MODEL:
            conv, raw = await off_loop(oip_convert.convolve_request, request, size_bytes=size)
            result = await self._runtime.convolve(conv, deadline=deadline)
            return await off_loop(
                oip_convert.convolve_response, request, result, raw, size_bytes=result.output.nbytes
            )
        value, outputs, raw = await off_loop(predict_input, request, size_bytes=size)
        output = await self._runtime.predict(value, deadline=deadline)
        return await off_loop(
            oip_convert.predict_response,
            request,
            output,
            outputs,
            raw,
            size_bytes=output.probabilities.nbytes,
        )


def predict_input(request: Any) -> tuple[types.PredictInput, list[str], bool]:
    """A ModelInferRequest for a model -> what the runtime's predict takes, the outputs
    asked for and whether they are wanted raw (see `oip_convert.predict_request`)."""
    images, ref, outputs, raw = oip_convert.predict_request(request)
    return types.PredictInput(images, ref, field="inputs[images]"), outputs, raw


@unimplemented_answered(_SERVICE)
class OipServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, runtime: api.RuntimeApi, metrics: api.RequestMetrics, *, replica: str = ""
    ) -> None:
        self._models = OipModels(runtime)
        self._calls = Calls(
            PROTOCOL, metrics, model_label=self._models.model_label, replica=replica
        )

    @unary("ServerLive")
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    @unary("ServerReady")
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self._models.server_ready)

    @unary("ModelReady", model=lambda request: request.name)
    async def ModelReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ModelReadyResponse(
            ready=self._models.model_ready(request.name, request.version)
        )

    @unary("ServerMetadata")
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return self._models.server_metadata()

    @unary("ModelMetadata", model=lambda request: request.name)
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        return self._models.model_metadata(request.name, request.version)

    @unary("RepositoryIndex")
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        return self._models.repository_index(request.repository_name, request.ready)

    RepositoryModelLoad = _not_offered("RepositoryModelLoad", _MODELS_ARE_CONFIGURED)
    RepositoryModelUnload = _not_offered("RepositoryModelUnload", _MODELS_ARE_CONFIGURED)

    @unary("ModelInfer", model=lambda request: request.model_name)
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        if isinstance(request, RefusedRequest):
            raise request.error
        return await self._models.infer(request, deadline=self._calls.deadline(context))


class OipAdapter:
    """Adds the Open Inference Protocol service to a convserve server."""

    name = "oip"

    def add_to_server(
        self,
        server: Any,
        runtime: api.RuntimeApi,
        metrics: api.RequestMetrics,
        options: AdapterOptions = DEFAULT_ADAPTER_OPTIONS,
    ) -> list[str]:
        """Adds the service; ModelInfer requests with more than
        `options.max_typed_payload_bytes` of typed contents get INVALID_ARGUMENT without
        being parsed. Its one streaming method, ModelStreamInfer, is not offered:
        `max_stream_in_flight` does not concern it."""
        add_servicer(
            service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            OipServicer(runtime, metrics, replica=options.replica),
            server,
            {"ModelInfer": oip_convert.infer_request_deserializer(options.max_typed_payload_bytes)},
        )
        return [SERVICE]
