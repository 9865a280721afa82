"""convserve.v1 messages <-> typed values: both directions of every converter."""

from __future__ import annotations

import numpy as np
import pytest

from convserve.client.tensor import TensorError, to_tensor
from convserve.server import converters as cv
from convserve.server import errors, types
from convserve.v1 import convserve_pb2, tensor_pb2


def check_images(images: np.ndarray, field: str = "images") -> np.ndarray:
    """A minimal stand-in for the runtime's check: it only reshapes."""
    return images.reshape(-1, 28, 28, 1)


def test_model_spec_both_ways() -> None:
    assert cv.model_ref_from_proto(convserve_pb2.ModelSpec()) == types.ModelRef(None, None)
    ref = types.ModelRef("mnist", 3)
    spec = cv.model_ref_to_proto(ref)
    assert spec.name == "mnist"
    assert spec.HasField("version")
    assert spec.version == 3
    assert cv.model_ref_from_proto(spec) == ref
    assert not cv.model_ref_to_proto(types.ModelRef("mnist")).HasField("version")


@pytest.mark.parametrize("version", [0, -4])
def test_model_spec_version_must_be_positive(version: int) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"model_spec\.version: a positive"):
        cv.model_ref_from_proto(convserve_pb2.ModelSpec(version=version))


def test_options_both_ways() -> None:
    options = types.ConvolutionOptions(
        strides=(2, 3),
        padding="EXPLICIT",
        explicit_padding=(1, 0, 2, 1),
        dilations=(1, 2),
        mode="CONVOLUTION",
    )
    message = cv.options_to_proto(options)
    assert list(message.strides) == [2, 3]
    assert message.padding == convserve_pb2.PADDING_EXPLICIT
    assert message.mode == convserve_pb2.CONVOLUTION_MODE_CONVOLUTION
    assert cv.options_from_proto(message) == options


def test_unspecified_options_take_the_defaults() -> None:
    assert cv.options_from_proto(convserve_pb2.ConvolutionOptions()) == types.ConvolutionOptions()


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (convserve_pb2.ConvolutionOptions(strides=[1, 1, 1]), "options.strides"),
        (convserve_pb2.ConvolutionOptions(strides=[2]), "options.strides"),
        (convserve_pb2.ConvolutionOptions(dilations=[1, 2, 3]), "options.dilations"),
        (convserve_pb2.ConvolutionOptions(padding=9), "options.padding"),  # type: ignore[arg-type]
        (convserve_pb2.ConvolutionOptions(mode=7), "options.mode"),  # type: ignore[arg-type]
        (convserve_pb2.ConvolutionOptions(explicit_padding=[1, 2]), "options.explicit_padding"),
    ],
)
def test_malformed_options_name_the_field(
    options: convserve_pb2.ConvolutionOptions, field: str
) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        cv.options_from_proto(options)
    assert caught.value.field == field
    assert str(caught.value).startswith(field + ": ")


@pytest.mark.parametrize("name", ["strides", "dilations", "explicit_padding"])
def test_huge_repeated_options_are_echoed_cut_short(name: str) -> None:
    values = [7] * 50_000
    with pytest.raises(errors.InvalidArgument) as caught:
        cv.options_from_proto(convserve_pb2.ConvolutionOptions(**{name: values}))
    assert caught.value.field == f"options.{name}"
    assert "expected, got [7, 7, 7, " in caught.value.problem
    assert caught.value.problem.endswith(f"… ({len(repr(values))} characters)")
    assert len(str(caught.value)) < 200


def test_predict_request_both_ways() -> None:
    images = np.arange(2 * 784, dtype=np.uint8).reshape(2, 28, 28, 1)
    value = types.PredictInput(images, types.ModelRef("mnist", 1))
    message = cv.predict_request_to_proto(value)
    assert message.images.dtype == tensor_pb2.DATA_TYPE_UINT8
    back = cv.predict_request_from_proto(message, check_images)
    np.testing.assert_array_equal(back.images, images)
    assert back.model == value.model


def test_predict_request_uses_the_runtime_check() -> None:
    seen: list[tuple[tuple[int, ...], str]] = []

    def recording(images: np.ndarray, field: str = "images") -> np.ndarray:
        seen.append((images.shape, field))
        raise errors.InvalidArgument(field, "rejected")

    message = convserve_pb2.PredictRequest(images=to_tensor(np.zeros((3, 784), np.uint8)))
    with pytest.raises(errors.InvalidArgument, match="images: rejected"):
        cv.predict_request_from_proto(message, recording)
    assert seen == [((3, 784), "images")]


