"""A server that does no work: the ceiling `make bench` compares against.

It answers convserve.v1 Predict (and each PredictStream message) and OIP
ModelInfer at once with uniform probabilities (and labels) of the right
shape, and the metadata calls the load generator makes first with an MNIST
model's shapes, on the same grpc.aio stack as convserve-server, so the load
generator measured against it shows what Python gRPC itself allows on this
machine.

    python tests/bench_noop_server.py   # prints "listening on 127.0.0.1:PORT"
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc

from convserve.v1 import convserve_pb2, convserve_pb2_grpc, tensor_pb2
from convserve.v1.tensor_codec import from_tensor, to_tensor


def answer(request: convserve_pb2.PredictRequest) -> convserve_pb2.PredictResponse:
    n = from_tensor(request.images, "images").shape[0]
    return convserve_pb2.PredictResponse(
        model_name="noop",
        model_version=1,
        digits=[0] * n,
        confidences=[0.1] * n,
        probabilities=to_tensor(np.full((n, 10), 0.1, np.float32)),
        labels=["0"] * n,
    )


METADATA = convserve_pb2.GetModelMetadataResponse(
    model_name="noop",
    loaded_versions=[1],
    serving_version=1,
    inputs=[
        convserve_pb2.TensorSpec(
            name="images",
            dtypes=[tensor_pb2.DATA_TYPE_UINT8, tensor_pb2.DATA_TYPE_FLOAT32],
            shape=[-1, 28, 28, 1],
        )
    ],
    outputs=[
        convserve_pb2.TensorSpec(
            name="probabilities", dtypes=[tensor_pb2.DATA_TYPE_FLOAT32], shape=[-1, 10]
        )
    ],
)


class NoopServicer(convserve_pb2_grpc.ConvServeServicer):
    async def Predict(
        self, request: convserve_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> convserve_pb2.PredictResponse:
        return answer(request)

    async def GetModelMetadata(
        self, request: convserve_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> convserve_pb2.GetModelMetadataResponse:
        return METADATA

    async def PredictStream(
        self,
        requests: AsyncIterator[convserve_pb2.PredictStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[convserve_pb2.PredictStreamResponse]:
        async for message in requests:
            yield convserve_pb2.PredictStreamResponse(
                id=message.id, response=answer(message.request)
            )


OIP_METADATA = service_pb2.ModelMetadataResponse(
    name="mnist",
    versions=["1"],
    platform="noop",
    inputs=[service_pb2.ModelMetadataResponse.TensorMetadata(
        name="images", datatype="UINT8", shape=[-1, 28, 28, 1])],
    outputs=[service_pb2.ModelMetadataResponse.TensorMetadata(
        name="probabilities", datatype="FP32", shape=[-1, 10])],
)  # fmt: skip


class NoopOip(service_pb2_grpc.GRPCInferenceServiceServicer):
    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelMetadataResponse:
        return OIP_METADATA

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        n = int(request.inputs[0].shape[0])
        response = service_pb2.ModelInferResponse(model_name="mnist", model_version="1")
        response.outputs.add(name="probabilities", datatype="FP32", shape=[n, 10])
        response.raw_output_contents.append(np.full((n, 10), 0.1, "<f4").tobytes())
        return response


async def serve() -> None:
    server = grpc.aio.server()
    convserve_pb2_grpc.add_ConvServeServicer_to_server(NoopServicer(), server)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(NoopOip(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve())
