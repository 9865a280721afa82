"""Request building and response parsing, shared by the sync and async clients.

Each RPC has a `*_request` builder (caller's values -> protobuf, raising
InputError for input that cannot be sent) and a `*_result` parser (protobuf ->
typed result, raising InternalError for a response that cannot be read).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from convserve.client.errors import InputError, bad_response
from convserve.client.images import ImagesInput, ImageSource, image_batch, single_image
from convserve.client.results import (
    FeatureMapsResult,
    FitKernelResult,
    LayerInfo,
    ModelList,
    ModelMetadata,
    ModelStatus,
    Prediction,
    PredictResult,
    TensorSpec,
    TrainingRecord,
    VersionStatus,
)
from convserve.v1 import convserve_pb2 as pb
from convserve.v1 import tensor_pb2
from convserve.v1.images import ImageShape
from convserve.v1.tensor_codec import TensorError, dtype_name, from_tensor, to_tensor

Pair = int | Sequence[int]
PaddingArg = str | Sequence[int]

MODES = {
    "cross-correlation": pb.CONVOLUTION_MODE_CROSS_CORRELATION,
    "convolution": pb.CONVOLUTION_MODE_CONVOLUTION,
}
PADDINGS = {"valid": pb.PADDING_VALID, "same": pb.PADDING_SAME}


def model_spec(
    name: str = "", version: int | None = None, version_label: str | None = None
) -> pb.ModelSpec:
    """A model (empty: the server's default) and a version by number or by version label
    (neither: the serving version); InputError for both."""
    if version is not None and version_label:
        raise InputError(
            f"model version {version} and version label {version_label!r}: give one or neither"
        )
    spec = pb.ModelSpec(name=name, version_label=version_label or "")
    if version is not None:
        spec.version = version
    return spec


# --- Predict -----------------------------------------------------------------


def predict_requests(
    images: ImagesInput, *, max_batch_images: int, spec: pb.ModelSpec, shape: ImageShape
) -> list[pb.PredictRequest]:
    """One request per slice of at most `max_batch_images` images, in order.

    `shape` is the model's (H, W, C); the images go as [n,H,W,C].
    """
    if max_batch_images < 1:
        raise ValueError(f"max_batch_images must be >= 1, got {max_batch_images}")
    batch = image_batch(images, shape)
    return [
        pb.PredictRequest(model_spec=spec, images=to_tensor(batch[i : i + max_batch_images]))
        for i in range(0, batch.shape[0], max_batch_images)
    ]


def request_image_count(request: pb.PredictRequest) -> int:
    return int(request.images.shape[0])


def predict_result(
    requests: Sequence[pb.PredictRequest], responses: Sequence[pb.PredictResponse]
) -> PredictResult:
    """Join the responses to `predict_requests`' requests back into one result."""
    predictions: list[Prediction] = []
    for request, response in zip(requests, responses, strict=True):
        count = request_image_count(request)
        try:
            probabilities = from_tensor(response.probabilities, "probabilities")
        except TensorError as exc:
            raise bad_response(str(exc)) from exc
        if probabilities.ndim != 2 or probabilities.shape[0] != count or probabilities.shape[1] < 1:
            raise bad_response(
                f"probabilities has shape {list(probabilities.shape)}, expected [{count},K]"
            )
        if len(response.digits) != count or len(response.confidences) != count:
            raise bad_response(
                f"{len(response.digits)} digits and {len(response.confidences)} confidences "
                f"for {count} images"
            )
        # A server from before class names answers without labels: the index is the name.
        labels = list(response.labels) or [str(d) for d in response.digits]
        if len(labels) != count:
            raise bad_response(f"{len(labels)} labels for {count} images")
        probabilities = probabilities.astype(np.float32)
        for i in range(count):
            predictions.append(
                Prediction(
                    class_index=int(response.digits[i]),
                    label=labels[i],
                    confidence=float(response.confidences[i]),
                    probabilities=probabilities[i],
                    model_name=response.model_name,
                    model_version=int(response.model_version),
                )
            )
    first = predictions[0] if predictions else None
    return PredictResult(
        predictions=tuple(predictions),
        model_name=first.model_name if first else "",
        model_version=first.model_version if first else 0,
    )


# --- Convolve and FitKernel ----------------------------------------------------


def _pair(value: Pair, field: str) -> list[int]:
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int | np.integer) and v >= 1 for v in pair):
        raise InputError(f"{field}: expected a positive integer or two, got {value!r}")
    return [int(v) for v in pair]