def test_predict_response_both_ways() -> None:
    probabilities = np.full((2, 10), 0.02, np.float32)
    probabilities[0, 7] = 0.82
    probabilities[1, 3] = 0.82
    value = types.PredictOutput("mnist", 4, probabilities)
    message = cv.predict_response_to_proto(value)
    assert list(message.digits) == [7, 3]
    assert list(message.confidences) == pytest.approx([0.82, 0.82])
    assert (message.model_name, message.model_version) == ("mnist", 4)
    back = cv.predict_response_from_proto(message)
    np.testing.assert_array_equal(back.probabilities, probabilities)
    assert (back.model_name, back.model_version) == ("mnist", 4)


def test_predict_stream_request_both_ways() -> None:
    images = np.arange(2 * 784, dtype=np.float32).reshape(2, 28, 28, 1) / (2 * 784)
    value = types.PredictInput(images=images, model=types.ModelRef("mnist", 4))
    message = cv.predict_stream_request_to_proto(2**40, value)
    assert message.id == 2**40
    request_id, back = cv.predict_stream_request_from_proto(message, check_images)
    assert request_id == 2**40
    assert back.model == value.model
    np.testing.assert_array_equal(back.images, images)


def test_predict_stream_request_without_images_names_the_field() -> None:
    message = convserve_pb2.PredictStreamRequest(id=3)
    with pytest.raises(errors.InvalidArgument, match="images: a tensor is required"):
        cv.predict_stream_request_from_proto(message, check_images)


def test_predict_stream_response_both_ways() -> None:
    probabilities = np.eye(10, dtype=np.float32)[[3, 8]]
    output = types.PredictOutput("mnist", 2, probabilities)
    message = cv.predict_stream_response_to_proto(11, output)
    assert (message.id, message.WhichOneof("result")) == (11, "response")
    assert list(message.response.digits) == [3, 8]
    request_id, back = cv.predict_stream_response_from_proto(message)
    assert request_id == 11
    assert isinstance(back, types.PredictOutput)
    assert (back.model_name, back.model_version) == ("mnist", 2)
    np.testing.assert_array_equal(back.probabilities, probabilities)


def test_stream_failure_both_ways() -> None:
    failure = types.StreamFailure(5, "model 'mnist' version 9 is not loaded")
    message = cv.predict_stream_response_to_proto(12, failure)
    assert message.WhichOneof("result") == "error"
    assert (message.error.code, message.error.message) == (5, failure.message)
    assert cv.predict_stream_response_from_proto(message) == (12, failure)
    with pytest.raises(errors.InvalidArgument, match="result: a response or an error"):
        cv.predict_stream_response_from_proto(convserve_pb2.PredictStreamResponse(id=1))


def test_convolve_request_both_ways() -> None:
    value = types.ConvolveInput(
        input=np.arange(12, dtype=np.float64).reshape(3, 4),
        kernel=np.array([[1.0, -1.0]]),
        bias=np.array([0.5]),
        options=types.ConvolutionOptions(padding="SAME"),
    )
    back = cv.convolve_request_from_proto(cv.convolve_request_to_proto(value))
    np.testing.assert_array_equal(back.input, value.input)
    np.testing.assert_array_equal(back.kernel, value.kernel)
    assert back.bias is not None
    np.testing.assert_array_equal(back.bias, value.bias)
    assert back.options == value.options
    no_bias = types.ConvolveInput(value.input, value.kernel)
    assert cv.convolve_request_from_proto(cv.convolve_request_to_proto(no_bias)).bias is None


def test_convolve_response_both_ways() -> None:
    output = np.linspace(-1, 1, 24, dtype=np.float32).reshape(1, 3, 4, 2)
    message = cv.convolve_response_to_proto(types.ConvolveOutput(output))
    assert message.output.dtype == tensor_pb2.DATA_TYPE_FLOAT32
    np.testing.assert_array_equal(cv.convolve_response_from_proto(message).output, output)


@pytest.mark.parametrize("missing", ["input", "kernel"])
def test_convolve_request_needs_input_and_kernel(missing: str) -> None:
    message = convserve_pb2.ConvolveRequest(
        input=to_tensor(np.ones((3, 3))), kernel=to_tensor(np.ones((2, 2)))
    )
    message.ClearField(missing)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument, match=f"^{missing}: a tensor is required"):
        cv.convolve_request_from_proto(message)


