"""TensorFlow Serving's REST API (JSON): the converters, both directions.

Requests and answers have the shapes of TF Serving's REST API documentation;
status and metadata are checked against the JSON form (`json_format`) of the
gRPC answers `tfserving_convert` builds, and read back into those messages.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import orjson
import pytest
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
)

from convserve.server import errors, types
from convserve.server.json_worker import ARRAY_MIN_NUMBERS, RefusedArray, parse
from convserve.server.protocols import tfserving_convert as tc
from convserve.server.protocols import tfserving_rest_convert as rc
from tests.fake_runtime import FakeModel, FakeRuntime

RNG = np.random.default_rng(26)
FLOATS = RNG.random((2, 28, 28, 1), dtype=np.float32)
UINT8S = RNG.integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8)


def invalid(exc: pytest.ExceptionInfo[BaseException], field: str, problem: str = "") -> None:
    code, message = errors.status_of(exc.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"{field}: "), message
    assert problem in message, message


# -- URLs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "label", "ref"),
    [
        ("", "", types.ModelRef("mnist")),
        ("3", "", types.ModelRef("mnist", 3)),
        (str(2**63 - 1), "", types.ModelRef("mnist", 2**63 - 1)),
        ("", "canary", types.ModelRef("mnist", label="canary")),
        ("", "latest", types.ModelRef("mnist", label="latest")),
    ],
)
def test_model_ref_of_the_url(version: str, label: str, ref: types.ModelRef) -> None:
    assert rc.model_ref("mnist", version, label) == ref


@pytest.mark.parametrize("label", ["x y", "-a", "a" * 65])
def test_labels_no_model_could_have_are_refused_as_over_grpc(label: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        rc.model_ref("mnist", "", label)
    invalid(exc, "label", "")


def test_a_ragged_row_input_read_by_the_worker_is_refused_with_its_reason() -> None:
    parsed = parse(orjson.dumps({"instances": [[0.5] * ARRAY_MIN_NUMBERS, [0.5]]}))
    assert isinstance(parsed["instances"], RefusedArray)
    with pytest.raises(errors.InvalidArgument) as exc:
        rc.predict_request(parsed)
    invalid(exc, "instances", "rows of equal length")


@pytest.mark.parametrize("version", ["0", "-1", "x", "1.5", str(2**63), "9" * 40])
def test_versions_in_the_url_are_positive_int64s(version: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        rc.model_ref("mnist", version)
    invalid(exc, "version", "a positive version number")


# -- signatures ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "signature"),
    [
        ({}, "serving_default"),
        ({"signature_name": ""}, "serving_default"),
        ({"signature_name": "serving_default"}, "serving_default"),
        ({"signature_name": "predict_uint8"}, "predict_uint8"),
    ],
)
def test_signature_of(body: dict[str, Any], signature: str) -> None:
    assert rc.signature_of(body) == signature


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (None, "a string expected, got null"),
        (3, "a string expected, got a number"),
        (["predict_uint8"], "a string expected, got an array"),
        ("classify", "one of serving_default, predict_uint8 expected, got 'classify'"),
        ("s" * 500, "(500 characters)"),
    ],
)
def test_unknown_signatures_are_refused(name: Any, problem: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        rc.signature_of({"signature_name": name})
    invalid(exc, "signature_name", problem)
    assert len(str(exc.value)) < 200


# -- predict requests ------------------------------------------------------------


def grpc_images(images: np.ndarray, signature: str) -> np.ndarray:
    """What the gRPC API reads from the same images sent by a TF Serving client."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.signature_name = signature
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    return tc.predict_request(request)[0]