def convolution_options(
    *,
    mode: str = "cross-correlation",
    strides: Pair = 1,
    padding: PaddingArg = "valid",
    dilations: Pair = 1,
) -> pb.ConvolutionOptions:
    """`mode`: "cross-correlation" (what CNN layers compute) or "convolution" (kernel flipped).

    `padding`: "valid", "same", or explicit (top, bottom, left, right).
    """
    key = mode.lower().replace("_", "-")
    if key not in MODES:
        raise InputError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    options = pb.ConvolutionOptions(
        mode=MODES[key], strides=_pair(strides, "strides"), dilations=_pair(dilations, "dilations")
    )
    if isinstance(padding, str):
        if padding.lower() not in PADDINGS:
            raise InputError(
                f"padding: expected 'valid', 'same' or (top, bottom, left, right), got {padding!r}"
            )
        options.padding = PADDINGS[padding.lower()]
    else:
        explicit = list(padding)
        if len(explicit) != 4 or not all(
            isinstance(v, int | np.integer) and v >= 0 for v in explicit
        ):
            raise InputError(
                f"padding: expected four non-negative integers (top, bottom, left, right), "
                f"got {padding!r}"
            )
        options.padding = pb.PADDING_EXPLICIT
        options.explicit_padding.extend(int(v) for v in explicit)
    return options


def _float_dtype(array: np.ndarray) -> type[np.floating]:
    # float32 stays float32; float64 and integers (exact in float64) go as float64.
    return np.float32 if array.dtype in (np.float32, np.float16) else np.float64


