"""convserve.v1 messages <-> the typed values of `convserve.server.types`.

One pair of functions per message: ``<message>_from_proto`` and
``<message>_to_proto``. The servicer uses the request ``from`` and response
``to`` directions; the other directions serve tests and in-process callers.

Converters check the wire structure (tensors decode, enums are known, repeated
fields have the right arity) and raise `errors.InvalidArgument` (or the codec's
`TensorError`) naming the request field, e.g. ``images`` or
``options.strides``. Semantic checks of values (ranges, shapes that must fit
together, limits) belong to the runtime and `ops`, which every protocol shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np

from convserve.client.tensor import DTYPE_TO_PROTO, PROTO_TO_DTYPE, from_tensor, to_tensor
from convserve.server import errors, types
from convserve.v1 import convserve_pb2

CheckImages = Callable[..., np.ndarray]
"""The runtime's shared image check: ``check_images(array, field=...) -> [N,28,28,1]``."""

IMAGE_SIZE = 28
# The shapes one GetFeatureMaps image may arrive in.
FEATURE_MAP_IMAGE_SHAPES: tuple[tuple[int, ...], ...] = (
    (28, 28),
    (28, 28, 1),
    (1, 28, 28),
    (1, 28, 28, 1),
    (784,),
    (1, 784),
)

_PADDING_TO_PROTO: dict[str, convserve_pb2.Padding.ValueType] = {
    "VALID": convserve_pb2.PADDING_VALID,
    "SAME": convserve_pb2.PADDING_SAME,
    "EXPLICIT": convserve_pb2.PADDING_EXPLICIT,
}
_PADDING_FROM_PROTO: dict[int, types.Padding] = {
    convserve_pb2.PADDING_UNSPECIFIED: "VALID",
    convserve_pb2.PADDING_VALID: "VALID",
    convserve_pb2.PADDING_SAME: "SAME",
    convserve_pb2.PADDING_EXPLICIT: "EXPLICIT",
}
_MODE_TO_PROTO: dict[str, convserve_pb2.ConvolutionMode.ValueType] = {
    "CROSS_CORRELATION": convserve_pb2.CONVOLUTION_MODE_CROSS_CORRELATION,
    "CONVOLUTION": convserve_pb2.CONVOLUTION_MODE_CONVOLUTION,
}
_MODE_FROM_PROTO: dict[int, types.Mode] = {
    convserve_pb2.CONVOLUTION_MODE_UNSPECIFIED: "CROSS_CORRELATION",
    convserve_pb2.CONVOLUTION_MODE_CROSS_CORRELATION: "CROSS_CORRELATION",
    convserve_pb2.CONVOLUTION_MODE_CONVOLUTION: "CONVOLUTION",
}
_STOP_REASONS = frozenset({"converged", "max_steps", "time_budget"})
# TrainingRecord fields and the Python type each is read as from training_record.json.
_TRAINING_FIELDS: dict[str, type] = {
    "dataset": str,
    "architecture": str,
    "test_accuracy": float,
    "train_examples": int,
    "test_examples": int,
    "training_time_s": float,
    "exported_at": str,
    "tensorflow_version": str,
    "fixed_kernel": str,
    "total_parameters": int,
}


# -- shared pieces ------------------------------------------------------------

_DEFAULT_MODEL = types.ModelRef()


def tensor_field(message: Any, name: str, field: str | None = None) -> np.ndarray:
    """Decode the Tensor in `message.<name>`; a missing tensor is an error naming `field`."""
    label = field or name
    if not message.HasField(name):
        raise errors.InvalidArgument(label, "a tensor is required, got none")
    return from_tensor(getattr(message, name), label)


def optional_tensor_field(message: Any, name: str, field: str | None = None) -> np.ndarray | None:
    """Like `tensor_field`, but None when the tensor is absent."""
    if not message.HasField(name):
        return None
    return from_tensor(getattr(message, name), field or name)


