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

from convserve.client.tensor import TensorError
from convserve.server import errors, types
from convserve.server.protocols import oip_convert as oc


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
        (lambda: infer_request(inputs=[("pixels", UINT8_IMAGES, "UINT8")]), "inputs[pixels]"),
        (lambda: infer_request(inputs=[]), "inputs[images]"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")] * 2), "inputs[images]"),
        (lambda: infer_request(inputs=[("images", UINT8_IMAGES, "UINT8")], outputs=("logits",)),
         "outputs[logits]"),
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
        # Zero strides reach the convolution's own check (the same error as convserve.v1).
        ({"strides": "0,0"}, types.ConvolutionOptions(strides=(0, 0))),
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
    ]
    assert list(oc.model_metadata_response(META, 1).versions) == ["1"]


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