@pytest.mark.parametrize(
    ("tensor", "problem"),
    [
        (tensor_pb2.Tensor(dtype=99, shape=[2], content=b"\0" * 8), "dtype must be one of"),  # type: ignore[arg-type]
        (tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT64, shape=[2, 0]), "positive"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT64, shape=[-1, 2]), "positive"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT64, shape=[2], content=b"x"), "bytes"),
        (
            tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT64, shape=[2**40, 2**40]),
            "more than the limit",
        ),
    ],
)
@pytest.mark.parametrize("field", ["input", "kernel", "bias"])
def test_bad_tensors_name_their_field(tensor: tensor_pb2.Tensor, problem: str, field: str) -> None:
    message = convserve_pb2.ConvolveRequest(
        input=to_tensor(np.ones((3, 3))), kernel=to_tensor(np.ones((2, 2)))
    )
    getattr(message, field).CopyFrom(tensor)
    with pytest.raises(TensorError) as caught:
        cv.convolve_request_from_proto(message)
    assert caught.value.field == field
    assert problem in str(caught.value)


def test_fit_kernel_request_both_ways() -> None:
    value = types.FitKernelInput(
        inputs=np.ones((2, 6, 8)),
        targets=np.zeros((2, 6, 7)),
        kernel_shape=(1, 2),
        fit_bias=True,
        options=types.ConvolutionOptions(strides=(1, 1)),
        learning_rate=0.1,
        max_steps=50,
        tolerance=1e-6,
        seed=7,
    )
    back = cv.fit_kernel_request_from_proto(cv.fit_kernel_request_to_proto(value))
    np.testing.assert_array_equal(back.inputs, value.inputs)
    np.testing.assert_array_equal(back.targets, value.targets)
    assert (back.kernel_shape, back.fit_bias, back.options) == (
        value.kernel_shape,
        value.fit_bias,
        value.options,
    )
    assert (back.learning_rate, back.max_steps, back.tolerance, back.seed) == (0.1, 50, 1e-6, 7)


def test_fit_kernel_zero_means_the_server_default() -> None:
    message = convserve_pb2.FitKernelRequest(
        inputs=to_tensor(np.ones((3, 3))), targets=to_tensor(np.ones((2, 2))), kernel_shape=[2, 2]
    )
    value = cv.fit_kernel_request_from_proto(message)
    assert value.learning_rate is None
    assert value.max_steps is None
    assert cv.fit_kernel_request_to_proto(value).learning_rate == 0


def test_fit_kernel_nan_learning_rate_is_refused() -> None:
    message = convserve_pb2.FitKernelRequest(
        inputs=to_tensor(np.ones((3, 3))),
        targets=to_tensor(np.ones((2, 2))),
        kernel_shape=[2, 2],
        learning_rate=float("nan"),
    )
    with pytest.raises(errors.InvalidArgument, match=r"^learning_rate: "):
        cv.fit_kernel_request_from_proto(message)


def test_fit_kernel_response_both_ways() -> None:
    value = types.FitKernelOutput(
        kernel=np.array([[1.0, -1.0]]),
        bias=np.array([0.25]),
        loss=[1.0, 0.5, 0.01],
        steps=2,
        stop_reason="converged",
    )
    message = cv.fit_kernel_response_to_proto(value)
    assert message.kernel.dtype == tensor_pb2.DATA_TYPE_FLOAT64
    back = cv.fit_kernel_response_from_proto(message)
    np.testing.assert_array_equal(back.kernel, value.kernel)
    assert back.bias is not None
    np.testing.assert_array_equal(back.bias, value.bias)
    assert (back.loss, back.steps, back.stop_reason) == (value.loss, 2, "converged")
    without_bias = cv.fit_kernel_response_to_proto(
        types.FitKernelOutput(value.kernel, None, [1.0], 0, "max_steps")
    )
    assert not without_bias.HasField("bias")
    assert cv.fit_kernel_response_from_proto(without_bias).bias is None


def test_fit_kernel_response_with_unknown_stop_reason_is_refused() -> None:
    message = convserve_pb2.FitKernelResponse(
        kernel=to_tensor(np.ones((1, 2))), stop_reason="bored"
    )
    with pytest.raises(errors.InvalidArgument, match="stop_reason"):
        cv.fit_kernel_response_from_proto(message)


