"""One digit-prediction or convolution request, sent through each of the three protocols.

The bad-input table describes a request once (dtype, shape, bytes, model) and
sends it as convserve.v1, Open Inference Protocol and TF Serving messages, so
the test compares the status each protocol answers for the same mistake.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from convserve.v1 import tensor_pb2 as cs_tensor_pb2
from convserve.v1.tensor_codec import DTYPE_TO_PROTO

_OIP_DATATYPE = {
    "uint8": "UINT8",
    "int32": "INT32",
    "int64": "INT64",
    "float32": "FP32",
    "float64": "FP64",
}
_TF_DTYPE = {
    "uint8": types_pb2.DT_UINT8,
    "int32": types_pb2.DT_INT32,
    "int64": types_pb2.DT_INT64,
    "float32": types_pb2.DT_FLOAT,
    "float64": types_pb2.DT_DOUBLE,
}


@dataclass(frozen=True)
class Images:
    """A Predict request: images as raw bytes plus the model they are for."""

    dtype: str
    shape: tuple[int, ...]
    content: bytes
    model: str = "mnist"
    version: int | None = None

    @classmethod
    def of(cls, array: np.ndarray, **kwargs: object) -> Images:
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        return cls(array.dtype.name, array.shape, little.tobytes(), **kwargs)  # type: ignore[arg-type]


def _code(call: object, request: object) -> grpc.StatusCode:
    try:
        call(request, timeout=60)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def convserve_predict_request(images: Images) -> convserve_pb2.PredictRequest:
    request = convserve_pb2.PredictRequest(
        images=cs_tensor_pb2.Tensor(
            dtype=DTYPE_TO_PROTO[np.dtype(images.dtype)],
            shape=images.shape,
            content=images.content,
        )
    )
    request.model_spec.name = images.model
    if images.version is not None:
        request.model_spec.version = images.version
    return request


def oip_predict_request(images: Images) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(
        model_name=images.model,
        model_version="" if images.version is None else str(images.version),
    )
    request.inputs.add(
        name="images", datatype=_OIP_DATATYPE[images.dtype], shape=list(images.shape)
    )
    request.raw_input_contents.append(images.content)
    return request


def tfserving_predict_request(images: Images) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = images.model
    request.model_spec.signature_name = (
        "predict_uint8" if images.dtype == "uint8" else "serving_default"
    )
    if images.version is not None:
        request.model_spec.version.value = images.version
    request.inputs["images"].CopyFrom(
        tensor_pb2.TensorProto(
            dtype=_TF_DTYPE[images.dtype],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(
                dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in images.shape]
            ),
            tensor_content=images.content,
        )
    )
    return request


def convserve_predict(channel: grpc.Channel, images: Images) -> grpc.StatusCode:
    stub = convserve_pb2_grpc.ConvServeStub(channel)
    return _code(stub.Predict, convserve_predict_request(images))


def oip_predict(channel: grpc.Channel, images: Images) -> grpc.StatusCode:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    return _code(stub.ModelInfer, oip_predict_request(images))


def tfserving_predict(channel: grpc.Channel, images: Images) -> grpc.StatusCode:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    return _code(stub.Predict, tfserving_predict_request(images))


PREDICT_SENDERS = {
    "convserve": convserve_predict,
    "oip": oip_predict,
    "tfserving": tfserving_predict,
}


def predict_codes(channel: grpc.Channel, images: Images) -> dict[str, grpc.StatusCode]:
    """The status each protocol answers for the same Predict request."""
    return {protocol: send(channel, images) for protocol, send in PREDICT_SENDERS.items()}


@dataclass(frozen=True)
class Convolution:
    """A Convolve request; `padding` and `mode` are the option names, possibly unknown ones."""

    input: np.ndarray
    kernel: np.ndarray
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    mode: str = "CROSS_CORRELATION"


def convserve_convolve(channel: grpc.Channel, conv: Convolution) -> grpc.StatusCode:
    from convserve.v1.tensor_codec import to_tensor

    paddings = {"VALID": convserve_pb2.PADDING_VALID, "SAME": convserve_pb2.PADDING_SAME}
    modes = {
        "CROSS_CORRELATION": convserve_pb2.CONVOLUTION_MODE_CROSS_CORRELATION,
        "CONVOLUTION": convserve_pb2.CONVOLUTION_MODE_CONVOLUTION,
    }
    options = convserve_pb2.ConvolutionOptions(
        strides=conv.strides,
        dilations=conv.dilations,
        # An enum number that no version of the contract defines.
        padding=paddings.get(conv.padding, 42),  # type: ignore[arg-type]
        mode=modes.get(conv.mode, 42),  # type: ignore[arg-type]
    )
    request = convserve_pb2.ConvolveRequest(
        input=to_tensor(conv.input), kernel=to_tensor(conv.kernel), options=options
    )
    return _code(convserve_pb2_grpc.ConvServeStub(channel).Convolve, request)


def oip_convolve(channel: grpc.Channel, conv: Convolution) -> grpc.StatusCode:
    request = service_pb2.ModelInferRequest(model_name="conv2d")
    for name, array in (("input", conv.input), ("kernel", conv.kernel)):
        request.inputs.add(
            name=name, datatype=_OIP_DATATYPE[array.dtype.name], shape=list(array.shape)
        )
        request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    request.parameters["strides"].string_param = ",".join(str(s) for s in conv.strides)
    request.parameters["dilations"].string_param = ",".join(str(d) for d in conv.dilations)
    request.parameters["padding"].string_param = conv.padding
    request.parameters["mode"].string_param = conv.mode
    return _code(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer, request)


def convolve_codes(channel: grpc.Channel, conv: Convolution) -> dict[str, grpc.StatusCode]:
    """The status convserve.v1 and OIP answer (TF Serving has no convolution)."""
    return {"convserve": convserve_convolve(channel, conv), "oip": oip_convolve(channel, conv)}