def model_ref_from_proto(
    spec: convserve_pb2.ModelSpec, field: str = "model_spec"
) -> types.ModelRef:
    """ModelSpec -> ModelRef: an empty name is the default model, no version the newest."""
    if not spec.name and not spec.HasField("version"):
        return _DEFAULT_MODEL
    version: int | None = None
    if spec.HasField("version"):
        version = int(spec.version)
        if version < 1:
            raise errors.InvalidArgument(
                f"{field}.version", f"a positive version number expected, got {version}"
            )
    return types.ModelRef(name=spec.name or None, version=version)


def model_ref_to_proto(ref: types.ModelRef) -> convserve_pb2.ModelSpec:
    spec = convserve_pb2.ModelSpec(name=ref.name or "")
    if ref.version is not None:
        spec.version = ref.version
    return spec


def _pair(values: Any, field: str, meaning: str) -> tuple[int, int]:
    if len(values) == 0:
        return 1, 1
    if len(values) != 2:
        raise errors.InvalidArgument(
            field,
            f"two values {meaning} (or none for [1, 1]) expected, got {errors.shown(list(values))}",
        )
    return int(values[0]), int(values[1])


def options_from_proto(
    options: convserve_pb2.ConvolutionOptions, field: str = "options"
) -> types.ConvolutionOptions:
    """ConvolutionOptions -> types.ConvolutionOptions (unspecified enums take their defaults)."""
    if options.padding not in _PADDING_FROM_PROTO:
        raise errors.InvalidArgument(
            f"{field}.padding",
            f"PADDING_VALID, PADDING_SAME or PADDING_EXPLICIT expected, got {options.padding}",
        )
    if options.mode not in _MODE_FROM_PROTO:
        raise errors.InvalidArgument(
            f"{field}.mode",
            "CONVOLUTION_MODE_CROSS_CORRELATION or CONVOLUTION_MODE_CONVOLUTION expected, "
            f"got {options.mode}",
        )
    explicit: tuple[int, int, int, int] | None = None
    if options.explicit_padding:
        pads = [int(p) for p in options.explicit_padding]
        if len(pads) != 4:
            raise errors.InvalidArgument(
                f"{field}.explicit_padding",
                f"four values [top, bottom, left, right] expected, got {errors.shown(pads)}",
            )
        explicit = (pads[0], pads[1], pads[2], pads[3])
    return types.ConvolutionOptions(
        strides=_pair(options.strides, f"{field}.strides", "[stride_h, stride_w]"),
        padding=_PADDING_FROM_PROTO[options.padding],
        explicit_padding=explicit,
        dilations=_pair(options.dilations, f"{field}.dilations", "[dilation_h, dilation_w]"),
        mode=_MODE_FROM_PROTO[options.mode],
    )


def options_to_proto(options: types.ConvolutionOptions) -> convserve_pb2.ConvolutionOptions:
    return convserve_pb2.ConvolutionOptions(
        strides=list(options.strides),
        padding=_PADDING_TO_PROTO[options.padding],
        explicit_padding=list(options.explicit_padding or ()),
        dilations=list(options.dilations),
        mode=_MODE_TO_PROTO[options.mode],
    )


# -- Predict -----------------------------------------------------------------


def predict_request_from_proto(
    request: convserve_pb2.PredictRequest, check_images: CheckImages
) -> types.PredictInput:
    """PredictRequest -> PredictInput; `check_images` (the runtime's) validates and reshapes."""
    images = tensor_field(request, "images")
    return types.PredictInput(
        images=check_images(images, field="images"),
        model=model_ref_from_proto(request.model_spec),
    )


def predict_request_to_proto(value: types.PredictInput) -> convserve_pb2.PredictRequest:
    return convserve_pb2.PredictRequest(
        model_spec=model_ref_to_proto(value.model), images=to_tensor(value.images)
    )


def predict_response_to_proto(value: types.PredictOutput) -> convserve_pb2.PredictResponse:
    probabilities = np.asarray(value.probabilities, np.float32)
    return convserve_pb2.PredictResponse(
        model_name=value.model_name,
        model_version=value.model_version,
        digits=probabilities.argmax(axis=1).tolist(),
        confidences=probabilities.max(axis=1).tolist(),
        probabilities=to_tensor(probabilities),
    )


