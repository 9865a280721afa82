"""Open Inference Protocol over HTTP: the converters, both directions.

Requests are written by tritonclient.http's own `generate_request_body` and
answers read back with its `parse_response_body`, so the bytes we read and
write are those of a stock client.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.grpc import service_pb2
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput
from tritonclient.utils import np_to_triton_dtype

from convserve.server import errors, types
from convserve.server.protocols import oip_convert as oc
from convserve.server.protocols import oip_http_convert as hc
from convserve.v1.tensor_codec import TensorError

RNG = np.random.default_rng(3)
UINT8_IMAGES = RNG.integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8)
FLOAT_IMAGES = RNG.random((2, 28, 28, 1), dtype=np.float32)
HEADER = "Inference-Header-Content-Length"


def triton_input(name: str, array: np.ndarray, binary: bool) -> InferInput:
    item = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    item.set_data_from_numpy(array, binary_data=binary)
    return item


def triton_body(inputs: list[InferInput], **kwargs: Any) -> tuple[bytes, int | None]:
    body, header_length = InferenceServerClient.generate_request_body(inputs, **kwargs)
    return body, header_length


def decode(
    body: bytes | memoryview,
    header_length: int | None = None,
    model: str = "mnist",
    version: str = "",
) -> tuple[Any, hc.OutputFormat]:
    return hc.infer_request(body, header_length, model_name=model, model_version=version)


def invalid(exc: pytest.ExceptionInfo[BaseException], field: str, problem: str = "") -> None:
    code, message = errors.status_of(exc.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"{field}: "), message
    assert problem in message, message


# -- requests -----------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("images", [UINT8_IMAGES, FLOAT_IMAGES], ids=["UINT8", "FP32"])
def test_triton_client_requests_decode_to_the_images_sent(images: np.ndarray, binary: bool) -> None:
    body, header_length = triton_body(
        [triton_input("images", images, binary)],
        outputs=[
            InferRequestedOutput("probabilities", binary_data=binary),
            InferRequestedOutput("digits", binary_data=not binary),
        ],
        request_id="req-7",
    )
    assert (header_length is None) is not binary
    request, output_format = decode(body, header_length, version="2")
    array, ref, outputs, raw = oc.predict_request(request)
    assert array.dtype == images.dtype
    np.testing.assert_array_equal(array, images)
    assert ref == types.ModelRef("mnist", 2)
    assert outputs == ["probabilities", "digits"]
    assert raw is True
    assert request.id == "req-7"
    assert output_format.is_binary("probabilities") is binary
    assert output_format.is_binary("digits") is not binary
    # binary_data is the HTTP answer's flag: it does not travel on.
    assert all(not out.parameters for out in request.outputs)


def test_no_requested_outputs_means_every_output_binary() -> None:
    # tritonclient asks for binary outputs through binary_data_output when it names none.
    body, header_length = triton_body([triton_input("images", UINT8_IMAGES, True)])
    request, output_format = decode(body, header_length)
    assert output_format == hc.OutputFormat(default_binary=True)
    assert output_format.is_binary("labels")
    assert not request.parameters
    assert oc.predict_request(request)[2] == ["probabilities", "digits"]


def test_json_data_answers_json_by_default() -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 2], "data": [3, 4]}]}
    )
    request, output_format = decode(body)
    assert output_format == hc.OutputFormat()
    assert not output_format.is_binary("probabilities")
    np.testing.assert_array_equal(oc.predict_request(request)[0], [[3, 4]])


def test_conv2d_json_and_binary_inputs_with_parameters() -> None:
    x = RNG.random((1, 5, 5, 2))
    kernel = RNG.random((3, 3, 2, 4))
    bias = RNG.random(4)
    body, header_length = triton_body(
        [
            triton_input("input", x, False),
            triton_input("kernel", kernel, True),
            triton_input("bias", bias, True),
        ],
        parameters={"strides": "2,1", "padding": "SAME", "dilations": 1},
        priority=2,
        timeout=1000,
    )
    request, _ = decode(body, header_length, model="conv2d", version="1")
    assert request.parameters["dilations"].int64_param == 1
    assert request.parameters["priority"].int64_param == 2
    value, raw = oc.convolve_request(request)
    np.testing.assert_array_equal(value.input, x)
    np.testing.assert_array_equal(value.kernel, kernel)
    assert value.bias is not None
    np.testing.assert_array_equal(value.bias, bias)
    assert value.options == types.ConvolutionOptions(
        strides=(2, 1), dilations=(1, 1), padding="SAME"
    )
    assert raw is True


def test_nested_and_flat_json_data_decode_alike() -> None:
    def images(data: Any, shape: list[int]) -> np.ndarray:
        tensor = {"name": "images", "datatype": "UINT8", "shape": shape, "data": data}
        request, _ = decode(memoryview(orjson.dumps({"inputs": [tensor]})))
        return oc.predict_request(request)[0]

    expected = np.arange(1, 7, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(images([1, 2, 3, 4, 5, 6], [2, 3]), expected)
    np.testing.assert_array_equal(images([[1, 2, 3], [4, 5, 6]], [2, 3]), expected)
    # As Triton does, the values are read in row-major order whatever their nesting.
    np.testing.assert_array_equal(images([[1, 2], [3, 4], [5, 6]], [2, 3]), expected)
    np.testing.assert_array_equal(images([[[1, 2, 3, 4, 5, 6]]], [2, 3]), expected)


def test_float_json_data_takes_integers_and_keeps_float32_values() -> None:
    values = [0, 1, 0.1, 0.5, 3.4e38, -1e-45]
    tensor = {"name": "images", "datatype": "FP32", "shape": [6], "data": values}
    request, _ = decode(orjson.dumps({"inputs": [tensor]}))
    array = oc.predict_request(request)[0]
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, np.array(values, dtype=np.float32))


def test_extreme_integers_of_each_datatype_are_accepted() -> None:
    for datatype in ("UINT8", "INT32", "INT64"):
        limits = np.iinfo(oc.DATATYPES[datatype])
        data = [int(limits.min), 0, int(limits.max)]
        tensor = {"name": "x", "datatype": datatype, "shape": [3], "data": data}
        request, _ = decode(orjson.dumps({"inputs": [tensor]}))
        inputs = oc.decode_inputs(request, {"x": (datatype,)}, ("x",))
        assert inputs.arrays["x"].tolist() == data


DTYPES = st.sampled_from(sorted(oc.DATATYPES))


@st.composite
def tensors(draw: st.DrawFn) -> np.ndarray:
    dtype = oc.DATATYPES[draw(DTYPES)]
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4))
    elements = st.floats(
        allow_nan=False, allow_infinity=False, width=32 if dtype == np.float32 else 64
    )
    return draw(hnp.arrays(dtype, shape, elements=elements if dtype.kind == "f" else None))


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    arrays=st.lists(tensors(), min_size=1, max_size=3),
    binary=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_any_tensors_round_trip_from_the_triton_client(
    arrays: list[np.ndarray], binary: list[bool]
) -> None:
    names = [f"t{i}" for i in range(len(arrays))]
    inputs = [triton_input(n, a, b) for n, a, b in zip(names, arrays, binary, strict=False)]
    request, _ = decode(*triton_body(inputs))
    decoded = oc.decode_inputs(request, dict.fromkeys(names, tuple(oc.DATATYPES)), names)
    for name, array in zip(names, arrays, strict=True):
        assert decoded.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(decoded.arrays[name], array)


# -- answers ------------------------------------------------------------------

CLASS_NAMES = ("zero", "один", "二", "three", "four", "five", "six", "seven", "eight", "nine")


def predict_answer(batch: int = 4, request_id: str = "") -> tuple[Any, np.ndarray]:
    probabilities = RNG.random((batch, 10), dtype=np.float32)
    result = types.PredictOutput("mnist", 3, probabilities, CLASS_NAMES)
    request = service_pb2.ModelInferRequest(id=request_id)
    response = oc.predict_response(request, result, oc.PREDICT_OUTPUTS, raw=True)
    return response, probabilities


@pytest.mark.parametrize(
    "output_format",
    [
        hc.OutputFormat(),
        hc.OutputFormat(default_binary=True),
        hc.OutputFormat(binary={"labels": True}),
        hc.OutputFormat(default_binary=True, binary={"probabilities": False}),
    ],
)
def test_answers_parse_with_the_triton_client(output_format: hc.OutputFormat) -> None:
    response, probabilities = predict_answer()
    body, header_length = hc.infer_response(response, output_format)
    binary = [output_format.is_binary(name) for name in oc.PREDICT_OUTPUTS]
    assert (header_length is None) is not any(binary)
    result = InferenceServerClient.parse_response_body(body, header_length=header_length)
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, probabilities)
    digits = result.as_numpy("digits")
    assert digits.dtype == np.int32
    np.testing.assert_array_equal(digits, probabilities.argmax(axis=1))
    labels = result.as_numpy("labels")
    # Binary BYTES come back as bytes, JSON ones as strings.
    texts = [v.decode() if isinstance(v, bytes) else v for v in labels.tolist()]
    assert texts == [CLASS_NAMES[d] for d in probabilities.argmax(axis=1)]
    assert result.get_response()["model_version"] == "3"


def test_json_answer_document() -> None:
    response, probabilities = predict_answer(batch=1, request_id="r1")
    body, header_length = hc.infer_response(response, hc.OutputFormat())
    assert header_length is None
    document = orjson.loads(body)
    assert list(document) == ["model_name", "model_version", "id", "outputs"]
    assert (document["model_name"], document["model_version"], document["id"]) == (
        "mnist",
        "3",
        "r1",
    )
    first, second, third = document["outputs"]
    assert {k: first[k] for k in ("name", "datatype", "shape")} == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": [1, 10],
    }
    # float32 values in their shortest form read back exactly.
    np.testing.assert_array_equal(np.array(first["data"], dtype=np.float32), probabilities[0])
    assert second == {
        "name": "digits",
        "datatype": "INT32",
        "shape": [1],
        "data": [int(probabilities.argmax())],
    }
    assert third == {
        "name": "labels",
        "datatype": "BYTES",
        "shape": [1],
        "data": [CLASS_NAMES[int(probabilities.argmax())]],
    }


def test_binary_answer_layout() -> None:
    response, _ = predict_answer(batch=2)
    response.parameters["note"].string_param = "n"
    body, header_length = hc.infer_response(
        response, hc.OutputFormat(binary={"probabilities": True, "labels": True})
    )
    assert header_length is not None
    document = orjson.loads(body[:header_length])
    assert "id" not in document
    assert document["parameters"] == {"note": "n"}
    probabilities, digits, labels = document["outputs"]
    assert probabilities["parameters"] == {"binary_data_size": 2 * 10 * 4}
    assert "data" not in probabilities
    assert "parameters" not in digits
    assert labels["parameters"]["binary_data_size"] == len(response.raw_output_contents[2])
    assert body[header_length:] == response.raw_output_contents[0] + response.raw_output_contents[2]


@pytest.mark.parametrize("binary", [True, False])
def test_conv2d_answer_round_trips(binary: bool) -> None:
    output = RNG.random((1, 3, 3, 2))
    response = oc.convolve_response(
        service_pb2.ModelInferRequest(), types.ConvolveOutput(output), raw=True
    )
    body, header_length = hc.infer_response(response, hc.OutputFormat(default_binary=binary))
    result = InferenceServerClient.parse_response_body(body, header_length=header_length)
    got = result.as_numpy("output")
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, output)


def test_an_answer_without_raw_contents_is_an_internal_error() -> None:
    result = types.PredictOutput("mnist", 1, np.ones((1, 10), np.float32))
    response = oc.predict_response(service_pb2.ModelInferRequest(), result, ["digits"], raw=False)
    with pytest.raises(errors.Internal):
        hc.infer_response(response, hc.OutputFormat())


# -- metadata and the repository index -----------------------------------------


def test_server_metadata_names_the_binary_extension() -> None:
    response = service_pb2.ServerMetadataResponse(name="convserve", version="1.4.0")
    assert hc.server_metadata_json(response) == {
        "name": "convserve",
        "version": "1.4.0",
        "extensions": ["binary_tensor_data"],
    }


def test_model_metadata_json() -> None:
    meta = types.ModelMetadata(
        model_name="mnist",
        loaded_versions=(1, 2),
        serving_version=2,
        inputs=(types.TensorSpecInfo("images", ("uint8", "float32"), (-1, 28, 28, 1)),),
        outputs=(types.TensorSpecInfo("probabilities", ("float32",), (-1, 10)),),
        layers=(),
    )
    assert hc.model_metadata_json(oc.model_metadata_response(meta, None)) == {
        "name": "mnist",
        "versions": ["1", "2"],
        "platform": "tensorflow_savedmodel",
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28, 1]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "digits", "datatype": "INT32", "shape": [-1]},
            {"name": "labels", "datatype": "BYTES", "shape": [-1]},
        ],
    }
    conv = hc.model_metadata_json(oc.conv_metadata_response())
    assert (conv["name"], conv["versions"], conv["platform"]) == ("conv2d", ["1"], "convserve")
    assert [t["name"] for t in conv["inputs"]] == ["input", "kernel", "bias"]


def test_repository_index_json() -> None:
    models = [
        types.ModelStatus("mnist", True, (types.VersionStatus(2, "AVAILABLE", serving=True),)),
        types.ModelStatus("broken", False, (types.VersionStatus(1, "END", error="no graph"),)),
    ]
    response = oc.repository_index_response(models, conv_ready=True, ready_only=False)
    assert hc.repository_index_json(response) == [
        {"name": "mnist", "version": "2", "state": "READY", "reason": ""},
        {"name": "broken", "version": "1", "state": "UNAVAILABLE", "reason": "version 1: no graph"},
        {"name": "conv2d", "version": "1", "state": "READY", "reason": ""},
    ]


@pytest.mark.parametrize(
    ("document", "ready"), [({}, False), ({"ready": False}, False), ({"ready": True}, True)]
)
def test_index_request(document: Any, ready: bool) -> None:
    assert hc.index_request(document) is ready


@pytest.mark.parametrize(
    ("document", "field", "problem"),
    [
        ({"ready": 1}, "ready", "true or false expected, got a number (1)"),
        ({"ready": None}, "ready", "true or false expected, got null"),
        ([True], "body", "a JSON object expected, got an array"),
    ],
)
def test_bad_index_requests(document: Any, field: str, problem: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        hc.index_request(document)
    invalid(exc, field, problem)


# -- refused requests ------------------------------------------------------------


def images_input(**members: Any) -> dict[str, Any]:
    return {"name": "images", "datatype": "UINT8", "shape": [2], **members}


def body_of(*inputs: dict[str, Any], **members: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **members})


BAD_JSON_DATA = [
    ("UINT8", [1, True], "UINT8 values (integers in [0, 255]) expected, got true or false"),
    (
        "INT32",
        [False, 2],
        "INT32 values (integers in [-2147483648, 2147483647]) expected, got true",
    ),
    ("FP32", [0.5, True], "FP32 values (numbers) expected, got true or false"),
    ("UINT8", [1, 2.5], "expected, got a number with a fraction or an exponent"),
    ("INT64", [1.0, 2], "expected, got a number with a fraction or an exponent"),
    ("FP64", ["0.5", 1], "FP64 values (numbers) expected, got a string"),
    ("FP32", [None, 1], "FP32 values (numbers) expected, got null"),
    ("UINT8", [{}, "a"], "expected, got a string, an object"),
    ("UINT8", [0, 256], "UINT8 values (integers in [0, 255]) expected, got 256"),
    ("UINT8", [-1, 0], "expected, got -1"),
    ("INT32", [2**31, 0], "expected, got 2147483648"),
    ("INT32", [-(2**31) - 1, 0], "expected, got -2147483649"),
    ("INT64", [2**63, 0], "expected, got one beyond int64"),
    ("FP32", [1e39, 0], "FP32 values (numbers) expected within ±3.4028235e+38"),
    ("UINT8", [[1, 2], [3]], "its nested arrays of equal lengths; got ragged ones"),
    ("UINT8", [[1, 2], 3], "got ragged ones"),
    ("FP32", [[[1.0]], [2.0]], "got ragged ones"),
    ("UINT8", 5, "a JSON array of UINT8 values expected, got a number (5)"),
    ("UINT8", [1, 2, 3], "2 values expected for shape [2], got 3"),
    ("UINT8", [[1], [2], [3]], "2 values expected for shape [2], got 3"),
]


@pytest.mark.parametrize(("datatype", "data", "problem"), BAD_JSON_DATA)
def test_bad_json_data_names_the_input(datatype: str, data: Any, problem: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        decode(body_of(images_input(datatype=datatype, data=data)))
    invalid(exc, "inputs[images].data", problem)


def test_deeply_nested_data_is_refused_as_ragged() -> None:
    data: Any = 1
    for _ in range(100):
        data = [data]
    with pytest.raises(errors.InvalidArgument) as exc:
        decode(body_of(images_input(shape=[1], data=data)))
    invalid(exc, "inputs[images].data", "got ragged ones")


TAIL = b"\x01\x02\x03\x04"


def with_tail(header: bytes) -> tuple[bytes, int]:
    """A body of `header`, then TAIL as binary data, and its header length."""
    return header + TAIL, len(header)


SIZE = "inputs[images].parameters.binary_data_size"
TOO_MANY = [{"name": f"x{i}", "datatype": "UINT8", "shape": [1], "data": [1]} for i in range(65)]

BAD_REQUESTS: list[tuple[str, bytes, int | None, str, str]] = [
    ("malformed", b'{"inputs": [', None, "body", "a JSON object expected: unexpected end of data"),
    ("not an object", b"[]", None, "body", "a JSON object expected, got an array"),
    (
        "binary without its header",
        body_of(images_input(parameters={"binary_data_size": 4})) + TAIL,
        None,
        "body",
        "a JSON object expected: unexpected content after document",
    ),
    (
        "header past the body",
        b"{}",
        3,
        HEADER,
        "a length within the body's 2 bytes expected, got 3",
    ),
    (
        "size past the body",
        *with_tail(body_of(images_input(parameters={"binary_data_size": 5}))),
        SIZE,
        "at most 4 bytes expected (those after the JSON object not taken by earlier inputs), got 5",
    ),
    (
        "size past the second input",
        *with_tail(
            body_of(
                {
                    "name": "kernel",
                    "datatype": "FP32",
                    "shape": [1],
                    "parameters": {"binary_data_size": 3},
                },
                images_input(parameters={"binary_data_size": 2}),
            )
        ),
        SIZE,
        "at most 1 bytes expected",
    ),
    (
        "size with no header",
        body_of(images_input(parameters={"binary_data_size": 4})),
        None,
        SIZE,
        "at most 0 bytes expected (those after the JSON object not taken by earlier inputs), "
        f"got 4; no {HEADER} header was sent",
    ),
    (
        "bytes left over",
        *with_tail(body_of(images_input(parameters={"binary_data_size": 2}))),
        HEADER,
        "the length of the JSON object expected: 4 bytes follow it, but the inputs' "
        "parameters.binary_data_size add up to 2",
    ),
    (
        "bytes and no binary input",
        *with_tail(body_of(images_input(data=[1, 2]))),
        HEADER,
        "4 bytes follow it, but the inputs' parameters.binary_data_size add up to 0",
    ),
    (
        "negative size",
        body_of(images_input(parameters={"binary_data_size": -1})),
        None,
        SIZE,
        "a non-negative integer (bytes) expected, got a number (-1)",
    ),
    (
        "boolean size",
        body_of(images_input(parameters={"binary_data_size": True})),
        None,
        SIZE,
        "a non-negative integer (bytes) expected, got true",
    ),
    (
        "data and size",
        body_of(images_input(data=[1, 2], parameters={"binary_data_size": 2})),
        None,
        "inputs[images]",
        "either data or parameters.binary_data_size expected, not both",
    ),
    ("no data", body_of(images_input()), None, "inputs[images].data", "got nothing"),
    (
        "float request parameter",
        body_of(images_input(data=[1, 2]), parameters={"strides": 1.5}),
        None,
        "parameters[strides]",
        "true, false, an integer that fits int64 or a string expected, got a number (1.5)",
    ),
    (
        "list request parameter",
        body_of(images_input(data=[1, 2]), parameters={"strides": [2, 2]}),
        None,
        "parameters[strides]",
        "got an array",
    ),
    (
        "object request parameter",
        body_of(images_input(data=[1, 2]), parameters={"mode": {}}),
        None,
        "parameters[mode]",
        "got an object",
    ),
    (
        "null request parameter",
        body_of(images_input(data=[1, 2]), parameters={"mode": None}),
        None,
        "parameters[mode]",
        "got null",
    ),
    (
        "int64 overflow parameter",
        body_of(images_input(data=[1, 2]), parameters={"timeout": 2**63}),
        None,
        "parameters[timeout]",
        "got a number (9223372036854775808)",
    ),
    (
        "odd parameter name",
        body_of(images_input(data=[1, 2]), parameters={"a b": 0.5}),
        None,
        "parameters['a b']",
        "got a number (0.5)",
    ),
    (
        "float input parameter",
        body_of(images_input(data=[1, 2], parameters={"scale": 0.5})),
        None,
        "inputs[images].parameters[scale]",
        "got a number (0.5)",
    ),
    (
        "float output parameter",
        body_of(images_input(data=[1, 2]), outputs=[{"name": "digits", "parameters": {"k": 0.5}}]),
        None,
        "outputs[digits].parameters[k]",
        "got a number (0.5)",
    ),
    (
        "binary_data_output not a boolean",
        body_of(images_input(data=[1, 2]), parameters={"binary_data_output": 1}),
        None,
        "parameters.binary_data_output",
        "true or false expected, got a number (1)",
    ),
    (
        "binary_data not a boolean",
        body_of(
            images_input(data=[1, 2]),
            outputs=[{"name": "digits", "parameters": {"binary_data": "yes"}}],
        ),
        None,
        "outputs[digits].parameters.binary_data",
        "true or false expected, got a string ('yes')",
    ),
    (
        "no inputs",
        b'{"outputs": []}',
        None,
        "inputs",
        "a JSON array of input tensors expected, got nothing",
    ),
    ("inputs an object", b'{"inputs": {}}', None, "inputs", "got an object"),
    (
        "too many inputs",
        body_of(*TOO_MANY),
        None,
        "inputs",
        "at most 64 input tensors expected, got 65",
    ),
    (
        "input not an object",
        b'{"inputs": [1]}',
        None,
        "inputs[0]",
        "a JSON object expected, got a number (1)",
    ),
    (
        "no input name",
        b'{"inputs": [{"datatype": "UINT8"}]}',
        None,
        "inputs[0].name",
        "a JSON string expected, got nothing",
    ),
    (
        "datatype null",
        body_of(images_input(datatype=None, data=[1, 2])),
        None,
        "inputs[images].datatype",
        "a JSON string expected, got null",
    ),
    (
        "shape not an array",
        body_of(images_input(shape="2", data=[1, 2])),
        None,
        "inputs[images].shape",
        "a JSON array of integers expected, got a string ('2')",
    ),
    (
        "float in the shape",
        body_of(images_input(shape=[2.0], data=[1, 2])),
        None,
        "inputs[images].shape",
        "a JSON array of integers expected, got a number (2.0) in it",
    ),
    (
        "boolean in the shape",
        body_of(images_input(shape=[True], data=[1, 2])),
        None,
        "inputs[images].shape",
        "got true in it",
    ),
    (
        "int64 overflow in the shape",
        body_of(images_input(shape=[2**63], data=[1, 2])),
        None,
        "inputs[images].shape",
        "got a number (9223372036854775808) in it",
    ),
    (
        "too many dimensions",
        body_of(images_input(shape=[1] * 9, data=[1])),
        None,
        "inputs[images].shape",
        "at most 8 dimensions expected, got 9",
    ),
    (
        "id not a string",
        body_of(images_input(data=[1, 2]), id=7),
        None,
        "id",
        "a JSON string expected, got a number (7)",
    ),
    (
        "too many parameters",
        body_of(images_input(data=[1, 2]), parameters={f"p{i}": i for i in range(65)}),
        None,
        "parameters",
        "at most 64 parameters expected, got 65",
    ),
    (
        "outputs not an array",
        body_of(images_input(data=[1, 2]), outputs="digits"),
        None,
        "outputs",
        "got a string ('digits')",
    ),
    (
        "output name not a string",
        body_of(images_input(data=[1, 2]), outputs=[{"name": 1}]),
        None,
        "outputs[0].name",
        "a JSON string expected, got a number (1)",
    ),
    (
        "odd input name",
        body_of({"name": "a b", "datatype": "UINT8", "shape": [1], "data": [1.5]}),
        None,
        "inputs['a b'].data",
        "got a number with a fraction or an exponent",
    ),
]


@pytest.mark.parametrize(
    ("body", "header_length", "field", "problem"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_name_the_field(
    body: bytes, header_length: int | None, field: str, problem: str
) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        decode(body, header_length)
    invalid(exc, field, problem)


# Refused by oip_convert, with the messages a gRPC client gets.
PASSED_ON: list[tuple[str, bytes, int | None, str, str]] = [
    (
        "unknown datatype with data",
        body_of(images_input(datatype="FP16", data=[1, 2])),
        None,
        "inputs[images].datatype",
        "UINT8 or FP32 expected, got 'FP16'",
    ),
    (
        "unknown datatype with binary data",
        *with_tail(body_of(images_input(datatype="BYTES", parameters={"binary_data_size": 4}))),
        "inputs[images].datatype",
        "got 'BYTES'",
    ),
    (
        "shared memory",
        body_of(
            images_input(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 2})
        ),
        None,
        "inputs[images].parameters",
        "no input parameters expected (shared memory is not supported), got "
        "'shared_memory_byte_size', 'shared_memory_region'",
    ),
    (
        "classification",
        body_of(
            images_input(data=[1, 2]),
            outputs=[{"name": "digits", "parameters": {"classification": 3}}],
        ),
        None,
        "outputs[digits].parameters",
        "got 'classification'",
    ),
    (
        "sequences",
        body_of(images_input(data=[1, 2]), parameters={"sequence_id": 4, "sequence_start": True}),
        None,
        "parameters",
        "known request parameters expected (none for this model), "
        "got 'sequence_id', 'sequence_start'",
    ),
    (
        "a zero dimension",
        body_of(images_input(shape=[0], data=[])),
        None,
        "inputs[images]",
        "every dimension must be positive, got shape [0]",
    ),
    (
        "a wrong binary size",
        *with_tail(body_of(images_input(shape=[3], parameters={"binary_data_size": 4}))),
        "inputs[images]",
        "content has 4 bytes, expected 3",
    ),
]


@pytest.mark.parametrize(
    ("body", "header_length", "field", "problem"),
    [case[1:] for case in PASSED_ON],
    ids=[case[0] for case in PASSED_ON],
)
def test_what_the_grpc_checks_refuse_is_refused_as_over_grpc(
    body: bytes, header_length: int | None, field: str, problem: str
) -> None:
    request, _ = decode(body, header_length)
    with pytest.raises((errors.InvalidArgument, TensorError)) as exc:
        oc.predict_request(request)
    invalid(exc, field, problem)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=12,
)
TENSOR_MEMBERS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["images", "", 3]),
        "datatype": st.sampled_from([*oc.DATATYPES, "BYTES", None]),
        "shape": st.lists(st.integers(-2, 4), max_size=3) | JSON_VALUES,
        "data": JSON_VALUES,
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_size", "x"]), JSON_VALUES, max_size=2
        )
        | JSON_VALUES,
    },
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    inputs=st.lists(TENSOR_MEMBERS, max_size=3) | JSON_VALUES,
    parameters=st.dictionaries(st.sampled_from(["binary_data_output", "x"]), JSON_VALUES)
    | JSON_VALUES,
    tail=st.binary(max_size=8),
)
def test_any_request_converts_or_names_a_field(inputs: Any, parameters: Any, tail: bytes) -> None:
    header = orjson.dumps({"inputs": inputs, "parameters": parameters})
    refused: errors.InvalidArgument | TensorError | None = None
    try:
        request, _ = decode(header + tail, len(header))
        oc.predict_request(request)
    except (errors.InvalidArgument, TensorError) as exc:
        refused = exc
    if refused is not None:
        assert refused.field
        assert refused.problem
