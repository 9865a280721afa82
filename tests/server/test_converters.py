"""convserve.v1 messages through both sides: every message the server reads is built by
the client's converter (`convserve.client.convert`), and every message the server
writes is read back by the client's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from convserve.client import convert
from convserve.client.results import ModelList, ModelStatus, VersionStatus
from convserve.server import converters as cv
from convserve.server import errors, types
from convserve.v1 import convserve_pb2, tensor_pb2
from convserve.v1.tensor_codec import TensorError, to_tensor

FASHION = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


# -- ModelSpec and ConvolutionOptions ------------------------------------------


def test_model_spec_from_the_client() -> None:
    assert cv.model_ref_from_proto(convert.model_spec()) == types.ModelRef(None, None)
    assert cv.model_ref_from_proto(convert.model_spec("mnist", 3)) == types.ModelRef("mnist", 3)
    assert cv.model_ref_from_proto(convert.model_spec("", 2)) == types.ModelRef(None, 2)
    assert cv.model_ref_from_proto(convert.model_spec("fashion")) == types.ModelRef("fashion")


@pytest.mark.parametrize("version", [0, -4])
def test_model_spec_version_must_be_positive(version: int) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"model_spec\.version: a positive"):
        cv.model_ref_from_proto(convserve_pb2.ModelSpec(version=version))


def test_model_spec_version_labels_from_the_client() -> None:
    spec = convert.model_spec("mnist", version_label="canary")
    assert cv.model_ref_from_proto(spec) == types.ModelRef("mnist", label="canary")
    spec = convert.model_spec(version_label="stable")
    assert cv.model_ref_from_proto(spec) == types.ModelRef(None, label="stable")
    # An empty label is no label, as proto3 cannot tell it from an absent one.
    spec = convert.model_spec("mnist", version_label="")
    assert cv.model_ref_from_proto(spec) == types.ModelRef("mnist")
    assert cv.model_ref_from_proto(convserve_pb2.ModelSpec(version_label="")) is types.DEFAULT_MODEL


def test_a_version_and_a_label_together_are_invalid() -> None:
    spec = convserve_pb2.ModelSpec(name="mnist", version=2, version_label="canary")
    with pytest.raises(errors.InvalidArgument) as exc:
        cv.model_ref_from_proto(spec)
    assert str(exc.value) == (
        "model_spec: a version or a version_label expected, not both "
        "(got version 2 and version_label 'canary')"
    )


@pytest.mark.parametrize(
    ("label", "problem"),
    [
        ("x y", "not a valid version label; {rule}, got 'x y'"),
        ("../canary", "not a valid version label; {rule}, got '../canary'"),
        ("c" * 65, "65 characters is too long; {rule}, got 'ccc"),
    ],
)
def test_labels_no_model_could_have_are_invalid(label: str, problem: str) -> None:
    rule = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit expected"
    with pytest.raises(errors.InvalidArgument) as exc:
        cv.model_ref_from_proto(convserve_pb2.ModelSpec(version_label=label))
    expected = "model_spec.version_label: " + problem.format(rule=rule)
    assert str(exc.value).startswith(expected), str(exc.value)


def test_a_long_label_is_cut_in_the_message() -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        cv.model_ref_from_proto(convserve_pb2.ModelSpec(version_label="x" * 9000))
    assert "(9000 characters)" in str(exc.value)
    assert len(str(exc.value)) < 300


def test_options_from_the_client() -> None:
    message = convert.convolution_options(
        mode="convolution", strides=(2, 3), padding=(1, 0, 2, 1), dilations=(1, 2)
    )
    assert cv.options_from_proto(message) == types.ConvolutionOptions(
        strides=(2, 3),
        padding="EXPLICIT",
        explicit_padding=(1, 0, 2, 1),
        dilations=(1, 2),
        mode="CONVOLUTION",
    )
    same = cv.options_from_proto(convert.convolution_options(padding="same", strides=2))
    assert same == types.ConvolutionOptions(strides=(2, 2), padding="SAME")


def test_unspecified_options_take_the_defaults() -> None:
    assert cv.options_from_proto(convserve_pb2.ConvolutionOptions()) == types.ConvolutionOptions()
    assert cv.options_from_proto(convert.convolution_options()) == types.ConvolutionOptions()


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
    options = convserve_pb2.ConvolutionOptions()
    getattr(options, name).extend(values)
    with pytest.raises(errors.InvalidArgument) as caught:
        cv.options_from_proto(options)
    assert caught.value.field == f"options.{name}"
    assert "expected, got [7, 7, 7, " in caught.value.problem
    assert caught.value.problem.endswith(f"… ({len(repr(values))} characters)")
    assert len(str(caught.value)) < 200


# -- Predict and PredictStream -------------------------------------------------


def test_predict_request_from_the_client_names_the_model_and_the_field() -> None:
    images = np.arange(2 * 64, dtype=np.uint8).reshape(2, 8, 8)
    [message] = convert.predict_requests(
        images, max_batch_images=64, spec=convert.model_spec("digits8", 1), shape=(8, 8, 1)
    )
    value = cv.predict_request_from_proto(message)
    assert (value.model, value.field) == (types.ModelRef("digits8", 1), "images")
    assert value.images.dtype == np.uint8
    np.testing.assert_array_equal(value.images, images.reshape(2, 8, 8, 1))


def test_predict_request_images_are_left_as_sent_for_the_runtime_to_check() -> None:
    # Neither reshaped nor checked: the runtime checks them against the version it leases.
    images = np.linspace(0, 2, 3 * 784, dtype=np.float32).reshape(3, 784)
    message = convserve_pb2.PredictRequest(images=to_tensor(images))
    value = cv.predict_request_from_proto(message)
    assert value.model == types.ModelRef()
    np.testing.assert_array_equal(value.images, images)


def test_predict_request_without_images_names_the_field() -> None:
    with pytest.raises(errors.InvalidArgument, match=r"^images: a tensor is required"):
        cv.predict_request_from_proto(convserve_pb2.PredictRequest())


def _predict_request(count: int) -> convserve_pb2.PredictRequest:
    [request] = convert.predict_requests(
        np.zeros((count, 28, 28), np.uint8),
        max_batch_images=64,
        spec=convert.model_spec(),
        shape=(28, 28, 1),
    )
    return request


def test_predict_response_read_by_the_client_has_labels() -> None:
    probabilities = np.full((2, 10), 0.02, np.float32)
    probabilities[0, 7] = 0.82
    probabilities[1, 3] = 0.82
    message = cv.predict_response_to_proto(
        types.PredictOutput("fashion", 4, probabilities, FASHION)
    )
    assert list(message.labels) == ["Sneaker", "Dress"]
    result = convert.predict_result([_predict_request(2)], [message])
    assert (result.model_name, result.model_version) == ("fashion", 4)
    assert list(result.class_indices) == [7, 3]
    assert result.labels == ["Sneaker", "Dress"]
    assert list(result.confidences) == pytest.approx([0.82, 0.82])
    np.testing.assert_array_equal(result.probabilities, probabilities)


def test_predict_response_of_a_model_without_class_names_labels_by_index() -> None:
    probabilities = np.eye(3, dtype=np.float32)[[2, 0]]
    message = cv.predict_response_to_proto(types.PredictOutput("three", 1, probabilities))
    assert list(message.labels) == ["2", "0"]
    result = convert.predict_result([_predict_request(2)], [message])
    assert result.labels == ["2", "0"]
    assert result.probabilities.shape == (2, 3)


def test_predict_stream_request_from_the_client() -> None:
    images = np.arange(2 * 784, dtype=np.float32).reshape(2, 28, 28, 1) / (2 * 784)
    [request] = convert.predict_requests(
        images, max_batch_images=64, spec=convert.model_spec("mnist", 4), shape=(28, 28, 1)
    )
    # As the client's stream sends it (convserve.client.stream).
    message = convserve_pb2.PredictStreamRequest(id=2**40, request=request)
    request_id, value = cv.predict_stream_request_from_proto(message)
    assert request_id == 2**40
    assert (value.model, value.field) == (types.ModelRef("mnist", 4), "images")
    np.testing.assert_array_equal(value.images, images)


def test_predict_stream_request_without_images_names_the_field() -> None:
    message = convserve_pb2.PredictStreamRequest(id=3)
    with pytest.raises(errors.InvalidArgument, match="images: a tensor is required"):
        cv.predict_stream_request_from_proto(message)


def test_predict_stream_response_read_by_the_client() -> None:
    probabilities = np.eye(10, dtype=np.float32)[[3, 8]]
    output = types.PredictOutput("mnist", 2, probabilities, tuple(str(d) for d in range(10)))
    message = cv.predict_stream_response_to_proto(11, output)
    assert (message.id, message.WhichOneof("result")) == (11, "response")
    result = convert.predict_result([_predict_request(2)], [message.response])
    assert list(result.digits) == [3, 8]
    assert result.labels == ["3", "8"]
    assert (result.model_name, result.model_version) == ("mnist", 2)
    np.testing.assert_array_equal(result.probabilities, probabilities)


def test_stream_failure_is_an_error_answer() -> None:
    failure = types.StreamFailure(5, "model 'mnist' version 9 is not loaded")
    message = cv.predict_stream_response_to_proto(12, failure)
    assert message.id == 12
    assert message.WhichOneof("result") == "error"
    assert (message.error.code, message.error.message) == (5, failure.message)


# -- Convolve ------------------------------------------------------------------


def test_convolve_request_from_the_client() -> None:
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    message = convert.convolve_request(
        x, [[1.0, -1.0]], [0.5], convert.convolution_options(padding="same")
    )
    value = cv.convolve_request_from_proto(message)
    np.testing.assert_array_equal(value.input, x)
    np.testing.assert_array_equal(value.kernel, [[1.0, -1.0]])
    assert value.bias is not None
    np.testing.assert_array_equal(value.bias, [0.5])
    assert value.options == types.ConvolutionOptions(padding="SAME")
    no_bias = convert.convolve_request(x, [[1.0]], None, convert.convolution_options())
    assert cv.convolve_request_from_proto(no_bias).bias is None


def test_convolve_response_read_by_the_client() -> None:
    output = np.linspace(-1, 1, 24, dtype=np.float32).reshape(1, 3, 4, 2)
    message = cv.convolve_response_to_proto(types.ConvolveOutput(output))
    assert message.output.dtype == tensor_pb2.DATA_TYPE_FLOAT32
    read = convert.convolve_result(message)
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, output)


@pytest.mark.parametrize("missing", ["input", "kernel"])
def test_convolve_request_needs_input_and_kernel(missing: str) -> None:
    message = convert.convolve_request(
        np.ones((3, 3)), np.ones((2, 2)), None, convert.convolution_options()
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
    message = convert.convolve_request(
        np.ones((3, 3)), np.ones((2, 2)), None, convert.convolution_options()
    )
    getattr(message, field).CopyFrom(tensor)
    with pytest.raises(TensorError) as caught:
        cv.convolve_request_from_proto(message)
    assert caught.value.field == field
    assert problem in str(caught.value)


# -- FitKernel -----------------------------------------------------------------


def test_fit_kernel_request_from_the_client() -> None:
    message = convert.fit_kernel_request(
        np.ones((2, 6, 8)),
        np.zeros((2, 6, 7)),
        (1, 2),
        fit_bias=True,
        options=convert.convolution_options(strides=1),
        learning_rate=0.1,
        max_steps=50,
        tolerance=1e-6,
        seed=7,
    )
    value = cv.fit_kernel_request_from_proto(message)
    np.testing.assert_array_equal(value.inputs, np.ones((2, 6, 8)))
    np.testing.assert_array_equal(value.targets, np.zeros((2, 6, 7)))
    assert (value.kernel_shape, value.fit_bias, value.options) == (
        (1, 2),
        True,
        types.ConvolutionOptions(),
    )
    assert (value.learning_rate, value.max_steps, value.tolerance, value.seed) == (0.1, 50, 1e-6, 7)


def test_fit_kernel_defaults_from_the_client_stay_the_server_defaults() -> None:
    message = convert.fit_kernel_request(
        np.ones((3, 3)),
        np.ones((2, 2)),
        (2, 2),
        fit_bias=False,
        options=convert.convolution_options(),
        learning_rate=None,
        max_steps=None,
        tolerance=0.0,
        seed=0,
    )
    value = cv.fit_kernel_request_from_proto(message)
    assert value.learning_rate is None
    assert value.max_steps is None
    assert value.fit_bias is False


def test_fit_kernel_nan_learning_rate_is_refused() -> None:
    message = convserve_pb2.FitKernelRequest(
        inputs=to_tensor(np.ones((3, 3))),
        targets=to_tensor(np.ones((2, 2))),
        kernel_shape=[2, 2],
        learning_rate=float("nan"),
    )
    with pytest.raises(errors.InvalidArgument, match=r"^learning_rate: "):
        cv.fit_kernel_request_from_proto(message)


def test_fit_kernel_response_read_by_the_client() -> None:
    value = types.FitKernelOutput(
        kernel=np.array([[1.0, -1.0]], np.float32),
        bias=np.array([0.25]),
        loss=[1.0, 0.5, 0.01],
        steps=2,
        stop_reason="converged",
    )
    message = cv.fit_kernel_response_to_proto(value)
    assert message.kernel.dtype == tensor_pb2.DATA_TYPE_FLOAT64
    result = convert.fit_kernel_result(message)
    assert result.kernel.dtype == np.float64
    np.testing.assert_array_equal(result.kernel, [[1.0, -1.0]])
    assert result.bias is not None
    np.testing.assert_array_equal(result.bias, [0.25])
    assert (result.loss, result.steps, result.stop_reason) == ((1.0, 0.5, 0.01), 2, "converged")
    without_bias = cv.fit_kernel_response_to_proto(
        types.FitKernelOutput(value.kernel, None, [1.0], 0, "max_steps")
    )
    assert not without_bias.HasField("bias")
    assert convert.fit_kernel_result(without_bias).bias is None


# -- GetFeatureMaps ------------------------------------------------------------


def test_feature_maps_request_from_the_client() -> None:
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    message = convert.feature_maps_request(
        image, ["conv2"], convert.model_spec("digits8", 3), (8, 8, 1)
    )
    value = cv.feature_maps_request_from_proto(message)
    np.testing.assert_array_equal(value.image, image.reshape(1, 8, 8, 1))
    assert value.layers == ("conv2",)
    assert value.model == types.ModelRef("digits8", 3)


@pytest.mark.parametrize("shape", [(784,), (1, 28, 28), (2, 28, 28), (28, 27), (5,)])
def test_feature_maps_request_leaves_the_image_to_the_runtime(shape: tuple[int, ...]) -> None:
    # Only the runtime knows the model's input shape: the image goes on as decoded.
    image = (np.arange(int(np.prod(shape))) % 251).astype(np.uint8).reshape(shape)
    message = convserve_pb2.GetFeatureMapsRequest(image=to_tensor(image))
    value = cv.feature_maps_request_from_proto(message)
    assert value.image.shape == shape
    np.testing.assert_array_equal(value.image, image)
    assert (value.layers, value.model) == ((), types.ModelRef())


def test_feature_maps_request_needs_an_image() -> None:
    with pytest.raises(errors.InvalidArgument, match=r"^image: a tensor is required"):
        cv.feature_maps_request_from_proto(convserve_pb2.GetFeatureMapsRequest(layers=["conv1"]))


def test_feature_maps_request_refuses_empty_layer_names() -> None:
    message = convserve_pb2.GetFeatureMapsRequest(
        image=to_tensor(np.zeros((28, 28), np.uint8)), layers=["conv1", ""]
    )
    with pytest.raises(errors.InvalidArgument, match=r"^layers\[1\]: "):
        cv.feature_maps_request_from_proto(message)


def test_feature_maps_response_read_by_the_client() -> None:
    maps = [
        ("conv1", np.random.default_rng(0).random((26, 26, 4), dtype=np.float32)),
        ("conv2", np.zeros((11, 11, 8), np.float32)),
    ]
    message = cv.feature_maps_response_to_proto(types.FeatureMapsOutput("mnist", 2, maps))
    result = convert.feature_maps_result(message)
    assert (result.model_name, result.model_version) == ("mnist", 2)
    assert list(result.maps) == ["conv1", "conv2"]
    for name, array in maps:
        np.testing.assert_array_equal(result.maps[name], array)


# -- GetModelMetadata ----------------------------------------------------------


def test_metadata_request_from_the_client() -> None:
    message = convert.metadata_request(convert.model_spec("fashion", 2))
    assert cv.metadata_request_from_proto(message) == types.ModelRef("fashion", 2)
    default = convert.metadata_request(convert.model_spec())
    assert cv.metadata_request_from_proto(default) == types.ModelRef()


def _training(confusion: object) -> dict[str, object]:
    return {
        "dataset": "fashion-mnist",
        "architecture": "keras",
        "hyperparameters": {"epochs": 2, "optimizer": "adam"},
        "test_accuracy": 0.91,
        "train_examples": 60000,
        "test_examples": 10000,
        "training_time_s": 12.5,
        "exported_at": "2026-01-01T00:00:00Z",
        "tensorflow_version": "2.21.0",
        "fixed_kernel": "",
        "total_parameters": 34826,
        "class_names": list(FASHION[:3]),
        "confusion_matrix": confusion,
        "layers": [{"name": "conv1"}],
    }


def test_metadata_response_read_by_the_client() -> None:
    confusion = [[5, 1, 0], [0, 6, 0], [2, 0, 4]]
    value = types.ModelMetadata(
        model_name="fashion3",
        loaded_versions=(3, 1),
        serving_version=3,
        inputs=(types.TensorSpecInfo("images", ("uint8", "float32"), (-1, 28, 28, 1)),),
        outputs=(types.TensorSpecInfo("probabilities", ("float32",), (-1, 3)),),
        layers=(
            types.LayerRow("conv1", "Conv2D", (26, 26, 32), 320, True),
            types.LayerRow("fixed_kernel", "Conv2D", (26, 26, 1), 10, False),
        ),
        training=_training(confusion),
        device="/CPU:0",
        class_names=FASHION[:3],
    )
    message = cv.metadata_response_to_proto(value)
    assert list(message.training.confusion_matrix) == [5, 1, 0, 0, 6, 0, 2, 0, 4]
    assert list(message.class_names) == list(FASHION[:3])
    meta = convert.metadata_result(message)
    assert (meta.model_name, meta.loaded_versions, meta.serving_version) == (
        "fashion3",
        (1, 3),
        3,
    )
    assert meta.input_shape == (28, 28, 1)
    assert [(s.name, s.dtypes, s.shape) for s in meta.inputs] == [
        ("images", ("uint8", "float32"), (-1, 28, 28, 1))
    ]
    assert [(s.name, s.dtypes, s.shape) for s in meta.outputs] == [
        ("probabilities", ("float32",), (-1, 3))
    ]
    assert [(la.name, la.output_shape, la.parameters, la.trainable) for la in meta.layers] == [
        ("conv1", (26, 26, 32), 320, True),
        ("fixed_kernel", (26, 26, 1), 10, False),
    ]
    training = meta.training
    assert (training.dataset, training.test_accuracy, training.total_parameters) == (
        "fashion-mnist",
        0.91,
        34826,
    )
    assert training.hyperparameters == {"epochs": "2", "optimizer": "adam"}
    assert training.confusion_matrix is not None
    np.testing.assert_array_equal(training.confusion_matrix, confusion)
    assert meta.class_names == FASHION[:3]
    assert meta.device == "/CPU:0"


def test_training_record_keeps_only_known_fields_and_skips_nulls() -> None:
    record = cv.training_to_proto(
        {"dataset": "sample", "test_accuracy": None, "layers": [1, 2], "seed": 0}
    )
    assert record.dataset == "sample"
    assert record.test_accuracy == 0.0
    assert not record.hyperparameters
    assert list(record.confusion_matrix) == []


@pytest.mark.parametrize(
    "confusion",
    [
        None,
        [],
        [[1, 2], [3]],  # ragged
        [[1, 2], [3, 4], [5, 6]],  # not square
        [[1, -2], [3, 4]],  # a negative count
        [[1, 2.5], [3, 4]],  # not an integer
        [[True, False], [False, True]],  # flags, not counts
        "[[1, 0], [0, 1]]",
        [[1, 0], "01"],
        {"0": [1, 0], "1": [0, 1]},
    ],
)
def test_malformed_confusion_matrices_are_left_out(confusion: object) -> None:
    record = cv.training_to_proto(_training(confusion))
    assert list(record.confusion_matrix) == []
    assert record.dataset == "fashion-mnist"  # the rest of the record is kept


def test_a_one_class_confusion_matrix_is_kept() -> None:
    assert list(cv.training_to_proto({"confusion_matrix": [[7]]}).confusion_matrix) == [7]


# -- ListModels ----------------------------------------------------------------


def test_list_models_response_read_by_the_client_is_sorted() -> None:
    models = [
        types.ModelStatus(
            "mnist",
            ready=True,
            versions=(
                types.VersionStatus(2, "AVAILABLE", serving=True),
                types.VersionStatus(1, "AVAILABLE"),
            ),
        ),
        types.ModelStatus(
            "fashion",
            ready=False,
            versions=(types.VersionStatus(1, "END", error="no serving signature"),),
        ),
        types.ModelStatus("digits8", ready=False, error="the base path does not exist"),
    ]
    models[0] = dataclasses.replace(
        models[0],
        memory_bytes=123_456_789_012,
        labels=(("canary", 2), ("stable", 1)),
        label_errors=("model mnist: version label 'next' -> 3 not applied: ...",),
    )
    message = cv.list_models_response_to_proto(models, "mnist")
    assert dict(message.models[2].version_labels) == {"canary": 2, "stable": 1}
    assert convert.list_models_result(message) == ModelList(
        models=(
            ModelStatus("digits8", False, (), error="the base path does not exist"),
            ModelStatus(
                "fashion", False, (VersionStatus(1, "END", False, "no serving signature"),)
            ),
            ModelStatus(
                "mnist",
                True,
                (VersionStatus(1, "AVAILABLE", False, ""), VersionStatus(2, "AVAILABLE", True, "")),
                memory_bytes=123_456_789_012,
                labels=(("canary", 2), ("stable", 1)),
                label_errors=("model mnist: version label 'next' -> 3 not applied: ...",),
            ),
        ),
        default_model="mnist",
    )


def test_list_models_response_without_models() -> None:
    message = cv.list_models_response_to_proto([], "mnist")
    assert list(message.models) == []
    assert convert.list_models_result(message) == ModelList((), "mnist")
