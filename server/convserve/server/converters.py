"""convserve.v1 requests -> the typed values of `convserve.server.types`, results -> responses.

The server only reads requests and writes responses: one function per
direction it needs, ``<request>_from_proto`` and ``<response>_to_proto``. The
other directions (building requests, reading responses) are the client's
(`convserve.client.convert`); the tests put every message through both.

Converters check the wire structure (tensors decode, enums are known, repeated
fields have the right arity) and raise `errors.InvalidArgument` (or the codec's
`TensorError`) naming the request field, e.g. ``images`` or
``options.strides``. Images are checked against the model the request names
by the runtime (`api.RuntimeApi.predict`, against the version it leases);
GetFeatureMaps' one image is checked by the runtime when it computes the
maps. Semantic checks of other values (ranges, shapes that must
fit together, limits) belong to the runtime, `convolution` and `kernel_fit`,
which every protocol shares.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from convserve.server import errors, model_config, types
from convserve.v1 import convserve_pb2
from convserve.v1.tensor_codec import DTYPE_TO_PROTO, from_tensor, to_tensor

_PADDING_FROM_PROTO: dict[int, types.Padding] = {
    convserve_pb2.PADDING_UNSPECIFIED: "VALID",
    convserve_pb2.PADDING_VALID: "VALID",
    convserve_pb2.PADDING_SAME: "SAME",
    convserve_pb2.PADDING_EXPLICIT: "EXPLICIT",
}
_MODE_FROM_PROTO: dict[int, types.Mode] = {
    convserve_pb2.CONVOLUTION_MODE_UNSPECIFIED: "CROSS_CORRELATION",
    convserve_pb2.CONVOLUTION_MODE_CROSS_CORRELATION: "CROSS_CORRELATION",
    convserve_pb2.CONVOLUTION_MODE_CONVOLUTION: "CONVOLUTION",
}


# -- shared pieces ------------------------------------------------------------


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
    """ModelSpec -> ModelRef: an empty name is the default model, no version and no version
    label the serving one; a version and a label together are refused."""
    label = spec.version_label
    if not spec.name and not spec.HasField("version") and not label:
        return types.DEFAULT_MODEL
    version: int | None = None
    if spec.HasField("version"):
        version = int(spec.version)
        if version < 1:
            raise errors.InvalidArgument(
                f"{field}.version", f"a positive version number expected, got {version}"
            )
    if label:
        check_label(label, f"{field}.version_label")
        if version is not None:
            raise errors.InvalidArgument(
                field,
                f"a version or a version_label expected, not both (got version {version} "
                f"and version_label {errors.shown(label)})",
            )
    return types.ModelRef(name=spec.name or None, version=version, label=label or None)


def check_label(label: str, field: str) -> None:
    """Raise errors.InvalidArgument naming `field` unless `label` could be a version label
    (`model_config.label_problem`); whether the model has it is the runtime's to say."""
    problem = model_config.label_problem(label)
    if problem:
        raise errors.InvalidArgument(field, f"{problem}, got {errors.shown(label)}")


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


# -- Predict -----------------------------------------------------------------


def predict_request_from_proto(request: convserve_pb2.PredictRequest) -> types.PredictInput:
    """PredictRequest -> PredictInput: the images as decoded (the runtime checks them
    against the model the request names), errors about them naming ``images``."""
    images = tensor_field(request, "images")
    ref = model_ref_from_proto(request.model_spec)
    return types.PredictInput(images=images, model=ref, field="images")


def predict_response_to_proto(value: types.PredictOutput) -> convserve_pb2.PredictResponse:
    """PredictOutput -> PredictResponse: per image the most likely class, its probability
    and its name (`labels`), and all K probabilities."""
    probabilities = np.asarray(value.probabilities, np.float32)
    classes = probabilities.argmax(axis=1)
    return convserve_pb2.PredictResponse(
        model_name=value.model_name,
        model_version=value.model_version,
        digits=classes.tolist(),
        confidences=probabilities.max(axis=1).tolist(),
        probabilities=to_tensor(probabilities),
        labels=types.class_labels(classes, value.class_names),
    )


# -- PredictStream -----------------------------------------------------------


def predict_stream_request_from_proto(
    message: convserve_pb2.PredictStreamRequest,
) -> tuple[int, types.PredictInput]:
    """PredictStreamRequest -> (its id, PredictInput)."""
    return int(message.id), predict_request_from_proto(message.request)


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


# -- Convolve ----------------------------------------------------------------