def predict_response_from_proto(response: convserve_pb2.PredictResponse) -> types.PredictOutput:
    return types.PredictOutput(
        model_name=response.model_name,
        model_version=int(response.model_version),
        probabilities=tensor_field(response, "probabilities"),
    )


# -- PredictStream -----------------------------------------------------------


def predict_stream_request_from_proto(
    message: convserve_pb2.PredictStreamRequest, check_images: CheckImages
) -> tuple[int, types.PredictInput]:
    """PredictStreamRequest -> (its id, PredictInput)."""
    return int(message.id), predict_request_from_proto(message.request, check_images)


def predict_stream_request_to_proto(
    request_id: int, value: types.PredictInput
) -> convserve_pb2.PredictStreamRequest:
    return convserve_pb2.PredictStreamRequest(
        id=request_id, request=predict_request_to_proto(value)
    )


def predict_stream_response_to_proto(
    request_id: int, value: types.PredictOutput | types.StreamFailure
) -> convserve_pb2.PredictStreamResponse:
    """The answer to stream request `request_id`: its response or its error."""
    if isinstance(value, types.StreamFailure):
        error = convserve_pb2.StreamError(code=value.code, message=value.message)
        return convserve_pb2.PredictStreamResponse(id=request_id, error=error)
    return convserve_pb2.PredictStreamResponse(
        id=request_id, response=predict_response_to_proto(value)
    )


def predict_stream_response_from_proto(
    message: convserve_pb2.PredictStreamResponse,
) -> tuple[int, types.PredictOutput | types.StreamFailure]:
    result = message.WhichOneof("result")
    if result == "error":
        return int(message.id), types.StreamFailure(message.error.code, message.error.message)
    if result != "response":
        raise errors.InvalidArgument("result", "a response or an error expected, got neither")
    return int(message.id), predict_response_from_proto(message.response)


# -- Convolve ----------------------------------------------------------------


def convolve_request_from_proto(request: convserve_pb2.ConvolveRequest) -> types.ConvolveInput:
    """ConvolveRequest -> ConvolveInput; `ops` checks that the tensors fit together."""
    return types.ConvolveInput(
        input=tensor_field(request, "input"),
        kernel=tensor_field(request, "kernel"),
        bias=optional_tensor_field(request, "bias"),
        options=options_from_proto(request.options),
    )


def convolve_request_to_proto(value: types.ConvolveInput) -> convserve_pb2.ConvolveRequest:
    request = convserve_pb2.ConvolveRequest(
        input=to_tensor(value.input),
        kernel=to_tensor(value.kernel),
        options=options_to_proto(value.options),
    )
    if value.bias is not None:
        request.bias.CopyFrom(to_tensor(value.bias))
    return request


def convolve_response_to_proto(value: types.ConvolveOutput) -> convserve_pb2.ConvolveResponse:
    return convserve_pb2.ConvolveResponse(output=to_tensor(value.output))


def convolve_response_from_proto(response: convserve_pb2.ConvolveResponse) -> types.ConvolveOutput:
    return types.ConvolveOutput(output=tensor_field(response, "output"))


# -- FitKernel ---------------------------------------------------------------


def fit_kernel_request_from_proto(
    request: convserve_pb2.FitKernelRequest,
) -> types.FitKernelInput:
    """FitKernelRequest -> FitKernelInput; 0 for learning_rate or max_steps means the default."""
    learning_rate = float(request.learning_rate)
    if math.isnan(learning_rate):
        raise errors.InvalidArgument("learning_rate", "a positive finite number expected, got nan")
    return types.FitKernelInput(
        inputs=tensor_field(request, "inputs"),
        targets=tensor_field(request, "targets"),
        kernel_shape=tuple(int(d) for d in request.kernel_shape),
        fit_bias=bool(request.fit_bias),
        options=options_from_proto(request.options),
        learning_rate=None if learning_rate == 0 else learning_rate,
        max_steps=None if request.max_steps == 0 else int(request.max_steps),
        tolerance=float(request.tolerance),
        seed=int(request.seed),
    )


