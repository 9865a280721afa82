"""convserve's JSON API: the converters, both directions.

Each JSON request is compared with what the gRPC converters read from the
equivalent convserve.v1 message built by hand, and each JSON answer with the
values of the gRPC answer built from the same result.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import orjson
import pytest

from convserve.server import converters, errors, types
from convserve.server.protocols import convserve_http as ch
from convserve.server.protocols.oip_convert import MAX_RANK
from convserve.v1 import convserve_pb2
from convserve.v1.tensor_codec import PROTO_TO_DTYPE, from_tensor, to_tensor

RNG = np.random.default_rng(7)
IMAGE = RNG.random((6, 5))
KERNEL = np.array([[1.0, -1.0], [0.5, 0.25]])


def invalid(exc: pytest.ExceptionInfo[BaseException], field: str, problem: str = "") -> None:
    code, message = errors.status_of(exc.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"{field}: "), message
    assert problem in message, message


def assert_same_arrays(got: np.ndarray | None, expected: np.ndarray | None) -> None:
    if expected is None:
        assert got is None
        return
    assert got is not None
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def assert_same_convolve(got: types.ConvolveInput, expected: types.ConvolveInput) -> None:
    assert_same_arrays(got.input, expected.input)
    assert_same_arrays(got.kernel, expected.kernel)
    assert_same_arrays(got.bias, expected.bias)
    assert got.options == expected.options


# -- tensors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([[1, 2], [3, 4]], np.array([[1, 2], [3, 4]], dtype=np.float64)),
        ([0.5, 0.25], np.array([0.5, 0.25])),
        (
            {"dtype": "float32", "shape": [2, 3], "data": [0, 1, 2, 3, 4, 5]},
            np.arange(6, dtype=np.float32).reshape(2, 3),
        ),
        (
            {"dtype": "float32", "shape": [3, 2], "data": [[0, 1, 2], [3, 4, 5]]},
            np.arange(6, dtype=np.float32).reshape(3, 2),
        ),
        ({"data": [[1, 2]]}, np.array([[1.0, 2.0]])),
        ({"dtype": "float64", "data": [0.5]}, np.array([0.5])),
        (
            {"dtype": "uint8", "shape": [1, 2, 2, 1], "data": [0, 7, 255, 3]},
            np.array([0, 7, 255, 3], dtype=np.uint8).reshape(1, 2, 2, 1),
        ),
        ({"shape": [0, 3], "data": []}, np.zeros((0, 3))),
        ({"shape": [], "data": [4]}, np.array(4.0)),
    ],
)
def test_json_tensor_forms(value: Any, expected: np.ndarray) -> None:
    assert_same_arrays(ch.json_tensor(value, "input", ch._float64), expected)


def test_numpy_arrays_from_the_json_worker_are_tensors_too() -> None:
    given = np.arange(6, dtype=np.int64).reshape(2, 3)
    assert_same_arrays(ch.json_tensor(given, "input", ch._float64), given.astype(np.float64))
    structured = ch.json_tensor(
        {"dtype": "float32", "shape": [3, 2], "data": given}, "x", ch._float64
    )
    assert_same_arrays(structured, given.astype(np.float32).reshape(3, 2))


@pytest.mark.parametrize(
    ("value", "field", "problem"),
    [
        ({"dtype": "float32", "shape": [2]}, "input", 'or {"dtype", "shape", "data"} expected'),
        ({"data": [1], "strides": [1]}, "input", 'or {"dtype", "shape", "data"} expected'),
        ({}, "input", 'nested arrays of numbers or {"dtype", "shape", "data"} expected'),
        (
            {"dtype": "int64", "data": [1]},
            "input.dtype",
            "one of uint8, float32, float64 expected, got 'int64'",
        ),
        ({"dtype": "f" * 200, "data": [1]}, "input.dtype", "(200 characters)"),
        ({"dtype": None, "data": [1]}, "input.dtype", "got None"),
        ({"dtype": ["x"], "data": [1]}, "input.dtype", "got ['x']"),
        ({"shape": [2**30, 2**30, 2**30], "data": []}, "input.shape", "0 values given"),
        ({"shape": [2, 2], "data": [1, 2, 3]}, "input.shape", "3 values given"),
        ({"shape": [-1], "data": [1]}, "input.shape", "non-negative integer dimensions"),
        ({"shape": [1.0], "data": [1]}, "input.shape", "non-negative integer dimensions"),
        ({"shape": [True], "data": [1]}, "input.shape", "non-negative integer dimensions"),
        ({"shape": [2**31], "data": [1]}, "input.shape", "non-negative integer dimensions"),
        ({"shape": "2", "data": [1, 2]}, "input.shape", "non-negative integer dimensions"),
        (
            {"shape": [1] * (MAX_RANK + 1), "data": [1]},
            "input.shape",
            f"at most {MAX_RANK} non-negative integer dimensions",
        ),
        ({"data": [[1, 2], [3]]}, "input.data", "rows of equal length"),
        ({"data": ["1"]}, "input.data", "numbers expected, got strings"),
        ({"data": {"a": 1}}, "input.data", "got an object"),
        ({"dtype": "uint8", "data": [256]}, "input.data", "integers in [0, 255] expected"),
        ({"dtype": "uint8", "data": [0.5]}, "input.data", "got numbers with fractions"),
        ([[1, 2], [3]], "input", "rows of equal length"),
        ([[True]], "input", "numbers expected, got booleans"),
        ("abc", "input", "numbers expected, got strings"),
    ],
)
def test_bad_tensors_name_the_field(value: Any, field: str, problem: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        ch.json_tensor(value, "input", ch._float64)
    invalid(exc, field, problem)


# -- Convolve ------------------------------------------------------------------


def convolve_proto(**options: Any) -> convserve_pb2.ConvolveRequest:
    return convserve_pb2.ConvolveRequest(
        input=to_tensor(IMAGE, np.float64),
        kernel=to_tensor(KERNEL, np.float64),
        bias=to_tensor(np.array([0.5]), np.float64),
        options=convserve_pb2.ConvolutionOptions(**options),
    )


@pytest.mark.parametrize(
    ("json_options", "proto_options"),
    [
        (None, {}),
        ({}, {}),
        (
            {"strides": [1, 2], "padding": "SAME", "dilations": [2, 1], "mode": "CONVOLUTION"},
            {
                "strides": [1, 2],
                "padding": convserve_pb2.PADDING_SAME,
                "dilations": [2, 1],
                "mode": convserve_pb2.CONVOLUTION_MODE_CONVOLUTION,
            },
        ),
        (
            {"padding": "PADDING_EXPLICIT", "explicit_padding": [1, 0, 2, 1]},
            {"padding": convserve_pb2.PADDING_EXPLICIT, "explicit_padding": [1, 0, 2, 1]},
        ),
        (
            {"padding": "VALID", "mode": "CONVOLUTION_MODE_CROSS_CORRELATION"},
            {
                "padding": convserve_pb2.PADDING_VALID,
                "mode": convserve_pb2.CONVOLUTION_MODE_CROSS_CORRELATION,
            },
        ),
        # Protobuf's JSON mapping also takes the enum numbers and lowerCamel names.
        (
            {"padding": 2, "explicitPadding": []},
            {"padding": convserve_pb2.PADDING_SAME},
        ),
    ],
)
def test_convolve_request_reads_what_grpc_reads(
    json_options: dict[str, Any] | None, proto_options: dict[str, Any]
) -> None:
    body: dict[str, Any] = {"input": IMAGE.tolist(), "kernel": KERNEL.tolist(), "bias": [0.5]}
    if json_options is not None:
        body["options"] = json_options
    expected = converters.convolve_request_from_proto(convolve_proto(**proto_options))
    assert_same_convolve(ch.convolve_request(body), expected)


def test_convolve_request_with_structured_tensors() -> None:
    body = {
        "input": {"dtype": "float32", "shape": [1, 6, 5, 1], "data": IMAGE.ravel().tolist()},
        "kernel": {"dtype": "float32", "shape": [2, 2, 1, 1], "data": KERNEL.tolist()},
    }
    proto = convserve_pb2.ConvolveRequest(
        input=to_tensor(IMAGE.reshape(1, 6, 5, 1), np.float32),
        kernel=to_tensor(KERNEL.reshape(2, 2, 1, 1), np.float32),
    )
    got = ch.convolve_request(body)
    assert_same_convolve(got, converters.convolve_request_from_proto(proto))
    assert got.input.dtype == np.float32
    assert got.bias is None


@pytest.mark.parametrize("bias", [None, "absent"])
def test_no_bias(bias: Any) -> None:
    body: dict[str, Any] = {"input": [[1.0]], "kernel": [[1.0]]}
    if bias is None:
        body["bias"] = None
    assert ch.convolve_request(body).bias is None


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"input": [[1.0]]}, "kernel", "a tensor is required, got none"),
        ({"kernel": [[1.0]]}, "input", "a tensor is required, got none"),
        ({"input": [[1.0]], "kernel": None}, "kernel", "a tensor is required, got none"),
        ({"input": [[1.0], []], "kernel": [[1.0]]}, "input", "rows of equal length"),
        ({"input": [[1.0]], "kernel": [["a"]]}, "kernel", "numbers expected, got strings"),
        ({"input": [[1.0]], "kernel": [[1.0]], "bias": {"x": 1}}, "bias", "expected"),
        (
            {"input": [[1.0]], "kernel": [[1.0]], "options": {"strides": [1, 2, 3]}},
            "options.strides",
            "two values [stride_h, stride_w] (or none for [1, 1]) expected",
        ),
        (
            {"input": [[1.0]], "kernel": [[1.0]], "options": {"explicit_padding": [1, 2, 3]}},
            "options.explicit_padding",
            "four values [top, bottom, left, right] expected",
        ),
        (
            {"input": [[1.0]], "kernel": [[1.0]], "options": {"padding": 9}},
            "options.padding",
            "PADDING_VALID, PADDING_SAME or PADDING_EXPLICIT expected, got 9",
        ),
        (
            {"input": [[1.0]], "kernel": [[1.0]], "options": {"padding": "ROUND"}},
            "body",
            "PADDING_ROUND",
        ),
        (
            {"input": [[1.0]], "kernel": [[1.0]], "options": {"mode": "FLIP"}},
            "body",
            "CONVOLUTION_MODE_FLIP",
        ),
        ({"input": [[1.0]], "kernel": [[1.0]], "options": [1]}, "body", "options"),
    ],
)
def test_bad_convolve_requests_name_the_field(
    body: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        ch.convolve_request(body)
    invalid(exc, field, problem)


def test_the_same_option_errors_as_grpc() -> None:
    proto = convolve_proto(strides=[1, 2, 3])
    with pytest.raises(errors.InvalidArgument) as grpc_exc:
        converters.convolve_request_from_proto(proto)
    body = {"input": IMAGE.tolist(), "kernel": KERNEL.tolist(), "options": {"strides": [1, 2, 3]}}
    with pytest.raises(errors.InvalidArgument) as http_exc:
        ch.convolve_request(body)
    assert str(http_exc.value) == str(grpc_exc.value)


@pytest.mark.parametrize(
    ("body", "unknown"),
    [
        ({"input": [[1.0]], "kernel": [[1.0]], "padding": "SAME"}, "padding"),
        ({"input": [[1.0]], "kernel": [[1.0]], "options": {"stride": [1, 1]}}, "stride"),
        ({"input": [[1.0]], "kernel": [[1.0]], "options": {"padding": "SAME", "pad": 1}}, "pad"),
    ],
)
def test_unknown_fields_are_refused_by_name(body: dict[str, Any], unknown: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        ch.convolve_request(body)
    invalid(exc, "body", f'no field named "{unknown}"')
    assert "\n" not in str(exc.value)


# -- FitKernel -------------------------------------------------------------------


def test_fit_kernel_request_reads_what_grpc_reads() -> None:
    inputs = RNG.random((2, 6, 5))
    targets = RNG.random((2, 5, 4))
    body = {
        "inputs": inputs.tolist(),
        "targets": {"shape": [2, 5, 4], "data": targets.ravel().tolist()},
        "kernel_shape": [2, 2],
        "fit_bias": True,
        "options": {"padding": "VALID", "mode": "CONVOLUTION", "strides": [1, 1]},
        "learning_rate": 0.03,
        "max_steps": 50,
        "tolerance": 1e-6,
        "seed": 7,
    }
    proto = convserve_pb2.FitKernelRequest(
        inputs=to_tensor(inputs, np.float64),
        targets=to_tensor(targets, np.float64),
        kernel_shape=[2, 2],
        fit_bias=True,
        options=convserve_pb2.ConvolutionOptions(
            padding=convserve_pb2.PADDING_VALID,
            mode=convserve_pb2.CONVOLUTION_MODE_CONVOLUTION,
            strides=[1, 1],
        ),
        learning_rate=0.03,
        max_steps=50,
        tolerance=1e-6,
        seed=7,
    )
    got = ch.fit_kernel_request(body)
    expected = converters.fit_kernel_request_from_proto(proto)
    assert_same_arrays(got.inputs, expected.inputs)
    assert_same_arrays(got.targets, expected.targets)
    assert (
        got.kernel_shape,
        got.fit_bias,
        got.options,
        got.learning_rate,
        got.max_steps,
        got.tolerance,
        got.seed,
    ) == (
        expected.kernel_shape,
        expected.fit_bias,
        expected.options,
        expected.learning_rate,
        expected.max_steps,
        expected.tolerance,
        expected.seed,
    )
    assert got.options.mode == "CONVOLUTION"
    assert got.learning_rate == 0.03
    assert got.kernel_shape == (2, 2)


def test_fit_kernel_defaults_are_the_grpc_defaults() -> None:
    body = {"inputs": [[1.0, 2.0]], "targets": [[3.0]], "kernel_shape": [1, 2]}
    got = ch.fit_kernel_request(body)
    assert (got.learning_rate, got.max_steps, got.tolerance, got.seed, got.fit_bias) == (
        None,
        None,
        0.0,
        0,
        False,
    )


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"inputs": [[1.0]], "kernel_shape": [1, 1]}, "targets", "a tensor is required"),
        ({"targets": [[1.0]], "kernel_shape": [1, 1]}, "inputs", "a tensor is required"),
        (
            {"inputs": [[1.0]], "targets": [[1.0]], "kernel_shape": [1, 1], "steps": 3},
            "body",
            'no field named "steps"',
        ),
        (
            {"inputs": [[1.0]], "targets": [[1.0]], "kernel_shape": ["a"]},
            "body",
            "kernel_shape",
        ),
        (
            {"inputs": [[1.0]], "targets": [[1.0]], "kernel_shape": [1, 1], "max_steps": 2**40},
            "body",
            "max_steps",
        ),
        (
            {"inputs": [[1.0]], "targets": [[1.0]], "kernel_shape": [1, 1], "learning_rate": "NaN"},
            "learning_rate",
            "a positive finite number expected, got nan",
        ),
    ],
)
def test_bad_fit_kernel_requests_name_the_field(
    body: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        ch.fit_kernel_request(body)
    invalid(exc, field, problem)


# -- GetFeatureMaps ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "array"),
    [
        # Integers are pixels in [0, 255]; other numbers float32 in [0, 1].
        ([[0, 17], [255, 3]], np.array([[0, 17], [255, 3]], dtype=np.uint8)),
        ([[0.5, 0], [1, 0.25]], np.array([[0.5, 0], [1, 0.25]], dtype=np.float32)),
        (
            {"dtype": "float32", "shape": [1, 2, 2, 1], "data": [0, 1, 1, 0]},
            np.array([0, 1, 1, 0], dtype=np.float32).reshape(1, 2, 2, 1),
        ),
        (
            {"dtype": "uint8", "shape": [4], "data": [0, 1, 2, 3]},
            np.arange(4, dtype=np.uint8),
        ),
    ],
)
def test_feature_maps_request_reads_what_grpc_reads(image: Any, array: np.ndarray) -> None:
    body = {
        "model_spec": {"name": "mnist", "version": "2"},
        "image": image,
        "layers": ["conv1", "conv2"],
    }
    proto = convserve_pb2.GetFeatureMapsRequest(
        model_spec=convserve_pb2.ModelSpec(name="mnist", version=2),
        image=to_tensor(array),
        layers=["conv1", "conv2"],
    )
    got = ch.feature_maps_request(body)
    expected = converters.feature_maps_request_from_proto(proto)
    assert_same_arrays(got.image, expected.image)
    assert_same_arrays(got.image, array)
    assert (got.layers, got.model) == (expected.layers, expected.model)
    assert got.model == types.ModelRef("mnist", 2)


@pytest.mark.parametrize(
    ("spec", "ref"),
    [
        (None, types.DEFAULT_MODEL),
        ({}, types.DEFAULT_MODEL),
        ({"name": "fashion"}, types.ModelRef("fashion")),
        ({"name": "fashion", "version": 3}, types.ModelRef("fashion", 3)),
        ({"name": "fashion", "version_label": "canary"}, types.ModelRef("fashion", label="canary")),
    ],
)
def test_feature_maps_model_spec(spec: dict[str, Any] | None, ref: types.ModelRef) -> None:
    body: dict[str, Any] = {"image": [[0.5]]}
    if spec is not None:
        body["model_spec"] = spec
    assert ch.feature_maps_request(body).model == ref


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"layers": ["conv1"]}, "image", "a tensor is required"),
        ({"image": [[256]]}, "image", "integers in [0, 255] expected for uint8"),
        ({"image": [[-1, 0]]}, "image", "got values in [-1, 0]"),
        ({"image": [[0.5]], "layers": [""]}, "layers[0]", "a layer name expected"),
        ({"image": [[0.5]], "model_spec": {"version": 0}}, "model_spec.version", "positive"),
        (
            {"image": [[0.5]], "model_spec": {"name": "m", "version": 2, "version_label": "c"}},
            "model_spec",
            "a version or a version_label expected, not both",
        ),
        ({"image": [[0.5]], "model_spec": {"name": "m", "tag": 1}}, "body", 'no field named "tag"'),
        ({"image": [[0.5]], "model": "mnist"}, "body", 'no field named "model"'),
    ],
)
def test_bad_feature_maps_requests_name_the_field(
    body: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        ch.feature_maps_request(body)
    invalid(exc, field, problem)


# -- answers -------------------------------------------------------------------------


def written(value: Any) -> Any:
    """`value` as the HTTP API writes and a client reads it."""
    return orjson.loads(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY))


@pytest.mark.parametrize("with_bias", [True, False])
def test_fit_kernel_json_has_the_values_of_the_grpc_answer(with_bias: bool) -> None:
    result = types.FitKernelOutput(
        kernel=RNG.random((2, 2)),
        bias=np.array([0.125]) if with_bias else None,
        loss=[1.5, 0.25, 0.0625],
        steps=2,
        stop_reason="converged",
    )
    proto = converters.fit_kernel_response_to_proto(result)
    answer = written(ch.fit_kernel_json(result))
    assert set(answer) == {"kernel", "bias", "loss", "steps", "stop_reason"}
    kernel = from_tensor(proto.kernel, "kernel")
    np.testing.assert_array_equal(np.asarray(answer["kernel"], dtype=np.float64), kernel)
    assert np.asarray(answer["kernel"]).shape == kernel.shape
    if with_bias:
        bias = from_tensor(proto.bias, "bias")
        np.testing.assert_array_equal(np.asarray(answer["bias"], dtype=np.float64), bias)
    else:
        assert not proto.HasField("bias")
        assert answer["bias"] is None
    assert answer["loss"] == list(proto.loss)
    assert answer["steps"] == proto.steps
    assert answer["stop_reason"] == proto.stop_reason == "converged"


def test_feature_maps_json_has_the_values_of_the_grpc_answer() -> None:
    maps = [
        ("conv1", RNG.random((3, 3, 2), dtype=np.float32)),
        ("conv2", RNG.random((1, 1, 4), dtype=np.float32)),
    ]
    result = types.FeatureMapsOutput("mnist", 2, maps)
    proto = converters.feature_maps_response_to_proto(result)
    answer = written(ch.feature_maps_json(result))
    assert answer["model_name"] == proto.model_name
    assert answer["model_version"] == proto.model_version
    assert [m["layer"] for m in answer["feature_maps"]] == [m.layer for m in proto.feature_maps]
    for item, message in zip(answer["feature_maps"], proto.feature_maps, strict=True):
        expected = from_tensor(message.activations, "activations")
        got = np.asarray(item["activations"], dtype=np.float32)
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_model_status_json_has_the_values_of_the_grpc_answer() -> None:
    status = types.ModelStatus(
        name="mnist",
        ready=True,
        versions=(
            types.VersionStatus(1, "END", error="version 1: no saved_model.pb"),
            types.VersionStatus(2, "AVAILABLE", serving=True),
            types.VersionStatus(3, "LOADING"),
        ),
        memory_bytes=12345,
        labels=(("canary", 3), ("stable", 2)),
        label_errors=("canary: version 3 is not loaded",),
    )
    proto = converters.model_status_to_proto(status)
    answer = written(ch.model_status_json(status))
    assert answer["name"] == proto.name
    assert answer["ready"] is proto.ready is True
    assert answer["versions"] == [
        {"version": v.version, "state": v.state, "serving": v.serving, "error": v.error}
        for v in proto.versions
    ]
    assert answer["error"] == proto.error == ""
    assert answer["memory_bytes"] == proto.memory_bytes
    assert answer["labels"] == dict(proto.version_labels) == {"canary": 3, "stable": 2}
    assert answer["label_errors"] == list(proto.label_errors)


def test_metadata_json_has_the_values_of_the_grpc_answer() -> None:
    meta = types.ModelMetadata(
        model_name="mnist",
        loaded_versions=(1, 2),
        serving_version=2,
        inputs=(types.TensorSpecInfo("images", ("uint8", "float32"), (-1, 28, 28, 1)),),
        outputs=(types.TensorSpecInfo("probabilities", ("float32",), (-1, 10)),),
        layers=(types.LayerRow("conv1", "Conv2D", (26, 26, 8), 80, trainable=False),),
        training={"dataset": "mnist", "test_accuracy": 0.99, "confusion_matrix": [[1, 0], [0, 1]]},
        device="/CPU:0",
        class_names=("zero", "one"),
    )
    proto = converters.metadata_response_to_proto(meta)
    answer = written(ch.metadata_json(meta))
    assert answer["model_name"] == proto.model_name
    assert answer["loaded_versions"] == list(proto.loaded_versions)
    assert answer["serving_version"] == proto.serving_version
    for got, spec in zip(
        answer["inputs"] + answer["outputs"], [*proto.inputs, *proto.outputs], strict=True
    ):
        assert got["name"] == spec.name
        assert got["shape"] == list(spec.shape)
        assert got["dtypes"] == [PROTO_TO_DTYPE[d].name for d in spec.dtypes]
    assert answer["layers"] == [
        {
            "name": layer.name,
            "type": layer.type,
            "output_shape": list(layer.output_shape),
            "parameters": layer.parameters,
            "trainable": layer.trainable,
        }
        for layer in proto.layers
    ]
    assert answer["device"] == proto.device
    assert answer["class_names"] == list(proto.class_names)
    assert answer["training"]["dataset"] == proto.training.dataset
    assert answer["training"]["test_accuracy"] == proto.training.test_accuracy
    assert answer["training"]["confusion_matrix"] == [[1, 0], [0, 1]]
    assert list(proto.training.confusion_matrix) == [1, 0, 0, 1]