@pytest.mark.parametrize(
    ("images", "signature"),
    [
        (FLOATS, None),
        (FLOATS, "serving_default"),
        (UINT8S, "predict_uint8"),
        (FLOATS[..., 0], None),  # [N,28,28]
        (UINT8S.reshape(3, 784), "predict_uint8"),  # [N,784]
    ],
)
@pytest.mark.parametrize("form", ["row", "named rows", "columnar", "named columnar"])
def test_predict_request_forms_read_what_grpc_reads(
    images: np.ndarray, signature: str | None, form: str
) -> None:
    body: dict[str, Any] = {} if signature is None else {"signature_name": signature}
    values = images.tolist()
    if form == "row":
        body["instances"] = values
    elif form == "named rows":
        body["instances"] = [{"images": image} for image in values]
    elif form == "columnar":
        body["inputs"] = values
    else:
        body["inputs"] = {"images": values}
    array, got_signature, field, row = rc.predict_request(body)
    assert got_signature == (signature or "serving_default")
    assert (field, row) == (
        ("instances", True) if form in ("row", "named rows") else ("inputs", False)
    )
    expected = grpc_images(images, signature or "")
    assert array.dtype == expected.dtype == images.dtype
    assert array.shape == images.shape
    np.testing.assert_array_equal(array, expected)


@pytest.mark.parametrize("field", ["instances", "inputs"])
def test_arrays_read_by_the_json_worker_give_the_same_images(field: str) -> None:
    body = orjson.dumps({"signature_name": "predict_uint8", field: UINT8S.tolist()})
    parsed = parse(body)
    assert isinstance(parsed[field], np.ndarray)  # the worker's form
    from_worker = rc.predict_request(parsed)
    from_lists = rc.predict_request(orjson.loads(body))
    assert from_worker[1:] == from_lists[1:]
    assert from_worker[0].dtype == from_lists[0].dtype == np.uint8
    np.testing.assert_array_equal(from_worker[0], from_lists[0])
    np.testing.assert_array_equal(from_worker[0], UINT8S)


def test_a_ragged_columnar_input_read_by_the_worker_is_refused_with_its_reason() -> None:
    parsed = parse(orjson.dumps({"inputs": [[0.5] * ARRAY_MIN_NUMBERS, [0.5]]}))
    assert isinstance(parsed["inputs"], RefusedArray)
    with pytest.raises(errors.InvalidArgument) as exc:
        rc.predict_request(parsed)
    invalid(exc, "inputs", "rows of equal length")