def _as_float(value: object, field: str, dtype: type[np.generic] | None = None) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{field}: not a numeric array ({exc})") from exc
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise InputError(f"{field}: expected numbers, got dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise InputError(f"{field}: complex numbers are not supported")
    target = dtype or _float_dtype(array)
    return array.astype(target)


def convolve_request(
    input: object,
    kernel: object,
    bias: object | None,
    options: pb.ConvolutionOptions,
) -> pb.ConvolveRequest:
    """The kernel and bias are sent in the input's float type (see `_float_dtype`)."""
    x = _as_float(input, "input")
    k = _as_float(kernel, "kernel", x.dtype.type)
    request = pb.ConvolveRequest(input=to_tensor(x), kernel=to_tensor(k), options=options)
    if bias is not None:
        b = _as_float(bias, "bias", x.dtype.type)
        request.bias.CopyFrom(to_tensor(b.reshape(1) if b.ndim == 0 else b))
    return request


def convolve_result(response: pb.ConvolveResponse) -> np.ndarray:
    return _read(response.output, "output")


def fit_kernel_request(
    inputs: object,
    targets: object,
    kernel_shape: Sequence[int],
    *,
    fit_bias: bool,
    options: pb.ConvolutionOptions,
    learning_rate: float | None,
    max_steps: int | None,
    tolerance: float,
    seed: int,
) -> pb.FitKernelRequest:
    """None for learning_rate / max_steps means the server's default."""
    x = _as_float(inputs, "inputs")
    y = _as_float(targets, "targets", x.dtype.type)
    shape = [int(d) for d in kernel_shape]
    if len(shape) not in (2, 4) or any(d < 1 for d in shape):
        raise InputError(f"kernel_shape: expected [kh,kw] or [kh,kw,C,F], got {shape}")
    if learning_rate is not None and not learning_rate > 0:
        raise InputError(f"learning_rate: must be > 0, got {learning_rate}")
    if max_steps is not None and max_steps < 1:
        raise InputError(f"max_steps: must be >= 1, got {max_steps}")
    if tolerance < 0:
        raise InputError(f"tolerance: must be >= 0, got {tolerance}")
    return pb.FitKernelRequest(
        inputs=to_tensor(x),
        targets=to_tensor(y),
        kernel_shape=shape,
        fit_bias=fit_bias,
        options=options,
        learning_rate=learning_rate or 0.0,
        max_steps=max_steps or 0,
        tolerance=tolerance,
        seed=seed,
    )


def fit_kernel_result(response: pb.FitKernelResponse) -> FitKernelResult:
    return FitKernelResult(
        kernel=_read(response.kernel, "kernel"),
        bias=_read(response.bias, "bias") if response.HasField("bias") else None,
        loss=tuple(response.loss),
        steps=int(response.steps),
        stop_reason=response.stop_reason,
    )


# --- Feature maps and metadata -------------------------------------------------


def feature_maps_request(
    image: ImageSource, layers: Sequence[str], spec: pb.ModelSpec, shape: ImageShape
) -> pb.GetFeatureMapsRequest:
    """`shape` is the model's (H, W, C); the image goes as [1,H,W,C]."""
    if isinstance(layers, str):
        raise InputError("layers: expected a list of layer names, got a single string")
    return pb.GetFeatureMapsRequest(
        model_spec=spec, image=to_tensor(single_image(image, shape)), layers=list(layers)
    )


def feature_maps_result(response: pb.GetFeatureMapsResponse) -> FeatureMapsResult:
    maps: dict[str, np.ndarray] = {}
    for feature_map in response.feature_maps:
        maps[feature_map.layer] = _read(feature_map.activations, f"feature map {feature_map.layer}")
    return FeatureMapsResult(
        model_name=response.model_name, model_version=int(response.model_version), maps=maps
    )


def metadata_request(spec: pb.ModelSpec) -> pb.GetModelMetadataRequest:
    return pb.GetModelMetadataRequest(model_spec=spec)


def _spec(spec: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(
        name=spec.name,
        dtypes=tuple(dtype_name(d) for d in spec.dtypes),
        shape=tuple(int(d) for d in spec.shape),
    )


def _confusion_matrix(values: Sequence[int], classes: int) -> np.ndarray | None:
    """The row-major [K,K] counts as an int64 matrix; None when none were recorded."""
    if not values:
        return None
    side = round(len(values) ** 0.5)
    if side * side != len(values) or (classes and side != classes):
        expected = f"{classes}x{classes}" if classes else "a square number of"
        raise bad_response(
            f"training.confusion_matrix has {len(values)} values, expected {expected} "
            "(row-major [K,K])"
        )
    return np.array(values, dtype=np.int64).reshape(side, side)


def metadata_result(response: pb.GetModelMetadataResponse) -> ModelMetadata:
    t = response.training
    return ModelMetadata(
        model_name=response.model_name,
        loaded_versions=tuple(int(v) for v in response.loaded_versions),
        serving_version=int(response.serving_version),
        inputs=tuple(_spec(s) for s in response.inputs),
        outputs=tuple(_spec(s) for s in response.outputs),
        layers=tuple(
            LayerInfo(
                name=layer.name,
                type=layer.type,
                output_shape=tuple(int(d) for d in layer.output_shape),
                parameters=int(layer.parameters),
                trainable=layer.trainable,
            )
            for layer in response.layers
        ),
        training=TrainingRecord(
            dataset=t.dataset,
            architecture=t.architecture,
            hyperparameters=dict(sorted(t.hyperparameters.items())),
            test_accuracy=t.test_accuracy,
            train_examples=int(t.train_examples),
            test_examples=int(t.test_examples),
            training_time_s=t.training_time_s,
            exported_at=t.exported_at,
            tensorflow_version=t.tensorflow_version,
            fixed_kernel=t.fixed_kernel,
            total_parameters=int(t.total_parameters),
            confusion_matrix=_confusion_matrix(t.confusion_matrix, len(response.class_names)),
        ),
        device=response.device,
        class_names=tuple(response.class_names),
    )


def list_models_request() -> pb.ListModelsRequest:
    return pb.ListModelsRequest()


def list_models_result(response: pb.ListModelsResponse) -> ModelList:
    return ModelList(
        models=tuple(
            ModelStatus(
                name=model.name,
                ready=model.ready,
                versions=tuple(
                    VersionStatus(
                        version=int(v.version), state=v.state, serving=v.serving, error=v.error
                    )
                    for v in model.versions
                ),
                error=model.error,
                memory_bytes=int(model.memory_bytes),
                labels=tuple(sorted((label, int(v)) for label, v in model.version_labels.items())),
                label_errors=tuple(model.label_errors),
            )
            for model in response.models
        ),
        default_model=response.default_model,
    )


def _read(tensor: tensor_pb2.Tensor, field: str) -> np.ndarray:
    """A writable copy of a response tensor."""
    try:
        return from_tensor(tensor, field).copy()
    except TensorError as exc:
        raise bad_response(str(exc)) from exc
