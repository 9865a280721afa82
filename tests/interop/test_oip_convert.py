"""Open Inference Protocol converters, both directions.

Responses are read back with tritonclient's own InferResult, so the bytes we
write are the bytes a stock client decodes.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import InferResult, service_pb2

from convserve.server import errors, types
from convserve.server.protocols import oip_convert as oc
from convserve.server.protocols import wire
from convserve.v1.tensor_codec import TensorError
from tests.interop.wire_bytes import varint


def infer_request(
    model: str = "mnist",
    inputs: list[tuple[str, np.ndarray, str]] | None = None,
    *,
    raw: bool = True,
    outputs: tuple[str, ...] = (),
    version: str = "",
    request_id: str = "",
    parameters: dict[str, Any] | None = None,
) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array, datatype in inputs or []:
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if raw:
            request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
        else:
            field = oc.CONTENTS_FIELD[datatype]
            getattr(tensor.contents, field).extend(array.ravel().tolist())
    for name in outputs:
        request.outputs.add(name=name)
    for key, value in (parameters or {}).items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        elif isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, int):
            request.parameters[key].int64_param = value
        else:
            request.parameters[key].double_param = value
    return request


def invalid(exc: pytest.ExceptionInfo[BaseException], field: str) -> None:
    code, message = errors.status_of(exc.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(field), message


RNG = np.random.default_rng(0)
UINT8_IMAGES = RNG.integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8)
FLOAT_IMAGES = RNG.random((2, 28, 28, 1), dtype=np.float32)


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize(("images", "datatype"), [(UINT8_IMAGES, "UINT8"), (FLOAT_IMAGES, "FP32")])
def test_predict_request_decodes_raw_and_typed_contents(
    images: np.ndarray, datatype: str, raw: bool
) -> None:
    request = infer_request(inputs=[("images", images, datatype)], raw=raw, version="2")
    array, ref, outputs, used_raw = oc.predict_request(request)
    assert array.dtype == images.dtype
    np.testing.assert_array_equal(array, images)
    assert ref == types.ModelRef("mnist", 2)
    assert outputs == ["probabilities", "digits"]
    assert used_raw is raw


def test_predict_request_keeps_the_shape_as_sent_for_the_image_check() -> None:
    flat = UINT8_IMAGES.reshape(3, 784)
    array, ref, _, _ = oc.predict_request(infer_request(inputs=[("images", flat, "UINT8")]))
    assert array.shape == (3, 784)
    assert ref == types.ModelRef("mnist", None)


def test_requested_outputs_select_and_order() -> None:
    request = infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], outputs=("digits",))
    assert oc.predict_request(request)[2] == ["digits"]
    request = infer_request(
        inputs=[("images", UINT8_IMAGES, "UINT8")], outputs=("digits", "probabilities")
    )
    assert oc.predict_request(request)[2] == ["digits", "probabilities"]
    request = infer_request(
        inputs=[("images", UINT8_IMAGES, "UINT8")], outputs=("labels", "probabilities")
    )
    assert oc.predict_request(request)[2] == ["labels", "probabilities"]


def test_labels_only_when_requested() -> None:
    request = infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")])
    assert "labels" not in oc.predict_request(request)[2]


def test_ignored_scheduling_parameters_are_accepted() -> None:
    request = infer_request(
        inputs=[("images", UINT8_IMAGES, "UINT8")], parameters={"priority": 1, "timeout": 5}
    )
    assert oc.predict_request(request)[0].shape == UINT8_IMAGES.shape


def _shared_memory_input() -> Any:
    request = infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")])
    request.inputs[0].parameters["shared_memory_region"].string_param = "r"
    return request


def _classification_output() -> Any:
    request = infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], outputs=("digits",))
    request.outputs[0].parameters["classification"].int64_param = 3
    return request


def _raw_and_typed() -> Any:
    request = infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")])
    request.inputs[0].contents.uint_contents.append(1)
    return request


def _two_raw_for_one_input() -> Any:
    request = infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")])
    request.raw_input_contents.append(b"")
    return request


def _short_raw() -> Any:
    request = infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")])
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    return request


def _typed_count_mismatch() -> Any:
    request = infer_request(inputs=[("images", FLOAT_IMAGES, "FP32")], raw=False)
    request.inputs[0].contents.fp32_contents.append(0.5)
    return request


def _typed_in_wrong_field() -> Any:
    request = infer_request(inputs=[("images", FLOAT_IMAGES, "FP32")], raw=False)
    request.inputs[0].contents.ClearField("fp32_contents")
    request.inputs[0].contents.fp64_contents.extend(FLOAT_IMAGES.ravel().tolist())
    return request


def _uint8_over_255() -> Any:
    request = infer_request(inputs=[("images", UINT8_IMAGES[:1], "UINT8")], raw=False)
    request.inputs[0].contents.uint_contents[0] = 256
    return request


def _zero_images() -> Any:
    request = infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")])
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([0, 28, 28, 1])
    request.raw_input_contents[0] = b""
    return request


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: infer_request(inputs=[("images", FLOAT_IMAGES.astype(np.float64), "FP64")]),
         "inputs[images].datatype"),
        (lambda: infer_request(inputs=[("pixels", UINT8_IMAGES, "UINT8")]), "inputs[0]"),
        (lambda: infer_request(inputs=[]), "inputs[images]"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")] * 2), "inputs[images]"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], outputs=("logits",)),
         "outputs[0]"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")],
                               outputs=("digits", "digits")), "outputs[digits]"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")],
                               parameters={"strides": "1,1"}), "parameters"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], version="latest"),
         "model_version"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], version="0"),
         "model_version"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], version="-2"),
         "model_version"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")],
                               version="99999999999999999999"), "model_version"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")],
                               version="9223372036854775808"), "model_version"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], version="1_0"),
         "model_version"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], version="\u0661"),
         "model_version"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], version="9" * 5000),
         "model_version"),
        (_shared_memory_input, "inputs[images].parameters"),
        (_classification_output, "outputs[digits].parameters"),
        (_raw_and_typed, "inputs[images].contents"),
        (_two_raw_for_one_input, "raw_input_contents"),
        (_short_raw, "inputs[images]"),
        (_typed_count_mismatch, "inputs[images].contents"),
        (_typed_in_wrong_field, "inputs[images].contents"),
        (_uint8_over_255, "inputs[images].contents"),
        (_zero_images, "inputs[images]"),
    ],
)  # fmt: skip
def test_bad_predict_requests_name_the_field(make: Any, field: str) -> None:
    with pytest.raises((errors.ServeError, TensorError)) as exc:
        oc.predict_request(make())
    invalid(exc, field)


PROBS = np.array([[0.1] * 9 + [0.1], [0.0] * 3 + [1.0] + [0.0] * 6], dtype=np.float32)
RESULT = types.PredictOutput(model_name="mnist", model_version=4, probabilities=PROBS)


def test_predict_response_raw_reads_back_with_tritonclient() -> None:
    request = infer_request(request_id="req-7")
    response = oc.predict_response(request, RESULT, ["probabilities", "digits"], raw=True)
    assert (response.model_name, response.model_version, response.id) == ("mnist", "4", "req-7")
    result = InferResult(response)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), PROBS)
    digits = result.as_numpy("digits")
    assert digits.dtype == np.int32
    np.testing.assert_array_equal(digits, [0, 3])
    assert [o.datatype for o in response.outputs] == ["FP32", "INT32"]
    assert [list(o.shape) for o in response.outputs] == [[2, 10], [2]]


def test_predict_response_typed_uses_contents() -> None:
    response = oc.predict_response(infer_request(), RESULT, ["digits", "probabilities"], raw=False)
    assert len(response.raw_output_contents) == 0
    digits, probs = response.outputs
    assert (digits.name, probs.name) == ("digits", "probabilities")
    assert list(digits.contents.int_contents) == [0, 3]
    np.testing.assert_array_equal(
        np.array(probs.contents.fp32_contents, dtype=np.float32).reshape(2, 10), PROBS
    )


NAMED = types.PredictOutput(
    model_name="fashion", model_version=1, probabilities=PROBS, class_names=tuple("ABCDEFGHIJ")
)


def test_labels_output_raw_reads_back_with_tritonclient() -> None:
    response = oc.predict_response(infer_request(), NAMED, ["digits", "labels"], raw=True)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("digits", "INT32", [2]),
        ("labels", "BYTES", [2]),
    ]
    labels = InferResult(response).as_numpy("labels")
    assert labels is not None
    assert labels.tolist() == [b"A", b"D"]


def test_labels_output_typed_and_unnamed_classes() -> None:
    response = oc.predict_response(infer_request(), NAMED, ["labels"], raw=False)
    assert list(response.outputs[0].contents.bytes_contents) == [b"A", b"D"]
    # Without class names, a class is named by its index.
    unnamed = oc.predict_response(infer_request(), RESULT, ["labels"], raw=False)
    assert list(unnamed.outputs[0].contents.bytes_contents) == [b"0", b"3"]


def test_labels_output_encodes_utf8_with_lengths() -> None:
    result = types.PredictOutput("m", 1, PROBS[:1], class_names=("été",))
    response = oc.predict_response(infer_request(), result, ["labels"], raw=True)
    # The length counts bytes, not characters.
    assert response.raw_output_contents[0] == (5).to_bytes(4, "little") + "été".encode()


def test_predict_response_only_the_requested_outputs() -> None:
    response = oc.predict_response(infer_request(), RESULT, ["digits"], raw=True)
    assert [o.name for o in response.outputs] == ["digits"]
    assert InferResult(response).as_numpy("probabilities") is None


CONV_X = RNG.random((1, 6, 6, 2))
CONV_K = RNG.random((3, 3, 2, 4))
CONV_B = RNG.random(4)


@pytest.mark.parametrize("raw", [True, False])
def test_convolve_request_decodes_tensors_and_defaults(raw: bool) -> None:
    request = infer_request(
        "conv2d",
        [("input", CONV_X, "FP64"), ("kernel", CONV_K, "FP64"), ("bias", CONV_B, "FP64")],
        raw=raw,
    )
    value, used_raw = oc.convolve_request(request)
    np.testing.assert_array_equal(value.input, CONV_X)
    np.testing.assert_array_equal(value.kernel, CONV_K)
    assert value.bias is not None
    np.testing.assert_array_equal(value.bias, CONV_B)
    assert value.options == types.ConvolutionOptions()
    assert used_raw is raw


def test_convolve_request_without_bias_float32() -> None:
    x, k = CONV_X.astype(np.float32)[0, :, :, 0], CONV_K.astype(np.float32)[:, :, 0, 0]
    value, _ = oc.convolve_request(
        infer_request("conv2d", [("kernel", k, "FP32"), ("input", x, "FP32")], version="1")
    )
    assert value.bias is None
    assert value.input.dtype == np.float32
    assert value.input.shape == (6, 6)
    assert value.kernel.shape == (3, 3)


@pytest.mark.parametrize(
    ("parameters", "options"),
    [
        ({"strides": "2,1", "padding": "same"}, types.ConvolutionOptions((2, 1), "SAME")),
        ({"strides": 2, "dilations": "3"},
         types.ConvolutionOptions(strides=(2, 2), dilations=(3, 3))),
        ({"padding": "EXPLICIT", "explicit_padding": "1,2,3,4", "mode": "CONVOLUTION"},
         types.ConvolutionOptions(padding="EXPLICIT", explicit_padding=(1, 2, 3, 4),
                                  mode="CONVOLUTION")),
        ({"padding": "EXPLICIT", "explicit_padding": 2},
         types.ConvolutionOptions(padding="EXPLICIT", explicit_padding=(2, 2, 2, 2))),
        ({"strides": "2, 3", "dilations": 2**31 - 1},
         types.ConvolutionOptions(strides=(2, 3), dilations=(2**31 - 1, 2**31 - 1))),
        ({"padding": "EXPLICIT", "explicit_padding": f"0,0,0,{2**31 - 1}"},
         types.ConvolutionOptions(padding="EXPLICIT", explicit_padding=(0, 0, 0, 2**31 - 1))),
    ],
)  # fmt: skip
def test_convolution_parameters(parameters: dict[str, Any], options: Any) -> None:
    request = infer_request("conv2d", parameters=parameters)
    assert oc.convolution_options(request.parameters) == options


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"strides": "a,b"}, "parameters.strides"),
        ({"strides": "1,2,3"}, "parameters.strides"),
        ({"dilations": 1.5}, "parameters.dilations"),
        ({"padding": "FULL"}, "parameters.padding"),
        ({"padding": 1}, "parameters.padding"),
        ({"mode": "CORRELATE"}, "parameters.mode"),
        ({"explicit_padding": "1,2"}, "parameters.explicit_padding"),
        ({"stride": "1,1"}, "parameters"),
        # Every integer is range-checked before TensorFlow, which aborts on some that
        # do not fit its int32 attributes.
        ({"strides": "0,0"}, "parameters.strides"),
        ({"strides": 2**31}, "parameters.strides"),
        ({"strides": f"1,{2**31}"}, "parameters.strides"),
        ({"strides": -(2**63)}, "parameters.strides"),
        ({"dilations": "-1"}, "parameters.dilations"),
        ({"dilations": f"{2**63},1"}, "parameters.dilations"),
        ({"explicit_padding": -1}, "parameters.explicit_padding"),
        ({"explicit_padding": f"0,0,0,{2**31}"}, "parameters.explicit_padding"),
        ({"strides": "1," * 40 + "1"}, "parameters.strides"),
    ],
)
def test_bad_convolution_parameters(parameters: dict[str, Any], field: str) -> None:
    request = infer_request(
        "conv2d", [("input", CONV_X, "FP64"), ("kernel", CONV_K, "FP64")], parameters=parameters
    )
    with pytest.raises(errors.InvalidArgument) as exc:
        oc.convolve_request(request)
    invalid(exc, field)


def test_conv_inputs_must_be_floats_and_complete() -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        oc.convolve_request(infer_request("conv2d", [("input", UINT8_IMAGES, "UINT8")]))
    invalid(exc, "inputs[input].datatype")
    with pytest.raises(errors.InvalidArgument) as exc:
        oc.convolve_request(infer_request("conv2d", [("input", CONV_X, "FP64")]))
    invalid(exc, "inputs[kernel]")


def test_conv_model_has_one_version() -> None:
    oc.check_conv_version("")
    oc.check_conv_version("1")
    with pytest.raises(errors.NotFound):
        oc.check_conv_version("2")
    with pytest.raises(errors.InvalidArgument):
        oc.check_conv_version("one")
    with pytest.raises(errors.InvalidArgument):
        oc.check_conv_version("0")


def test_convolve_response_keeps_dtype() -> None:
    out = RNG.random((1, 4, 4, 4))
    response = oc.convolve_response(
        infer_request("conv2d", request_id="c1"), types.ConvolveOutput(out), raw=True
    )
    assert (response.model_name, response.model_version, response.id) == ("conv2d", "1", "c1")
    assert response.outputs[0].datatype == "FP64"
    np.testing.assert_array_equal(InferResult(response).as_numpy("output"), out)
    typed = oc.convolve_response(infer_request("conv2d"), types.ConvolveOutput(out), raw=False)
    np.testing.assert_array_equal(
        np.array(typed.outputs[0].contents.fp64_contents).reshape(out.shape), out
    )


META = types.ModelMetadata(
    model_name="mnist",
    loaded_versions=(1, 3),
    serving_version=3,
    inputs=(types.TensorSpecInfo("images", ("uint8", "float32"), (-1, 28, 28, 1)),),
    outputs=(types.TensorSpecInfo("probabilities", ("float32",), (-1, 10)),),
    layers=(),
)


def test_model_metadata_lists_versions_and_tensors() -> None:
    response = oc.model_metadata_response(META, None)
    assert response.name == "mnist"
    assert list(response.versions) == ["1", "3"]
    assert [(t.name, t.datatype, list(t.shape)) for t in response.inputs] == [
        ("images", "UINT8", [-1, 28, 28, 1])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("probabilities", "FP32", [-1, 10]),
        ("digits", "INT32", [-1]),
        ("labels", "BYTES", [-1]),
    ]
    assert list(oc.model_metadata_response(META, 1).versions) == ["1"]


def test_model_metadata_takes_the_model_shapes_and_dtypes() -> None:
    small = types.ModelMetadata(
        model_name="digits8",
        loaded_versions=(7,),
        serving_version=7,
        inputs=(types.TensorSpecInfo("images", ("float32", "uint8"), (-1, 8, 8, 3)),),
        outputs=(types.TensorSpecInfo("probabilities", ("float32",), (-1, 4)),),
        layers=(),
    )
    response = oc.model_metadata_response(small, None)
    assert (response.name, list(response.versions)) == ("digits8", ["7"])
    assert [(t.name, t.datatype, list(t.shape)) for t in response.inputs] == [
        ("images", "FP32", [-1, 8, 8, 3])
    ]
    assert list(response.outputs[0].shape) == [-1, 4]


def test_model_metadata_without_an_input_is_internal() -> None:
    bare = types.ModelMetadata("m", (1,), 1, inputs=(), outputs=META.outputs, layers=())
    with pytest.raises(errors.Internal):
        oc.model_metadata_response(bare, None)


def _status(
    name: str, ready: bool, *versions: tuple[int, types.VersionState, bool, str]
) -> types.ModelStatus:
    return types.ModelStatus(
        name,
        ready,
        tuple(types.VersionStatus(v, state, serving, e) for v, state, serving, e in versions),
    )


MODELS = [
    _status("fashion", False, (1, "END", False, "no saved_model.pb")),
    _status("mnist", True, (1, "AVAILABLE", False, ""), (2, "AVAILABLE", True, "")),
    _status("small", False, (3, "LOADING", False, "")),
    _status("stuck", False, (4, "AVAILABLE", True, "")),
    _status("empty", False),
]


def _index(response: Any) -> list[tuple[str, str, str, str]]:
    return [(m.name, m.version, m.state, m.reason) for m in response.models]


def test_repository_index_lists_every_model_and_conv2d() -> None:
    response = oc.repository_index_response(MODELS, conv_ready=True, ready_only=False)
    assert _index(response) == [
        ("fashion", "1", "UNAVAILABLE", "version 1: no saved_model.pb"),
        ("mnist", "2", "READY", ""),
        ("small", "3", "UNAVAILABLE", "no version serves yet (versions: 3 LOADING)"),
        ("stuck", "4", "UNAVAILABLE", "version 4 is AVAILABLE but cannot serve"),
        ("empty", "", "UNAVAILABLE", "no version found"),
        ("conv2d", "1", "READY", ""),
    ]


def test_repository_index_ready_only() -> None:
    response = oc.repository_index_response(MODELS, conv_ready=True, ready_only=True)
    assert _index(response) == [("mnist", "2", "READY", ""), ("conv2d", "1", "READY", "")]
    response = oc.repository_index_response(MODELS, conv_ready=False, ready_only=True)
    assert _index(response) == [("mnist", "2", "READY", "")]
    response = oc.repository_index_response([], conv_ready=False, ready_only=False)
    assert _index(response) == [("conv2d", "1", "UNAVAILABLE", "the server is not ready")]


def test_one_repository_only() -> None:
    oc.check_repository_name("")
    with pytest.raises(errors.InvalidArgument) as exc:
        oc.check_repository_name("x" * 9000)
    invalid(exc, "repository_name")
    assert len(str(exc.value)) < 300


def test_conv_metadata_names_the_tensors() -> None:
    response = oc.conv_metadata_response()
    assert (response.name, list(response.versions)) == ("conv2d", ["1"])
    assert [t.name for t in response.inputs] == ["input", "kernel", "bias"]
    assert [t.name for t in response.outputs] == ["output"]


PARAMETER_VALUES = st.one_of(
    st.text(alphabet="0123456789,-SAMEVLIDXPCTNROUSvalid ", max_size=12),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=True),
)


@settings(max_examples=300, deadline=None)
@given(
    parameters=st.dictionaries(
        st.sampled_from((*oc.CONV_PARAMETERS, "priority", "stride", "")), PARAMETER_VALUES
    )
)
def test_any_conv2d_parameters_convert_or_name_the_parameter(parameters: dict[str, Any]) -> None:
    request = infer_request(
        "conv2d",
        [("input", CONV_X, "FP64"), ("kernel", np.ones((3, 3, 2, 1)), "FP64")],
        parameters=parameters,
    )
    field = ""
    try:
        value, _ = oc.convolve_request(request)
    except errors.InvalidArgument as exc:
        field = exc.field
    if field:
        assert field.startswith("parameters"), field
    else:
        assert isinstance(value.options, types.ConvolutionOptions)


# -- typed contents on the wire ------------------------------------------------


def unpacked(datatype: str, values: np.ndarray) -> bytes:
    """InferTensorContents bytes with one tag per value, as a client may send them."""
    number = service_pb2.InferTensorContents.DESCRIPTOR.fields_by_name[
        oc.CONTENTS_FIELD[datatype]
    ].number
    out = bytearray()
    for value in values.ravel():
        if datatype in ("FP32", "FP64"):
            out += varint(number << 3 | (5 if datatype == "FP32" else 1))
            out += value.astype(oc.DATATYPES[datatype].newbyteorder("<")).tobytes()
        else:
            out += varint(number << 3) + varint(int(value))
    return bytes(out)


def typed_request(datatype: str, array: np.ndarray, contents: bytes) -> Any:
    request = service_pb2.ModelInferRequest(model_name="mnist")
    tensor = request.inputs.add(name="images", datatype=datatype, shape=list(array.shape))
    tensor.contents.MergeFromString(contents)
    return request


TYPED: dict[str, np.ndarray] = {
    "UINT8": np.array([0, 1, 127, 128, 129, 200, 254, 255] * 98, np.uint8).reshape(1, 28, 28),
    "FP32": np.array([0.0, 1.0, 0.5, 1e-30, 0.25, 0.999, 2.0**-20, 0.125] * 98, np.float32),
}


@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
@pytest.mark.parametrize("encoding", ["packed", "unpacked", "mixed"])
def test_typed_contents_read_back_whatever_the_client_encoding(
    datatype: str, encoding: str
) -> None:
    array = TYPED[datatype].reshape(1, 28, 28)
    if encoding == "packed":
        contents = infer_request(inputs=[("images", array, datatype)], raw=False)
        data = contents.inputs[0].contents.SerializeToString()
    elif encoding == "unpacked":
        data = unpacked(datatype, array)
    else:  # protobuf concatenates packed runs and single values of one field
        flat = array.ravel()
        half = service_pb2.InferTensorContents()
        getattr(half, oc.CONTENTS_FIELD[datatype]).extend(flat[:300].tolist())
        data = half.SerializeToString() + unpacked(datatype, flat[300:])
    decoded, _, _, raw = oc.predict_request(typed_request(datatype, array, data))
    assert not raw
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize(
    ("datatype", "array"),
    [
        ("FP64", np.array([0.0, -1.5, 1e300, -1e-300, np.pi], np.float64)),
        ("FP32", np.array([-0.0, 3.4e38, -1.2e-38], np.float32)),
        ("INT32", np.array([0, -1, 2**31 - 1, -(2**31), 300], np.int32)),
        ("INT64", np.array([0, -1, 2**63 - 1, -(2**63), 2**40], np.int64)),
        ("UINT8", np.array([255, 0, 128], np.uint8)),
    ],
)
def test_typed_values_every_datatype_and_encoding(datatype: str, array: np.ndarray) -> None:
    for data in (
        unpacked(datatype, array),
        wire.packed_field(
            service_pb2.InferTensorContents.DESCRIPTOR.fields_by_name[
                oc.CONTENTS_FIELD[datatype]
            ].number,
            b"".join(varint(int(v)) for v in array)
            if datatype in ("INT32", "INT64", "UINT8")
            else array.astype(array.dtype.newbyteorder("<")).tobytes(),
        ),
    ):
        contents = service_pb2.InferTensorContents.FromString(data)
        values = oc._typed_values("f", datatype, contents)
        assert values.dtype == array.dtype
        np.testing.assert_array_equal(values, array)
        # The same values as protobuf's own (slow) reading of the field.
        expected = np.asarray(getattr(contents, oc.CONTENTS_FIELD[datatype]), array.dtype)
        np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize("value", [256, 16383, 16384, 2**21, 2**32 - 1])
def test_uint8_values_out_of_range_name_the_largest(value: int) -> None:
    array = np.zeros((1, 28, 28), np.uint8)
    contents = unpacked("UINT8", array.ravel()[1:]) + unpacked(
        "UINT8", np.array([value], np.uint32)
    )
    with pytest.raises(errors.InvalidArgument) as exc:
        oc.predict_request(typed_request("UINT8", array, contents))
    invalid(exc, "inputs[images].contents")
    assert str(exc.value).endswith(f"UINT8 values in [0, 255] expected, got {value}")


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(0, 2**32 - 1), max_size=200))
def test_varint_decoding_equals_protobuf(values: list[int]) -> None:
    contents = service_pb2.InferTensorContents(uint_contents=values)
    payload = wire.packed_payload(contents.SerializeToString(), 4, "f")
    small = wire.small_varints(payload)
    if all(v <= 255 for v in values):
        assert small is not None
        assert small.tolist() == values
    else:
        assert small is None
    assert wire.varint_values(payload, np.dtype(np.uint32), "f").tolist() == values
    assert wire.largest_varint(payload, "f") == max(values, default=0)


def test_varints_across_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "_VARINT_CHUNK", 7)
    values = [5, 300, 2**31, 1, 127, 128, 2**28, 0, 99] * 5
    payload = b"".join(varint(v) for v in values)
    decoded = wire.varint_values(memoryview(payload), np.dtype(np.uint32), "f")
    assert decoded.tolist() == values


def test_packed_payload_skips_other_fields_and_refuses_junk() -> None:
    number = 6
    packed = wire.packed_field(number, np.arange(3, dtype="<f4").tobytes())
    other = varint(1 << 3) + varint(7) + varint(99 << 3 | 5) + b"abcd"
    payload = wire.packed_payload(other + packed + other, number, "f")
    assert np.frombuffer(payload, "<f4").tolist() == [0.0, 1.0, 2.0]
    assert len(wire.packed_payload(other, number, "f")) == 0
    # The field number with another wire type is an unknown field: protobuf did not take it.
    assert len(wire.packed_payload(varint(number << 3) + varint(1), number, "f")) == 0
    for junk, problem in [
        (other * (wire.MAX_TENSOR_FIELDS // 2 + 1), "at most"),
        (varint(7 << 3 | 3), "groups"),
        (packed[:-1], "truncated"),
        (b"\xff" * 11, "varint"),
    ]:
        with pytest.raises(errors.InvalidArgument) as exc:
            wire.packed_payload(junk, number, "inputs[x].contents")
        invalid(exc, "inputs[x].contents")
        assert problem in str(exc.value)


def test_unknown_fields_in_typed_contents_are_ignored() -> None:
    array = TYPED["FP32"].reshape(1, 28, 28)
    request = infer_request(inputs=[("images", array, "FP32")], raw=False)
    data = varint(99 << 3) + varint(5) + request.inputs[0].contents.SerializeToString()
    decoded, _, _, _ = oc.predict_request(typed_request("FP32", array, data))
    np.testing.assert_array_equal(decoded, array)


def test_shapes_are_checked_before_anything_is_allocated() -> None:
    for raw in (True, False):
        request = infer_request(inputs=[("images", UINT8_IMAGES[:1, :1, :1], "UINT8")], raw=raw)
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend([2**62, 2**62, 2**62])
        with pytest.raises((errors.ServeError, TensorError)) as exc:
            oc.predict_request(request)
        invalid(exc, "inputs[images]")
    request = infer_request(inputs=[("images", UINT8_IMAGES[:1, :1, :1], "UINT8")])
    request.inputs[0].shape.extend([1] * oc.MAX_RANK)
    with pytest.raises(errors.InvalidArgument) as exc:
        oc.predict_request(request)
    invalid(exc, "inputs[images].shape")


def test_client_strings_are_shortened_in_messages() -> None:
    long = "x" * 9000
    cases = [
        infer_request(inputs=[(long, UINT8_IMAGES, "UINT8")]),
        infer_request(inputs=[("images", UINT8_IMAGES, long)]),
        infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], outputs=(long,)),
        infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], version=long),
        infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], parameters={long: 1}),
        infer_request(
            inputs=[("images", UINT8_IMAGES, "UINT8")],
            parameters={f"{i}{long}": 1 for i in range(20)},
        ),
        infer_request("conv2d", parameters={"padding": long}),
        infer_request("conv2d", parameters={"strides": long}),
    ]
    for request in cases:
        convert = (
            (lambda r: oc.convolution_options(r.parameters))
            if request.model_name == "conv2d"
            else oc.predict_request
        )
        with pytest.raises(errors.InvalidArgument) as exc:
            convert(request)
        assert len(str(exc.value)) < 700, str(exc.value)
        assert "characters)" in str(exc.value)


@pytest.mark.parametrize("dtype", [">f4", "<f4", ">f8", "<f8"])
def test_typed_response_is_packed_little_endian_whatever_the_byte_order(dtype: str) -> None:
    out = RNG.random((2, 3, 4, 5)).astype(dtype)
    response = oc.convolve_response(infer_request("conv2d"), types.ConvolveOutput(out), raw=False)
    tensor = response.outputs[0]
    assert tensor.datatype == ("FP32" if dtype[1:] == "f4" else "FP64")
    # What a client receives, read by protobuf (tritonclient reads raw contents only).
    received = service_pb2.ModelInferResponse.FromString(response.SerializeToString())
    contents = received.outputs[0].contents
    values = contents.fp32_contents if dtype[1:] == "f4" else contents.fp64_contents
    np.testing.assert_array_equal(np.asarray(values).reshape(out.shape), out)
    raw = oc.convolve_response(infer_request("conv2d"), types.ConvolveOutput(out), raw=True)
    np.testing.assert_array_equal(InferResult(raw).as_numpy("output"), out)


def test_typed_round_trip_of_an_empty_payload() -> None:
    response = oc.infer_response(
        infer_request(), "conv2d", "1", [("output", np.zeros((0, 3), np.float32))], raw=False
    )
    assert len(response.outputs[0].contents.fp32_contents) == 0
    assert list(response.outputs[0].shape) == [0, 3]
    # No values at all is "no data", as before.
    request = infer_request(inputs=[("images", UINT8_IMAGES, "FP32")], raw=False)
    request.inputs[0].contents.Clear()
    with pytest.raises(errors.InvalidArgument) as exc:
        oc.predict_request(request)
    invalid(exc, "inputs[images].contents")
    assert "no data" in str(exc.value)


def test_request_bytes_estimates_without_serializing() -> None:
    raw = infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")])
    assert oc.request_bytes(raw) >= UINT8_IMAGES.nbytes
    typed = infer_request(inputs=[("images", FLOAT_IMAGES, "FP32")], raw=False)
    assert oc.request_bytes(typed) >= FLOAT_IMAGES.nbytes
    assert oc.request_bytes(service_pb2.ModelInferRequest()) == 0


def test_our_wire_types_and_tags_are_protobufs() -> None:
    # One field of each wire type, as protobuf itself serializes them: the first byte of
    # each is its tag, which our constants must read back.
    sample = service_pb2.InferParameter(int64_param=-1)  # varint, field 2
    assert wire.unpack_tag(sample.SerializeToString()[0]) == (2, wire.WIRETYPE_VARINT)
    sample = service_pb2.InferParameter(string_param="x")  # length-delimited, field 3
    assert wire.unpack_tag(sample.SerializeToString()[0]) == (3, wire.WIRETYPE_LENGTH_DELIMITED)
    sample = service_pb2.InferParameter(double_param=0.5)  # fixed64, field 4
    assert wire.unpack_tag(sample.SerializeToString()[0]) == (4, wire.WIRETYPE_FIXED64)
    contents = service_pb2.InferTensorContents(fp32_contents=[1.0])  # packed: one entry
    assert wire.unpack_tag(contents.SerializeToString()[0]) == (6, wire.WIRETYPE_LENGTH_DELIMITED)
    assert wire.pack_tag(6, wire.WIRETYPE_LENGTH_DELIMITED) == contents.SerializeToString()[0]
    # fixed32 and the group markers, from the encoding's definition.
    assert (wire.WIRETYPE_START_GROUP, wire.WIRETYPE_END_GROUP, wire.WIRETYPE_FIXED32) == (3, 4, 5)