@pytest.mark.parametrize(
    ("body", "field", "problem"),
    [
        ({"instances": [[0.5]], "model": "x"}, "body", "got 'model'"),
        (
            {"instances": [[0.5]], "b": 1, "a": 2},
            "body",
            "only signature_name, instances, inputs expected, got 'a', 'b'",
        ),
        ({}, "body", 'exactly one of "instances" (row format) or "inputs" (columnar)'),
        ({"instances": [[0.5]], "inputs": [[0.5]]}, "body", 'exactly one of "instances"'),
        ({"signature_name": "nope", "instances": [[0.5]]}, "signature_name", "got 'nope'"),
        ({"instances": []}, "instances", "a non-empty array expected, got an empty array"),
        ({"instances": "abc"}, "instances", "a non-empty array expected, got a string"),
        ({"instances": 0.5}, "instances", "a non-empty array expected, got a number"),
        ({"instances": None}, "instances", "a non-empty array expected, got null"),
        ({"instances": {"images": [0.5]}}, "instances", "got an object"),
        (
            {"instances": [{"images": [0.5]}, [0.5]]},
            "instances[1]",
            'an object {"images": ...} expected (as the first instance), got an array',
        ),
        (
            {"instances": [{"images": [0.5], "mask": [1]}]},
            "instances[0]",
            "exactly the input 'images' expected, got 'images', 'mask'",
        ),
        ({"instances": [{}]}, "instances[0]", "exactly the input 'images' expected, got none"),
        # Base64 values are for string inputs; `images` takes numbers.
        ({"instances": [{"b64": "AAAA"}]}, "instances[0]", "got 'b64'"),
        (
            {"inputs": {"images": [0.5], "mask": [1]}},
            "inputs",
            "exactly the input 'images' expected, got 'images', 'mask'",
        ),
        ({"inputs": {}}, "inputs", "exactly the input 'images' expected, got none"),
        ({"instances": [[0.5, 0.5], [0.5]]}, "instances", "rows of equal length"),
        ({"inputs": [[0.5, 0.5], [0.5]]}, "inputs", "rows of equal length"),
        ({"instances": [["0.5"]]}, "instances", "numbers expected, got strings"),
        ({"instances": [[True]]}, "instances", "numbers expected, got booleans"),
        ({"inputs": [[0.5, None]]}, "inputs", "numbers expected"),
        (
            {"signature_name": "predict_uint8", "instances": [[0.5]]},
            "instances",
            "integers in [0, 255] expected for signature predict_uint8, got numbers with fractions",
        ),
        (
            {"signature_name": "predict_uint8", "inputs": [[0, 256]]},
            "inputs",
            "integers in [0, 255] expected for signature predict_uint8, got values in [0, 256]",
        ),
        (
            {"signature_name": "predict_uint8", "instances": [{"images": [-1]}]},
            "instances",
            "got values in [-1, -1]",
        ),
    ],
)
def test_bad_predict_requests_name_the_field(
    body: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        rc.predict_request(body)
    invalid(exc, field, problem)


def test_client_chosen_names_are_shortened_in_messages() -> None:
    long = "x" * 5000
    for body in (
        {"instances": [[0.5]], long: 1},
        {"instances": [{long: [0.5]}]},
        {"signature_name": long, "instances": [[0.5]]},
    ):
        with pytest.raises(errors.InvalidArgument) as exc:
            rc.predict_request(body)
        assert "(5000 characters)" in str(exc.value)
        assert len(str(exc.value)) < 300


# -- predict answers ---------------------------------------------------------------


def _result(probabilities: np.ndarray) -> types.PredictOutput:
    return types.PredictOutput("mnist", 3, probabilities)


@pytest.mark.parametrize(("row", "key"), [(True, "predictions"), (False, "outputs")])
def test_predict_response_in_the_format_of_the_request(row: bool, key: str) -> None:
    probabilities = RNG.random((3, 10), dtype=np.float32)
    answer = orjson.loads(rc.predict_response(_result(probabilities), row))
    assert list(answer) == [key]
    assert len(answer[key]) == 3
    assert all(len(p) == 10 for p in answer[key])
    # float32 values are written so that they read back exactly.
    np.testing.assert_array_equal(np.asarray(answer[key], dtype=np.float32), probabilities)


def test_predict_response_values_equal_the_grpc_answer() -> None:
    probabilities = np.eye(10, dtype=np.float32)[[3, 1, 4]]
    result = _result(probabilities)
    grpc_answer = tc.predict_response(result, "serving_default", ["probabilities"])
    expected = tf.make_ndarray(grpc_answer.outputs["probabilities"])
    answer = orjson.loads(rc.predict_response(result, True))
    np.testing.assert_array_equal(np.asarray(answer["predictions"], dtype=np.float32), expected)
    assert answer == {"predictions": probabilities.tolist()}


# -- model status ----------------------------------------------------------------

STATUS = types.ModelStatus(
    "mnist",
    True,
    (
        types.VersionStatus(1, "END", error="version 1: no saved_model.pb"),
        types.VersionStatus(2, "AVAILABLE"),
        types.VersionStatus(3, "AVAILABLE", serving=True),
        types.VersionStatus(4, "LOADING"),
        types.VersionStatus(5, "UNLOADING"),
    ),
)


def _version(version: str, state: str, code: str = "OK", message: str = "") -> dict[str, Any]:
    return {
        "version": version,
        "state": state,
        "status": {"error_code": code, "error_message": message},
    }


def test_status_json_has_tf_serving_s_documented_shape() -> None:
    # int64 versions as strings, enums by name, every field present (as TF Serving writes).
    assert rc.status_json(STATUS, None) == {
        "model_version_status": [
            _version("1", "END", "UNKNOWN", "version 1: no saved_model.pb"),
            _version("2", "AVAILABLE"),
            _version("3", "AVAILABLE"),
            _version("4", "LOADING"),
            _version("5", "UNLOADING"),
        ]
    }
    assert rc.status_json(STATUS, 4) == {"model_version_status": [_version("4", "LOADING")]}


@pytest.mark.parametrize("version", [None, 1, 3, 5])
def test_status_json_is_the_grpc_answer_both_ways(version: int | None) -> None:
    response = tc.model_status_response(STATUS, version)
    as_json = rc.status_json(STATUS, version)
    assert as_json == json_format.MessageToDict(
        response,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    # What a TF Serving client reads back from it is the gRPC answer.
    parsed = json_format.ParseDict(as_json, get_model_status_pb2.GetModelStatusResponse())
    assert parsed == response


def test_status_json_of_a_version_the_model_does_not_have() -> None:
    with pytest.raises(errors.NotFound) as exc:
        rc.status_json(STATUS, 9)
    code, message = errors.status_of(exc.value)
    assert code == grpc.StatusCode.NOT_FOUND
    assert "has no version 9 (versions: 1, 2, 3, 4, 5)" in message


# -- model metadata ------------------------------------------------------------------

META = types.ModelMetadata(
    model_name="mnist",
    loaded_versions=(1, 3),
    serving_version=3,
    inputs=(types.TensorSpecInfo("images", ("uint8", "float32"), (-1, 28, 28, 1)),),
    outputs=(types.TensorSpecInfo("probabilities", ("float32",), (-1, 10)),),
    layers=(),
)


def _dims(tensor_info: dict[str, Any]) -> list[int]:
    return [int(d["size"]) for d in tensor_info["tensor_shape"]["dim"]]


def test_metadata_json_has_tf_serving_s_documented_shape() -> None:
    meta = rc.metadata_json(META, 3)
    assert list(meta) == ["model_spec", "metadata"]
    assert meta["model_spec"] == {"name": "mnist", "signature_name": "", "version": "3"}
    # TF Serving writes the signature_def map under metadata.signature_def.signature_def.
    assert list(meta["metadata"]) == ["signature_def"]
    signatures = meta["metadata"]["signature_def"]["signature_def"]
    assert set(signatures) == {"serving_default", "predict_uint8"}
    for name, dtype in (("serving_default", "DT_FLOAT"), ("predict_uint8", "DT_UINT8")):
        signature = signatures[name]
        assert signature["method_name"] == "tensorflow/serving/predict"
        assert list(signature["inputs"]) == ["images"]
        assert signature["inputs"]["images"]["dtype"] == dtype
        assert signature["inputs"]["images"]["name"] == f"{name}_images:0"
        assert _dims(signature["inputs"]["images"]) == [-1, 28, 28, 1]
        assert list(signature["outputs"]) == ["probabilities"]
        assert signature["outputs"]["probabilities"]["dtype"] == "DT_FLOAT"
        assert _dims(signature["outputs"]["probabilities"]) == [-1, 10]
    # int64 dimension sizes are strings, as in every proto3 JSON.
    assert (
        signatures["serving_default"]["inputs"]["images"]["tensor_shape"]["dim"][0]["size"] == "-1"
    )


@pytest.mark.parametrize("version", [1, 3])
def test_metadata_json_is_the_grpc_answer_both_ways(version: int) -> None:
    response = tc.model_metadata_response(META, version)
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_defs)
    meta = rc.metadata_json(META, version)

    def as_json(message: Any) -> dict[str, Any]:
        return json_format.MessageToDict(
            message,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )

    assert meta == {
        "model_spec": as_json(response.model_spec),
        "metadata": {"signature_def": as_json(signature_defs)},
    }
    spec = json_format.ParseDict(meta["model_spec"], model_pb2.ModelSpec())
    assert spec == response.model_spec
    assert spec.version.value == version
    parsed = json_format.ParseDict(
        meta["metadata"]["signature_def"], get_model_metadata_pb2.SignatureDefMap()
    )
    assert parsed == signature_defs


def test_metadata_json_takes_the_model_s_shapes() -> None:
    model = FakeModel("rgb", versions=(2,), shape=(8, 8, 3), class_names=("a", "b", "c", "d"))
    meta = FakeRuntime([model], default_model="rgb").metadata(types.ModelRef("rgb"))
    answer = rc.metadata_json(meta, 2)
    assert answer["model_spec"]["name"] == "rgb"
    signatures = answer["metadata"]["signature_def"]["signature_def"]
    for signature in signatures.values():
        assert _dims(signature["inputs"]["images"]) == [-1, 8, 8, 3]
        assert _dims(signature["outputs"]["probabilities"]) == [-1, 4]