def fit_kernel_request_to_proto(value: types.FitKernelInput) -> convserve_pb2.FitKernelRequest:
    return convserve_pb2.FitKernelRequest(
        inputs=to_tensor(value.inputs),
        targets=to_tensor(value.targets),
        kernel_shape=list(value.kernel_shape),
        fit_bias=value.fit_bias,
        options=options_to_proto(value.options),
        learning_rate=value.learning_rate or 0.0,
        max_steps=value.max_steps or 0,
        tolerance=value.tolerance,
        seed=value.seed,
    )


def fit_kernel_response_to_proto(value: types.FitKernelOutput) -> convserve_pb2.FitKernelResponse:
    response = convserve_pb2.FitKernelResponse(
        kernel=to_tensor(value.kernel, np.float64),
        loss=[float(v) for v in value.loss],
        steps=value.steps,
        stop_reason=value.stop_reason,
    )
    if value.bias is not None:
        response.bias.CopyFrom(to_tensor(value.bias, np.float64))
    return response


def fit_kernel_response_from_proto(
    response: convserve_pb2.FitKernelResponse,
) -> types.FitKernelOutput:
    if response.stop_reason not in _STOP_REASONS:
        raise errors.InvalidArgument(
            "stop_reason",
            f"one of {', '.join(sorted(_STOP_REASONS))} expected, "
            f"got {errors.shown(response.stop_reason)}",
        )
    return types.FitKernelOutput(
        kernel=tensor_field(response, "kernel"),
        bias=optional_tensor_field(response, "bias"),
        loss=list(response.loss),
        steps=int(response.steps),
        stop_reason=cast(Any, response.stop_reason),
    )


# -- GetFeatureMaps ----------------------------------------------------------


def feature_maps_request_from_proto(
    request: convserve_pb2.GetFeatureMapsRequest, check_images: CheckImages
) -> types.FeatureMapsInput:
    """GetFeatureMapsRequest -> FeatureMapsInput with the image as [1,28,28,1]."""
    image = tensor_field(request, "image")
    if image.shape not in FEATURE_MAP_IMAGE_SHAPES:
        allowed = ", ".join(str(list(s)) for s in FEATURE_MAP_IMAGE_SHAPES)
        raise errors.InvalidArgument(
            "image", f"one image of shape {allowed} expected, got {list(image.shape)}"
        )
    one = image.reshape(1, IMAGE_SIZE, IMAGE_SIZE, 1)
    layers = tuple(str(name) for name in request.layers)
    for index, name in enumerate(layers):
        if not name:
            raise errors.InvalidArgument(f"layers[{index}]", "a layer name expected, got ''")
    return types.FeatureMapsInput(
        image=check_images(one, field="image"),
        layers=layers,
        model=model_ref_from_proto(request.model_spec),
    )


def feature_maps_request_to_proto(
    value: types.FeatureMapsInput,
) -> convserve_pb2.GetFeatureMapsRequest:
    return convserve_pb2.GetFeatureMapsRequest(
        model_spec=model_ref_to_proto(value.model),
        image=to_tensor(value.image),
        layers=list(value.layers),
    )


def feature_maps_response_to_proto(
    value: types.FeatureMapsOutput,
) -> convserve_pb2.GetFeatureMapsResponse:
    return convserve_pb2.GetFeatureMapsResponse(
        model_name=value.model_name,
        model_version=value.model_version,
        feature_maps=[
            convserve_pb2.FeatureMap(layer=name, activations=to_tensor(maps, np.float32))
            for name, maps in value.maps
        ],
    )


def feature_maps_response_from_proto(
    response: convserve_pb2.GetFeatureMapsResponse,
) -> types.FeatureMapsOutput:
    return types.FeatureMapsOutput(
        model_name=response.model_name,
        model_version=int(response.model_version),
        maps=[
            (fm.layer, tensor_field(fm, "activations", f"feature_maps[{i}].activations"))
            for i, fm in enumerate(response.feature_maps)
        ],
    )


# -- GetModelMetadata --------------------------------------------------------