@pytest.mark.parametrize("shape", cv.FEATURE_MAP_IMAGE_SHAPES)
def test_feature_maps_request_accepts_every_single_image_shape(shape: tuple[int, ...]) -> None:
    image = np.arange(784, dtype=np.uint8).reshape(shape)
    message = convserve_pb2.GetFeatureMapsRequest(image=to_tensor(image), layers=["conv2"])
    value = cv.feature_maps_request_from_proto(message, check_images)
    assert value.image.shape == (1, 28, 28, 1)
    np.testing.assert_array_equal(value.image.ravel(), image.ravel())
    assert value.layers == ("conv2",)
    again = cv.feature_maps_request_from_proto(
        cv.feature_maps_request_to_proto(value), check_images
    )
    np.testing.assert_array_equal(again.image, value.image)
    assert (again.layers, again.model) == (value.layers, value.model)


@pytest.mark.parametrize("shape", [(2, 28, 28), (28, 27), (1, 1, 784), (783,)])
def test_feature_maps_request_refuses_other_shapes(shape: tuple[int, ...]) -> None:
    image = np.zeros(shape, np.uint8)
    message = convserve_pb2.GetFeatureMapsRequest(image=to_tensor(image))
    with pytest.raises(errors.InvalidArgument, match=r"^image: one image of shape .* got \["):
        cv.feature_maps_request_from_proto(message, check_images)


def test_feature_maps_request_refuses_empty_layer_names() -> None:
    message = convserve_pb2.GetFeatureMapsRequest(
        image=to_tensor(np.zeros((28, 28), np.uint8)), layers=["conv1", ""]
    )
    with pytest.raises(errors.InvalidArgument, match=r"^layers\[1\]: "):
        cv.feature_maps_request_from_proto(message, check_images)


def test_feature_maps_response_both_ways() -> None:
    maps = [
        ("conv1", np.random.default_rng(0).random((26, 26, 4), dtype=np.float32)),
        ("conv2", np.zeros((11, 11, 8), np.float32)),
    ]
    message = cv.feature_maps_response_to_proto(types.FeatureMapsOutput("mnist", 2, maps))
    assert [fm.layer for fm in message.feature_maps] == ["conv1", "conv2"]
    back = cv.feature_maps_response_from_proto(message)
    assert (back.model_name, back.model_version) == ("mnist", 2)
    for (name, array), (back_name, back_array) in zip(maps, back.maps, strict=True):
        assert name == back_name
        np.testing.assert_array_equal(array, back_array)


def test_metadata_request_both_ways() -> None:
    ref = types.ModelRef("mnist", 2)
    assert cv.metadata_request_from_proto(cv.metadata_request_to_proto(ref)) == ref


def test_metadata_response_both_ways() -> None:
    training: dict[str, object] = {
        "dataset": "mnist",
        "architecture": "keras",
        "hyperparameters": {"epochs": "2", "optimizer": "adam"},
        "test_accuracy": 0.98,
        "train_examples": 60000,
        "test_examples": 10000,
        "training_time_s": 12.5,
        "exported_at": "2026-01-01T00:00:00Z",
        "tensorflow_version": "2.21.0",
        "fixed_kernel": "",
        "total_parameters": 34826,
    }
    value = types.ModelMetadata(
        model_name="mnist",
        loaded_versions=(1, 3),
        serving_version=3,
        inputs=(types.TensorSpecInfo("images", ("uint8", "float32"), (-1, 28, 28, 1)),),
        outputs=(types.TensorSpecInfo("probabilities", ("float32",), (-1, 10)),),
        layers=(
            types.LayerRow("conv1", "Conv2D", (26, 26, 32), 320, True),
            types.LayerRow("fixed_kernel", "Conv2D", (26, 26, 1), 10, False),
        ),
        training=training,
        device="/CPU:0",
    )
    message = cv.metadata_response_to_proto(value)
    assert list(message.inputs[0].dtypes) == [
        tensor_pb2.DATA_TYPE_UINT8,
        tensor_pb2.DATA_TYPE_FLOAT32,
    ]
    assert message.training.hyperparameters["optimizer"] == "adam"
    assert cv.metadata_response_from_proto(message) == value


def test_training_record_keeps_only_known_fields_and_skips_nulls() -> None:
    record = cv.training_to_proto(
        {"dataset": "sample", "test_accuracy": None, "layers": [1, 2], "seed": 0}
    )
    assert record.dataset == "sample"
    assert record.test_accuracy == 0.0
    assert not record.hyperparameters
