"""TensorFlow Serving converters, both directions.

TensorProtos are built and read back with TensorFlow's own
`make_tensor_proto` / `make_ndarray`, as TF Serving clients do.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
)

from convserve.server import errors, types
from convserve.server.protocols import tfserving_convert as tc
from convserve.v1.tensor_codec import TensorError
from tests.fake_runtime import FakeModel, FakeRuntime
from tests.interop.wire_bytes import varint

RNG = np.random.default_rng(1)
FLOATS = RNG.random((2, 28, 28, 1), dtype=np.float32)
UINT8S = RNG.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)


def predict_request(
    images: Any = FLOATS,
    *,
    name: str = "mnist",
    signature: str = "",
    version: int | None = None,
    label: str | None = None,
    outputs: tuple[str, ...] = (),
) -> Any:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    proto = tf.make_tensor_proto(images) if isinstance(images, np.ndarray) else images
    request.inputs["images"].CopyFrom(proto)
    request.output_filter.extend(outputs)
    return request


def invalid(exc: pytest.ExceptionInfo[BaseException], field: str) -> None:
    code, message = errors.status_of(exc.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(field), message


def typed_proto(array: np.ndarray) -> Any:
    proto = tf.make_tensor_proto(array)
    proto.ClearField("tensor_content")
    if array.dtype == np.uint8:
        proto.int_val.extend(array.ravel().tolist())
    else:
        proto.float_val.extend(array.ravel().tolist())
    return proto


@pytest.mark.parametrize(
    ("images", "signature"),
    [
        (FLOATS, ""),
        (FLOATS, "serving_default"),
        (UINT8S, "predict_uint8"),
        (typed_proto(FLOATS), "serving_default"),
        (typed_proto(UINT8S), "predict_uint8"),
    ],
)
def test_predict_request_decodes_content_and_typed_values(images: Any, signature: str) -> None:
    array, ref, sig, outputs = tc.predict_request(predict_request(images, signature=signature))
    expected = tf.make_ndarray(images) if not isinstance(images, np.ndarray) else images
    assert array.dtype == expected.dtype
    np.testing.assert_array_equal(array, expected)
    assert ref == types.ModelRef("mnist", None)
    assert sig == (signature or "serving_default")
    assert outputs == ["probabilities"]


@pytest.mark.parametrize(
    ("kwargs", "ref"),
    [
        ({"version": 2}, types.ModelRef("mnist", 2)),
        # Labels go to the runtime as they are: it knows each model's labels.
        ({"label": "stable"}, types.ModelRef("mnist", label="stable")),
        ({"label": "latest"}, types.ModelRef("mnist", label="latest")),
        ({"label": "canary"}, types.ModelRef("mnist", label="canary")),
        ({"label": "v2.1-rc_3"}, types.ModelRef("mnist", label="v2.1-rc_3")),
        ({"name": "", "label": "canary"}, types.ModelRef(None, label="canary")),
        ({"name": ""}, types.ModelRef(None, None)),
    ],
)
def test_model_spec_versions_and_labels(kwargs: dict[str, Any], ref: types.ModelRef) -> None:
    assert tc.predict_request(predict_request(**kwargs))[1] == ref


def test_the_version_and_the_label_are_one_oneof() -> None:
    # Setting one clears the other, as in TF Serving's ModelSpec: both cannot arrive.
    spec = model_pb2.ModelSpec(name="mnist")
    spec.version.value = 2
    spec.version_label = "canary"
    assert tc.model_ref(spec) == types.ModelRef("mnist", label="canary")
    spec.version.value = 3
    assert tc.model_ref(spec) == types.ModelRef("mnist", 3)


@pytest.mark.parametrize(
    ("label", "problem"),
    [
        ("", "empty; "),
        ("x y", "not a valid version label; "),
        ("-canary", "not a valid version label; "),
        ("canary/1", "not a valid version label; "),
        ("c" * 65, "65 characters is too long; "),
    ],
)
def test_labels_no_model_could_have_are_invalid(label: str, problem: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        tc.predict_request(predict_request(label=label))
    invalid(exc, "model_spec.version_label")
    assert problem in str(exc.value)


def _two_inputs() -> Any:
    request = predict_request()
    request.inputs["extra"].CopyFrom(tf.make_tensor_proto(FLOATS))
    return request


def _short_content() -> Any:
    proto = tf.make_tensor_proto(FLOATS)
    proto.tensor_content = proto.tensor_content[:-4]
    return predict_request(proto)


def _typed_count_mismatch() -> Any:
    proto = typed_proto(FLOATS)
    proto.float_val.append(0.0)
    return predict_request(proto)


def _uint8_over_255() -> Any:
    proto = typed_proto(UINT8S)
    proto.int_val[0] = 300
    return predict_request(proto, signature="predict_uint8")


def _unknown_rank() -> Any:
    proto = tf.make_tensor_proto(FLOATS)
    proto.tensor_shape.unknown_rank = True
    return predict_request(proto)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: predict_request(UINT8S), "inputs[images].dtype"),
        (lambda: predict_request(FLOATS, signature="predict_uint8"), "inputs[images].dtype"),
        (lambda: predict_request(FLOATS.astype(np.float64)), "inputs[images].dtype"),
        (lambda: predict_request(signature="feature_maps"), "model_spec.signature_name"),
        (lambda: predict_request(label="not a label"), "model_spec.version_label"),
        (lambda: predict_request(version=0), "model_spec.version"),
        (lambda: predict_request(version=-1), "model_spec.version"),
        (lambda: predict_request(outputs=("logits",)), "output_filter"),
        (lambda: predict_request(np.zeros((0, 28, 28, 1), np.float32)), "inputs[images]"),
        (_two_inputs, "inputs"),
        (_short_content, "inputs[images]"),
        (_typed_count_mismatch, "inputs[images].float_val"),
        (_uint8_over_255, "inputs[images].int_val"),
        (_unknown_rank, "inputs[images].tensor_shape"),
    ],
)
def test_bad_predict_requests_name_the_field(make: Any, field: str) -> None:
    with pytest.raises((errors.ServeError, TensorError)) as exc:
        tc.predict_request(make())
    invalid(exc, field)


def test_missing_input_is_invalid() -> None:
    request = predict_request()
    del request.inputs["images"]
    with pytest.raises(errors.InvalidArgument) as exc:
        tc.predict_request(request)
    invalid(exc, "inputs")


PROBS = RNG.random((2, 10)).astype(np.float32)


def test_predict_response_reads_back_with_tensorflow() -> None:
    result = types.PredictOutput("mnist", 5, PROBS)
    response = tc.predict_response(result, "predict_uint8", ["probabilities"])
    assert list(response.outputs) == ["probabilities"]
    proto = response.outputs["probabilities"]
    assert proto.dtype == types_pb2.DT_FLOAT
    assert len(proto.tensor_content) == PROBS.nbytes
    np.testing.assert_array_equal(tf.make_ndarray(proto), PROBS)
    spec = response.model_spec
    assert (spec.name, spec.version.value, spec.signature_name) == ("mnist", 5, "predict_uint8")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.uint8])
def test_proto_from_array_round_trip(dtype: type) -> None:
    array: np.ndarray = (RNG.random((2, 3)) * 100).astype(dtype)
    proto = tc.proto_from_array(array)
    np.testing.assert_array_equal(tf.make_ndarray(proto), array)
    np.testing.assert_array_equal(tc.array_from_proto(proto, "x"), array)


META = types.ModelMetadata(
    model_name="mnist",
    loaded_versions=(1, 3),
    serving_version=3,
    inputs=(types.TensorSpecInfo("images", ("uint8", "float32"), (-1, 28, 28, 1)),),
    outputs=(types.TensorSpecInfo("probabilities", ("float32",), (-1, 10)),),
    layers=(),
)


def test_model_metadata_packs_the_signature_def_map() -> None:
    response = tc.model_metadata_response(META, None)
    assert (response.model_spec.name, response.model_spec.version.value) == ("mnist", 3)
    assert list(response.metadata) == ["signature_def"]
    sigs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sigs)
    assert set(sigs.signature_def) == {"serving_default", "predict_uint8"}
    default = sigs.signature_def["serving_default"]
    assert default.method_name == "tensorflow/serving/predict"
    assert default.inputs["images"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in default.inputs["images"].tensor_shape.dim] == [-1, 28, 28, 1]
    assert sigs.signature_def["predict_uint8"].inputs["images"].dtype == types_pb2.DT_UINT8
    assert [d.size for d in default.outputs["probabilities"].tensor_shape.dim] == [-1, 10]
    assert tc.model_metadata_response(META, 1).model_spec.version.value == 1


def test_signatures_take_the_model_shapes() -> None:
    model = FakeModel("rgb", versions=(1,), shape=(8, 8, 3), class_names=("a", "b", "c", "d"))
    small = FakeRuntime([model], default_model="rgb").metadata(types.ModelRef("rgb"))
    sigs = tc.signature_def_map(small)
    for name in ("serving_default", "predict_uint8"):
        signature = sigs.signature_def[name]
        assert [d.size for d in signature.inputs["images"].tensor_shape.dim] == [-1, 8, 8, 3]
        assert [d.size for d in signature.outputs["probabilities"].tensor_shape.dim] == [-1, 4]


@pytest.mark.parametrize(("fields", "ok"), [([], False), (["signature_def"], True), (["x"], False)])
def test_metadata_fields(fields: list[str], ok: bool) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=fields)
    if ok:
        tc.check_metadata_fields(request)
    else:
        with pytest.raises(errors.InvalidArgument) as exc:
            tc.check_metadata_fields(request)
        invalid(exc, "metadata_field")


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


def _states(response: Any) -> list[tuple[int, str, int, str]]:
    state = get_model_status_pb2.ModelVersionStatus.State.Name
    return [
        (s.version, state(s.state), s.status.error_code, s.status.error_message)
        for s in response.model_version_status
    ]


def test_model_status_lists_every_version_with_its_state() -> None:
    assert _states(tc.model_status_response(STATUS, None)) == [
        (1, "END", 2, "version 1: no saved_model.pb"),  # 2: error code UNKNOWN
        (2, "AVAILABLE", 0, ""),
        (3, "AVAILABLE", 0, ""),
        (4, "LOADING", 0, ""),
        (5, "UNLOADING", 0, ""),
    ]


def test_model_status_of_one_version() -> None:
    assert _states(tc.model_status_response(STATUS, 4)) == [(4, "LOADING", 0, "")]
    with pytest.raises(errors.NotFound) as exc:
        tc.model_status_response(STATUS, 9)
    code, message = errors.status_of(exc.value)
    assert code == grpc.StatusCode.NOT_FOUND
    assert message == "model_spec.version: model 'mnist' has no version 9 (versions: 1, 2, 3, 4, 5)"


def test_model_ref_from_a_bare_spec() -> None:
    assert tc.model_ref(model_pb2.ModelSpec()) == types.ModelRef(None, None)


# -- typed values on the wire --------------------------------------------------


def _unpacked(name: str, dtype: np.dtype, values: np.ndarray) -> bytes:
    """TensorProto bytes of one field with one tag per value, as a client may send them."""
    number = tc.tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name[name].number
    out = bytearray()
    for value in values.ravel():
        if dtype.kind == "f":
            out += varint(number << 3 | (5 if dtype.itemsize == 4 else 1))
            out += np.asarray(value, dtype.newbyteorder("<")).tobytes()
        else:
            out += varint(number << 3) + varint(int(value))
    return bytes(out)


@pytest.mark.parametrize(
    "array",
    [
        np.array([[0.0, -1.5, 3.4e38], [1e-38, 0.5, -0.0]], np.float32),
        np.array([[0.0, -1.5, 1e300], [np.pi, 0.5, -0.0]], np.float64),
        np.array([[0, -1, 2**31 - 1], [-(2**31), 7, 300]], np.int32),
        np.array([[0, -1, 2**63 - 1], [-(2**63), 7, 2**40]], np.int64),
        np.array([[0, 127, 128], [200, 254, 255]], np.uint8),
    ],
)
@pytest.mark.parametrize("packed", [True, False])
def test_typed_values_every_dtype_and_encoding(array: np.ndarray, packed: bool) -> None:
    proto = tf.make_tensor_proto(array)
    proto.ClearField("tensor_content")
    name = tc.VALUES_FIELD[proto.dtype]
    if packed:
        getattr(proto, name).extend(array.ravel().tolist())
    else:
        proto.MergeFromString(_unpacked(name, array.dtype, array))
    decoded = tc.array_from_proto(proto, "x")
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)
    np.testing.assert_array_equal(decoded, tf.make_ndarray(proto))


@pytest.mark.parametrize("bad", [256, 16384, -1, -(2**31), 2**31 - 1])
def test_uint8_typed_values_out_of_range(bad: int) -> None:
    proto = typed_proto(UINT8S)
    proto.int_val[len(proto.int_val) // 2] = bad
    with pytest.raises(errors.InvalidArgument) as exc:
        tc.predict_request(predict_request(proto, signature="predict_uint8"))
    invalid(exc, "inputs[images].int_val")
    assert str(exc.value).endswith("DT_UINT8 values in [0, 255] expected")


def _with_dims(dims: list[int], typed: bool) -> Any:
    proto = typed_proto(FLOATS[:1]) if typed else tf.make_tensor_proto(FLOATS[:1])
    del proto.tensor_shape.dim[:]
    for d in dims:
        proto.tensor_shape.dim.add(size=d)
    return predict_request(proto)


@pytest.mark.parametrize("typed", [True, False])
@pytest.mark.parametrize(
    ("dims", "field"),
    [
        ([-1, 28, 28, 1], "inputs[images]"),
        ([2**62, 2**62, 28, 1], "inputs[images]"),  # product far beyond int64
        ([2**40, 28, 28, 1], "inputs[images]"),
        ([1, 28, 28, 1, 1, 1, 1, 1, 1], "inputs[images].tensor_shape"),
    ],
)
def test_shapes_are_checked_before_anything_is_allocated(
    dims: list[int], field: str, typed: bool
) -> None:
    with pytest.raises((errors.ServeError, TensorError)) as exc:
        tc.predict_request(_with_dims(dims, typed))
    invalid(exc, field)


def test_client_strings_are_shortened_in_messages() -> None:
    long = "x" * 9000
    extra = predict_request()
    for i in range(20):
        extra.inputs[f"{i}{long}"].CopyFrom(tf.make_tensor_proto(FLOATS))
    for request in [
        predict_request(signature=long),
        predict_request(label=long),
        predict_request(outputs=(long,)),
        extra,
    ]:
        with pytest.raises(errors.InvalidArgument) as exc:
            tc.predict_request(request)
        assert len(str(exc.value)) < 700, str(exc.value)
        assert "characters)" in str(exc.value)
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[long] * 9)
    with pytest.raises(errors.InvalidArgument) as exc:
        tc.check_metadata_fields(metadata)
    assert len(str(exc.value)) < 700


def test_request_bytes_estimates_without_serializing() -> None:
    assert tc.request_bytes(predict_request()) >= FLOATS.nbytes
    assert tc.request_bytes(predict_request(typed_proto(FLOATS))) >= FLOATS.nbytes
    assert tc.request_bytes(predict_pb2.PredictRequest()) == 0