def metadata_request_from_proto(request: convserve_pb2.GetModelMetadataRequest) -> types.ModelRef:
    return model_ref_from_proto(request.model_spec)


def metadata_request_to_proto(ref: types.ModelRef) -> convserve_pb2.GetModelMetadataRequest:
    return convserve_pb2.GetModelMetadataRequest(model_spec=model_ref_to_proto(ref))


def tensor_spec_to_proto(spec: types.TensorSpecInfo) -> convserve_pb2.TensorSpec:
    return convserve_pb2.TensorSpec(
        name=spec.name,
        dtypes=[DTYPE_TO_PROTO[np.dtype(name)] for name in spec.dtypes],
        shape=list(spec.shape),
    )


def tensor_spec_from_proto(spec: convserve_pb2.TensorSpec) -> types.TensorSpecInfo:
    unknown = [d for d in spec.dtypes if d not in PROTO_TO_DTYPE]
    if unknown:
        raise errors.InvalidArgument(
            f"{spec.name}.dtypes", f"known dtypes expected, got {errors.shown(unknown)}"
        )
    return types.TensorSpecInfo(
        name=spec.name,
        dtypes=tuple(PROTO_TO_DTYPE[d].name for d in spec.dtypes),
        shape=tuple(int(d) for d in spec.shape),
    )


def layer_to_proto(layer: types.LayerRow) -> convserve_pb2.LayerInfo:
    return convserve_pb2.LayerInfo(
        name=layer.name,
        type=layer.type,
        output_shape=list(layer.output_shape),
        parameters=layer.parameters,
        trainable=layer.trainable,
    )


def layer_from_proto(layer: convserve_pb2.LayerInfo) -> types.LayerRow:
    return types.LayerRow(
        name=layer.name,
        type=layer.type,
        output_shape=tuple(int(d) for d in layer.output_shape),
        parameters=int(layer.parameters),
        trainable=bool(layer.trainable),
    )


def training_to_proto(record: Mapping[str, object]) -> convserve_pb2.TrainingRecord:
    """The trainer's training_record.json (a dict) -> TrainingRecord.

    Keys the message has no field for (layers, confusion matrix, ...) are left
    out; missing keys and null values keep the field's default.
    """
    values: dict[str, Any] = {}
    for name, kind in _TRAINING_FIELDS.items():
        raw = record.get(name)
        if raw is not None:
            values[name] = kind(raw)
    hyperparameters = record.get("hyperparameters")
    if isinstance(hyperparameters, Mapping):
        values["hyperparameters"] = {str(k): str(v) for k, v in hyperparameters.items()}
    return convserve_pb2.TrainingRecord(**values)


def training_from_proto(record: convserve_pb2.TrainingRecord) -> dict[str, object]:
    values: dict[str, object] = {name: getattr(record, name) for name in _TRAINING_FIELDS}
    values["hyperparameters"] = dict(record.hyperparameters)
    return values


def metadata_response_to_proto(
    value: types.ModelMetadata,
) -> convserve_pb2.GetModelMetadataResponse:
    return convserve_pb2.GetModelMetadataResponse(
        model_name=value.model_name,
        loaded_versions=sorted(value.loaded_versions),
        serving_version=value.serving_version,
        inputs=[tensor_spec_to_proto(s) for s in value.inputs],
        outputs=[tensor_spec_to_proto(s) for s in value.outputs],
        layers=[layer_to_proto(layer) for layer in value.layers],
        training=training_to_proto(value.training),
        device=value.device,
    )


def metadata_response_from_proto(
    response: convserve_pb2.GetModelMetadataResponse,
) -> types.ModelMetadata:
    return types.ModelMetadata(
        model_name=response.model_name,
        loaded_versions=tuple(int(v) for v in response.loaded_versions),
        serving_version=int(response.serving_version),
        inputs=tuple(tensor_spec_from_proto(s) for s in response.inputs),
        outputs=tuple(tensor_spec_from_proto(s) for s in response.outputs),
        layers=tuple(layer_from_proto(layer) for layer in response.layers),
        training=training_from_proto(response.training),
        device=response.device,
    )