def convolve_request_from_proto(request: convserve_pb2.ConvolveRequest) -> types.ConvolveInput:
    """ConvolveRequest -> ConvolveInput; `convolution` checks that the tensors fit together."""
    return types.ConvolveInput(
        input=tensor_field(request, "input"),
        kernel=tensor_field(request, "kernel"),
        bias=optional_tensor_field(request, "bias"),
        options=options_from_proto(request.options),
    )


def convolve_response_to_proto(value: types.ConvolveOutput) -> convserve_pb2.ConvolveResponse:
    return convserve_pb2.ConvolveResponse(output=to_tensor(value.output))


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


# -- GetFeatureMaps ----------------------------------------------------------


def feature_maps_request_from_proto(
    request: convserve_pb2.GetFeatureMapsRequest,
) -> types.FeatureMapsInput:
    """GetFeatureMapsRequest -> FeatureMapsInput with the image as decoded.

    Whether it is one image of the model's input shape (with or without its
    leading 1) only the runtime knows: it checks the image with
    `inputs.check_image` and makes it [1,H,W,C].
    """
    image = tensor_field(request, "image")
    layers = tuple(str(name) for name in request.layers)
    for index, name in enumerate(layers):
        if not name:
            raise errors.InvalidArgument(f"layers[{index}]", "a layer name expected, got ''")
    return types.FeatureMapsInput(
        image=image, layers=layers, model=model_ref_from_proto(request.model_spec)
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


# -- GetModelMetadata --------------------------------------------------------


def metadata_request_from_proto(request: convserve_pb2.GetModelMetadataRequest) -> types.ModelRef:
    return model_ref_from_proto(request.model_spec)


def tensor_spec_to_proto(spec: types.TensorSpecInfo) -> convserve_pb2.TensorSpec:
    return convserve_pb2.TensorSpec(
        name=spec.name,
        dtypes=[DTYPE_TO_PROTO[np.dtype(name)] for name in spec.dtypes],
        shape=list(spec.shape),
    )


def layer_to_proto(layer: types.LayerRow) -> convserve_pb2.LayerInfo:
    return convserve_pb2.LayerInfo(
        name=layer.name,
        type=layer.type,
        output_shape=list(layer.output_shape),
        parameters=layer.parameters,
        trainable=layer.trainable,
    )


def confusion_matrix_values(raw: object) -> list[int]:
    """The training record's ``confusion_matrix`` (K lists of K counts) flattened row-major;
    empty when it is missing or not such a square of non-negative integers."""
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        return []
    size = len(raw)
    values: list[int] = []
    for row in raw:
        if not isinstance(row, Sequence) or isinstance(row, str) or len(row) != size:
            return []
        for count in row:
            # bool is an int to Python, but a flag in a confusion matrix is a broken record.
            if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count < 2**63:
                return []
            values.append(count)
    return values


def training_to_proto(record: Mapping[str, object]) -> convserve_pb2.TrainingRecord:
    """The trainer's training_record.json (a dict) -> TrainingRecord.

    Keys the message has no field for (layers, model card, ...) are left
    out; missing keys and null values keep the field's default. The
    confusion matrix goes flattened row-major (`confusion_matrix_values`).
    """
    values: dict[str, Any] = {}
    for name, kind in types.TRAINING_FIELDS.items():
        raw = record.get(name)
        if raw is not None:
            values[name] = kind(raw)
    hyperparameters = record.get("hyperparameters")
    if isinstance(hyperparameters, Mapping):
        values["hyperparameters"] = {str(k): str(v) for k, v in hyperparameters.items()}
    values["confusion_matrix"] = confusion_matrix_values(record.get("confusion_matrix"))
    return convserve_pb2.TrainingRecord(**values)


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
        class_names=list(value.class_names),
    )


# -- ListModels --------------------------------------------------------------


def model_status_to_proto(status: types.ModelStatus) -> convserve_pb2.ModelStatus:
    """ModelStatus -> ModelStatus, its versions ascending."""
    return convserve_pb2.ModelStatus(
        name=status.name,
        ready=status.ready,
        versions=[
            convserve_pb2.ModelVersionStatus(
                version=v.version, state=v.state, serving=v.serving, error=v.error
            )
            for v in sorted(status.versions, key=lambda v: v.version)
        ],
        error=status.error,
        memory_bytes=status.memory_bytes,
        version_labels=dict(status.labels),
        label_errors=list(status.label_errors),
    )


def list_models_response_to_proto(
    models: Sequence[types.ModelStatus], default_model: str
) -> convserve_pb2.ListModelsResponse:
    """The runtime's models (`RuntimeApi.models`) -> ListModelsResponse, ascending by name."""
    return convserve_pb2.ListModelsResponse(
        models=[model_status_to_proto(m) for m in sorted(models, key=lambda m: m.name)],
        default_model=default_model,
    )
