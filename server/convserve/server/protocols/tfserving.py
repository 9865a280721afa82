"""The TensorFlow Serving gRPC services: ``tensorflow.serving.PredictionService``
(Predict, GetModelMetadata) and ``tensorflow.serving.ModelService`` (GetModelStatus).

A TF Serving client switches to convserve by changing only its address: each
configured image classifier is served under its name (``model_spec.name``)
with TF Serving's signatures (see `tfserving_convert`), through the shared
runtime, so requests are batched, limited and counted with convserve.v1's.
Classify, Regress, MultiInference and HandleReloadConfigRequest answer
UNIMPLEMENTED (the SavedModels export predict signatures only)
(`calls.unimplemented_answered`). Predict requests whose typed values exceed the
server's ``max_typed_payload_bytes`` are refused before they are parsed
(`tfserving_convert.predict_request_deserializer`).
"""

from __future__ import annotations

from typing import Any

# The *_pb2 modules register the service descriptors that reflection serves;
# the *_pb2_grpc modules alone do not import them.
from tensorflow_serving.apis import (
    model_service_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)

from convserve.server import api, types
from convserve.server.protocols import tfserving_convert
from convserve.server.protocols.calls import (
    DEFAULT_ADAPTER_OPTIONS,
    AdapterOptions,
    Calls,
    add_servicer,
    off_loop,
    unary,
    unimplemented_answered,
)
from convserve.server.protocols.wire import RefusedRequest

PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name[
    "PredictionService"
].full_name
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
PROTOCOL: types.Protocol = "tfserving"


def _spec_name(request: Any) -> str:
    return str(request.model_spec.name)


def predict_input(request: Any) -> tuple[types.PredictInput, str, list[str]]:
    """A PredictRequest -> what the runtime's predict takes, the signature and the outputs
    asked for (see `tfserving_convert.predict_request`)."""
    images, ref, signature, outputs = tfserving_convert.predict_request(request)
    field = f"inputs[{tfserving_convert.INPUT}]"
    return types.PredictInput(images, ref, field=field), signature, outputs


@unimplemented_answered(prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"])
class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, runtime: api.RuntimeApi, calls: Calls) -> None:
        self._runtime = runtime
        self._calls = calls

    @unary("Predict", model=_spec_name)
    async def Predict(self, request: Any, context: Any) -> Any:
        # Converting a large payload runs in a thread (`off_loop`), so that it cannot
        # stall the other calls on the event loop.
        if isinstance(request, RefusedRequest):
            raise request.error
        size = tfserving_convert.request_bytes(request)
        value, signature, outputs = await off_loop(predict_input, request, size_bytes=size)
        result = await self._runtime.predict(value, deadline=self._calls.deadline(context))
        return await off_loop(
            tfserving_convert.predict_response,
            result,
            signature,
            outputs,
            size_bytes=result.probabilities.nbytes,
        )

    @unary("GetModelMetadata", model=_spec_name)
    async def GetModelMetadata(self, request: Any, context: Any) -> Any:
        tfserving_convert.check_metadata_fields(request)
        ref = tfserving_convert.model_ref(request.model_spec)
        meta = self._runtime.metadata(ref)
        # The same turn of the event loop, where labels move: the version `metadata` used.
        version = self._runtime.version_of(ref) if ref.label else ref.version
        return tfserving_convert.model_metadata_response(meta, version)


@unimplemented_answered(model_service_pb2.DESCRIPTOR.services_by_name["ModelService"])
class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, runtime: api.RuntimeApi, calls: Calls) -> None:
        self._runtime = runtime
        self._calls = calls

    @unary("GetModelStatus", model=_spec_name)
    async def GetModelStatus(self, request: Any, context: Any) -> Any:
        ref = tfserving_convert.model_ref(request.model_spec)
        status = self._runtime.model_status(ref.name or self._runtime.default_model)
        # A label is the runtime's to resolve: NOT_FOUND for one the model does not have,
        # UNAVAILABLE while its version is not loaded.
        version = self._runtime.version_of(ref) if ref.label else ref.version
        return tfserving_convert.model_status_response(status, version)


class TfServingAdapter:
    """Adds the TensorFlow Serving services to a convserve server."""

    name = "tfserving"

    def add_to_server(
        self,
        server: Any,
        runtime: api.RuntimeApi,
        metrics: api.RequestMetrics,
        options: AdapterOptions = DEFAULT_ADAPTER_OPTIONS,
    ) -> list[str]:
        """Adds the services; Predict requests with more than
        `options.max_typed_payload_bytes` of typed values get INVALID_ARGUMENT without
        being parsed. The services stream nothing: `max_stream_in_flight` does not
        concern them."""
        calls = Calls(PROTOCOL, metrics, model_label=runtime.model_label, replica=options.replica)
        add_servicer(
            prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server,
            PredictionServicer(runtime, calls),
            server,
            {
                "Predict": tfserving_convert.predict_request_deserializer(
                    options.max_typed_payload_bytes
                )
            },
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(runtime, calls), server
        )
        return [PREDICTION_SERVICE, MODEL_SERVICE]
