"""Hostile requests for all three protocols, and the client that checks every answer.

`Target` sends a `Call` (one RPC of convserve.v1, the Open Inference Protocol or
TF Serving, as a generated message or as raw wire bytes) to a server child
process and notices when the process dies. `check_answer` holds the rule every
answer to a hostile request must keep: OK or a client-error status, with a short
message. The hypothesis strategies build structurally valid messages whose
fields take normal and extreme values (int64 limits, huge shapes, NaN/Inf,
wrong dtypes and byte lengths, empty and 9,000-character strings, unknown enum
values). A share of each RPC's requests (`either`, tuned per RPC in `RPCS`) is
built valid instead, among the same hostile neighbours, and its answer checked
(`Expect`): convolutions against a numpy reference (`ConvSpec.expected`),
predictions and feature maps against what the idle server answered
(`Reference`), fits for shapes, finite values and their stop reason.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf import text_format
from google.protobuf.message import Message
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2 as tf_tensor_pb2
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tritonclient.grpc import service_pb2, service_pb2_grpc

from convserve.v1 import convserve_pb2, convserve_pb2_grpc, tensor_pb2
from tests.interop.wire_bytes import varint
from tests.server.wire_helpers import ServerProcess

# -- the rule every answer keeps ----------------------------------------------

Code = grpc.StatusCode
CLIENT_ERRORS = frozenset(
    {
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.RESOURCE_EXHAUSTED,
        Code.OUT_OF_RANGE,
        Code.FAILED_PRECONDITION,
        Code.DEADLINE_EXCEEDED,
        Code.UNIMPLEMENTED,
    }
)
ALLOWED = CLIENT_ERRORS | {Code.OK}
# Far above any useful message, far below what overflows gRPC's 8 KiB trailers.
MAX_MESSAGE_CHARS = 2000
CALL_TIMEOUT_S = 10.0
MODEL = "mnist"
CONV_MODEL = "conv2d"

# -- values --------------------------------------------------------------------

LONG = "m" * 9000
INT64_EXTREMES = (0, -1, 1, 2, 2**31 - 1, 2**31, 2**32, 2**40, 2**63 - 1, -(2**63), -(2**31))
INT32_EXTREMES = (0, -1, 1, 2, 3, 2**31 - 1, -(2**31))
UINT64_EXTREMES = (0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)
UINT32_EXTREMES = (0, 1, 255, 256, 2**31, 2**32 - 1)
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, -1.0, 2.0, 1e30, -1e30, 5e-324, -0.0)
FLOAT_EXTREMES = (0.0, -0.0, 1.0, -1.0, 0.5, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324)
NAMES = ("", MODEL, CONV_MODEL, LONG, "MNIST", " mnist", "mnist\x00", "../mnist", "ü", "*")
# Version labels: the implicit ones (the hostile server configures none), ones the model
# does not have (NOT_FOUND) and ones no model can have (INVALID_ARGUMENT).
LABELS = ("stable", "latest", "canary", "", "x y", "-a", "a/b", "ü", "a" * 65, LONG)
VERSION_STRINGS = (
    "", "1", "2", "0", "-1", "01", " 1", "1.0", "1e3", "abc", LONG,
    str(2**31), str(2**63 - 1), str(2**63), str(2**64), "99999999999999999999",
)  # fmt: skip
NUMPY_DTYPES = ("uint8", "float32", "float64", "int32", "int64")


def int64s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(INT64_EXTREMES), st.integers(-3, 40))


def int32s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(INT32_EXTREMES), st.integers(-3, 40))


def uint64s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(UINT64_EXTREMES), st.integers(0, 40))


def doubles() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(FLOAT_EXTREMES), st.floats(-10, 10))


def texts(*common: str) -> st.SearchStrategy[str]:
    """Mostly the names a server knows and the usual suspects, sometimes any short text."""
    return st.one_of(st.sampled_from(common + NAMES), st.text(max_size=12))


def open_enum(known: int) -> st.SearchStrategy[int]:
    """An enum value: one of the `known` ones (0..known-1) or one no version defines."""
    return st.one_of(st.integers(0, known - 1), st.sampled_from((known, 99, -1, 2**31 - 1)))


# -- tensors -------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """A tensor as every protocol carries it: a dtype name, a claimed shape and bytes.

    `values` holds the elements when `content` is exactly them (the typed
    `contents` fields of OIP and TF Serving are filled from it), else None.
    """

    dtype: str
    shape: tuple[int, ...]
    content: bytes
    values: np.ndarray | None


def little_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def random_array(seed: int, dtype: str, shape: Sequence[int], specials: int) -> np.ndarray:
    """Values of a digit or a convolution input, with `specials` NaN/Inf/out-of-range ones."""
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return rng.integers(0, 256, size=tuple(shape), dtype=np.uint8)
    if dtype in ("int32", "int64"):
        return rng.integers(-300, 300, size=tuple(shape)).astype(dtype)
    array = rng.random(tuple(shape)).astype(dtype)
    if specials and array.size:
        flat = array.reshape(-1)
        for index in rng.integers(0, flat.size, size=specials):
            flat[index] = SPECIAL_FLOATS[int(index) % len(SPECIAL_FLOATS)]
    return array


def wild_shapes() -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(int64s(), max_size=5).map(tuple)


@st.composite
def blobs(
    draw: st.DrawFn,
    dtypes: Sequence[str],
    shapes: st.SearchStrategy[tuple[int, ...]],
) -> Blob:
    """Mostly a plausible tensor (one of `dtypes`, one of `shapes`, exact bytes, sometimes
    NaN/Inf); else the same with a wrong byte length, another dtype's claim, a wild
    shape (2**40, -1, 0, 2**63-1 ...) over the same bytes, or nothing at all."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(shapes)
    specials = draw(st.sampled_from((0, 0, 0, 1, 3)))
    values = random_array(draw(st.integers(0, 2**32 - 1)), dtype, shape, specials)
    content = little_bytes(values)
    how = draw(
        st.sampled_from(("exact",) * 6 + ("short", "long", "empty", "retyped", "wild_shape"))
    )
    if how == "exact":
        return Blob(dtype, tuple(shape), content, values)
    if how == "short":
        return Blob(
            dtype, tuple(shape), content[: draw(st.integers(0, max(0, len(content) - 1)))], None
        )
    if how == "long":
        return Blob(dtype, tuple(shape), content + b"\x00" * draw(st.integers(1, 9)), None)
    if how == "empty":
        return Blob(dtype, (), b"", None)
    if how == "retyped":
        return Blob(draw(st.sampled_from(NUMPY_DTYPES)), tuple(shape), content, None)
    return Blob(dtype, draw(wild_shapes()), content, None)


def digit_shapes() -> st.SearchStrategy[tuple[int, ...]]:
    n = st.one_of(st.integers(1, 3), st.sampled_from((0, 17)))
    other = st.tuples(st.integers(0, 3), st.sampled_from((27, 29)), st.sampled_from((28, 1)))
    return st.one_of(
        st.tuples(n, st.just(28), st.just(28)),
        st.tuples(n, st.just(28), st.just(28), st.sampled_from((1, 1, 3))),
        st.tuples(n, st.sampled_from((784, 783))),
        st.just((784,)),
        other,
    )


def image_blobs() -> st.SearchStrategy[Blob]:
    return blobs(("uint8", "uint8", "float32", "float64", "int32"), digit_shapes())


def conv_input_shapes() -> st.SearchStrategy[tuple[int, ...]]:
    side = st.integers(1, 7)
    return st.one_of(
        st.tuples(side, side),
        st.just((6, 6)),
        st.tuples(st.integers(1, 2), side, side, st.integers(1, 2)),
        st.tuples(side),
        st.tuples(side, side, side),
    )


def kernel_shapes() -> st.SearchStrategy[tuple[int, ...]]:
    side = st.integers(1, 4)
    return st.one_of(
        st.tuples(side, side),
        st.just((3, 3)),
        st.tuples(side, side, st.integers(1, 2), st.integers(1, 2)),
        st.tuples(side),
    )


def float_blobs(shapes: st.SearchStrategy[tuple[int, ...]]) -> st.SearchStrategy[Blob]:
    return blobs(("float64", "float64", "float32", "uint8", "int64"), shapes)


# Valid Convolve requests in the storm use this kernel, and the hostile ones
# sometimes do, so that hostile and valid requests share merged batches.
MATE_KERNEL = np.array([[0.5, -1.0, 0.25], [2.0, 0.0, -0.75], [1.0, 3.0, -2.0]])
MATE_SHAPE = (6, 6)


def mate_kernel_blob() -> Blob:
    return Blob("float64", MATE_KERNEL.shape, little_bytes(MATE_KERNEL), MATE_KERNEL)


# -- convserve.v1 --------------------------------------------------------------

_CS_DTYPE = {
    "uint8": tensor_pb2.DATA_TYPE_UINT8,
    "float32": tensor_pb2.DATA_TYPE_FLOAT32,
    "float64": tensor_pb2.DATA_TYPE_FLOAT64,
    "int32": tensor_pb2.DATA_TYPE_INT32,
    "int64": tensor_pb2.DATA_TYPE_INT64,
}


@st.composite
def cs_tensors(draw: st.DrawFn, blob_strategy: st.SearchStrategy[Blob]) -> tensor_pb2.Tensor:
    blob = draw(blob_strategy)
    dtype: Any = _CS_DTYPE[blob.dtype]
    if draw(st.integers(0, 9)) == 0:
        dtype = draw(st.sampled_from((0, 6, 99, -1, 2**31 - 1)))
    return tensor_pb2.Tensor(dtype=dtype, shape=blob.shape, content=blob.content)


@st.composite
def cs_model_specs(draw: st.DrawFn) -> convserve_pb2.ModelSpec:
    spec = convserve_pb2.ModelSpec(name=draw(texts(MODEL, MODEL, "")))
    if draw(st.booleans()):
        spec.version = draw(int64s())
    if draw(st.booleans()):
        # With a version too, sometimes: both together are refused.
        spec.version_label = draw(st.one_of(st.sampled_from(LABELS), st.text(max_size=12)))
    return spec


@st.composite
def cs_options(draw: st.DrawFn) -> convserve_pb2.ConvolutionOptions:
    pairs: st.SearchStrategy[list[int]] = st.one_of(
        st.just([]), st.lists(int32s(), min_size=2, max_size=2), st.lists(int32s(), max_size=3)
    )
    return convserve_pb2.ConvolutionOptions(
        strides=draw(pairs),
        padding=draw(open_enum(4)),  # type: ignore[arg-type]
        explicit_padding=draw(
            st.one_of(
                st.just([]),
                st.lists(int32s(), min_size=4, max_size=4),
                st.lists(int32s(), max_size=5),
            )
        ),
        dilations=draw(pairs),
        mode=draw(open_enum(3)),  # type: ignore[arg-type]
    )


@st.composite
def cs_predict_requests(draw: st.DrawFn) -> convserve_pb2.PredictRequest:
    request = convserve_pb2.PredictRequest(model_spec=draw(cs_model_specs()))
    if draw(st.integers(0, 9)):
        request.images.CopyFrom(draw(cs_tensors(image_blobs())))
    return request


@st.composite
def cs_stream_requests(draw: st.DrawFn, messages: st.SearchStrategy[Any]) -> Any:
    """1-4 stream messages with any ids (repeated ones too), their requests drawn from
    `messages` (plain requests or `Expect`s). An `Expect` whose answers to the requests
    built valid are checked wherever their id is unique, else the plain list."""
    count = draw(st.integers(1, 4))
    ids = draw(st.lists(uint64s(), min_size=count, max_size=count))
    drawn = [draw(messages) for _ in ids]
    stream = [
        convserve_pb2.PredictStreamRequest(id=i, request=unwrap(d))
        for i, d in zip(ids, drawn, strict=True)
    ]
    checks = {
        i: d.check for i, d in zip(ids, drawn, strict=True) if isinstance(d, Expect) and d.valid
    }
    checks = {i: check for i, check in checks.items() if ids.count(i) == 1}
    if not checks:
        return stream
    return Expect(stream, stream_answers_check(checks), valid=False)


def conv_dtypes(draw: st.DrawFn) -> tuple[str, ...]:
    """Mostly one float dtype for every tensor of a request, sometimes any mix."""
    if draw(st.integers(0, 4)):
        return (draw(st.sampled_from(("float64", "float32"))),)
    return ("float64", "float64", "float32", "uint8", "int64")


def default_or(draw: st.DrawFn, default: Any, strategy: st.SearchStrategy[Any]) -> Any:
    """`default` for half the requests, so that the request's other fields get checked."""
    return default if draw(st.booleans()) else draw(strategy)


@st.composite
def cs_convolve_requests(draw: st.DrawFn) -> convserve_pb2.ConvolveRequest:
    request = convserve_pb2.ConvolveRequest(
        options=default_or(draw, convserve_pb2.ConvolutionOptions(), cs_options())
    )
    dtypes = conv_dtypes(draw)
    if draw(st.integers(0, 9)):
        request.input.CopyFrom(draw(cs_tensors(blobs(dtypes, conv_input_shapes()))))
    kernels = st.one_of(blobs(dtypes, kernel_shapes()), st.just(mate_kernel_blob()))
    if draw(st.integers(0, 9)):
        request.kernel.CopyFrom(draw(cs_tensors(kernels)))
    if draw(st.integers(0, 3)) == 0:
        biases = blobs(dtypes, st.sampled_from(((1,), (2,), (), (0,))))
        request.bias.CopyFrom(draw(cs_tensors(biases)))
    return request


def _fit_geometries() -> st.SearchStrategy[
    tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
]:
    # Few geometries: the server traces one function per geometry, which takes long.
    return st.sampled_from(
        (
            ((5, 5), (4, 4), (2, 2)),
            ((2, 4, 4), (2, 3, 3), (2, 2)),
            ((1, 4, 4, 1), (1, 3, 3, 1), (2, 2, 1, 1)),
        )
    )


@st.composite
def cs_fit_kernel_requests(draw: st.DrawFn) -> convserve_pb2.FitKernelRequest:
    in_shape, out_shape, kernel_shape = draw(_fit_geometries())
    plausible = draw(st.integers(0, 3)) > 0
    dtypes = conv_dtypes(draw)
    inputs = draw(
        cs_tensors(blobs(dtypes, st.just(in_shape) if plausible else conv_input_shapes()))
    )
    targets = draw(
        cs_tensors(blobs(dtypes, st.just(out_shape) if plausible else conv_input_shapes()))
    )
    request = convserve_pb2.FitKernelRequest(
        kernel_shape=draw(st.one_of(st.just(list(kernel_shape)), st.lists(int64s(), max_size=5))),
        fit_bias=draw(st.booleans()),
        learning_rate=default_or(draw, 0.05, doubles()),
        max_steps=default_or(draw, 5, int32s()),
        tolerance=default_or(draw, 0.0, doubles()),
        seed=draw(uint64s()),
    )
    if draw(st.integers(0, 3)) == 0:
        request.options.CopyFrom(draw(cs_options()))
    if draw(st.integers(0, 9)):
        request.inputs.CopyFrom(inputs)
    if draw(st.integers(0, 9)):
        request.targets.CopyFrom(targets)
    return request


@st.composite
def cs_feature_maps_requests(draw: st.DrawFn) -> convserve_pb2.GetFeatureMapsRequest:
    shapes = st.one_of(
        st.sampled_from(((28, 28), (28, 28, 1), (1, 28, 28), (1, 28, 28, 1), (784,), (1, 784))),
        digit_shapes(),
    )
    request = convserve_pb2.GetFeatureMapsRequest(
        model_spec=draw(cs_model_specs()),
        layers=draw(st.lists(texts("conv1", "conv2", "dense"), max_size=3)),
    )
    if draw(st.integers(0, 9)):
        request.image.CopyFrom(draw(cs_tensors(blobs(("uint8", "float32", "float64"), shapes))))
    return request


@st.composite
def cs_metadata_requests(draw: st.DrawFn) -> convserve_pb2.GetModelMetadataRequest:
    return convserve_pb2.GetModelMetadataRequest(model_spec=draw(cs_model_specs()))


# -- Open Inference Protocol ---------------------------------------------------

_OIP_DATATYPE = {
    "uint8": "UINT8",
    "float32": "FP32",
    "float64": "FP64",
    "int32": "INT32",
    "int64": "INT64",
}
_OIP_CONTENTS = {
    "UINT8": "uint_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
OIP_DATATYPES = (
    "UINT8",
    "FP32",
    "FP64",
    "INT32",
    "INT64",
    "BYTES",
    "FP16",
    "BOOL",
    "",
    "fp32",
    LONG,
)


@st.composite
def oip_parameters(draw: st.DrawFn, target: Any, names: Sequence[str]) -> None:
    """Fill the parameter map `target` with parameters of every kind and value."""
    if draw(st.booleans()):
        return
    for name in draw(
        st.lists(
            st.sampled_from((*names, "priority", "timeout", "", LONG, "x")), max_size=3, unique=True
        )
    ):
        param = target[name]
        kind = draw(
            st.sampled_from(
                (
                    "int64_param",
                    "string_param",
                    "string_param",
                    "bool_param",
                    "double_param",
                    "uint64_param",
                )
            )
        )
        if kind == "int64_param":
            param.int64_param = draw(int64s())
        elif kind == "string_param":
            param.string_param = draw(oip_param_strings())
        elif kind == "bool_param":
            param.bool_param = draw(st.booleans())
        elif kind == "double_param":
            param.double_param = draw(doubles())
        else:
            param.uint64_param = draw(uint64s())


def oip_param_strings() -> st.SearchStrategy[str]:
    numbers = st.lists(int64s(), min_size=1, max_size=4).map(lambda v: ",".join(map(str, v)))
    return st.one_of(
        numbers,
        st.sampled_from(
            (
                "VALID", "SAME", "EXPLICIT", "same", "CROSS_CORRELATION", "CONVOLUTION",
                "", ",", "1,", "2147483648,1", "99999999999999999999", "1.5", "0x10", LONG,
            )
        ),
    )  # fmt: skip


@st.composite
def oip_inputs(
    draw: st.DrawFn,
    request: Any,
    names: Sequence[str],
    blob_strategy: st.SearchStrategy[Blob],
    raw: bool,
) -> None:
    """Add 0-3 input tensors to `request`, their data raw or in typed contents."""
    count = draw(st.sampled_from((1, 1, 1, 2, 2, 3, 0)))
    for _ in range(count):
        blob = draw(blob_strategy)
        datatype = _OIP_DATATYPE[blob.dtype]
        if draw(st.integers(0, 9)) == 0:
            datatype = draw(st.sampled_from(OIP_DATATYPES))
        tensor = request.inputs.add(
            name=draw(st.sampled_from((*names, *names, "", LONG, "images ", "probabilities"))),
            datatype=datatype,
            shape=list(blob.shape),
        )
        if draw(st.integers(0, 19)) == 0:
            tensor.parameters["shared_memory_region"].string_param = "x"
        if raw:
            request.raw_input_contents.append(blob.content)
            continue
        values = blob.values if blob.values is not None else np.array([1, 0, 300, -5])
        field_name = _OIP_CONTENTS.get(datatype, "fp32_contents")
        if draw(st.integers(0, 9)) == 0:
            field_name = draw(
                st.sampled_from(
                    (
                        "uint_contents",
                        "int_contents",
                        "int64_contents",
                        "fp32_contents",
                        "fp64_contents",
                        "bytes_contents",
                        "bool_contents",
                        "uint64_contents",
                    )
                )
            )
        _fill_contents(tensor.contents, field_name, values)
    if raw and draw(st.integers(0, 9)) == 0:
        # One entry too many or too few.
        if draw(st.booleans()) or not request.raw_input_contents:
            request.raw_input_contents.append(b"\x00\x00\x00\x00")
        else:
            del request.raw_input_contents[-1]


def _fill_contents(contents: Any, field_name: str, values: np.ndarray) -> None:
    flat = values.reshape(-1)
    if field_name in ("fp32_contents", "fp64_contents"):
        contents_field = getattr(contents, field_name)
        contents_field.extend(float(v) for v in flat)
    elif field_name == "bytes_contents":
        contents.bytes_contents.extend(bytes([int(v) % 256]) for v in flat[:4])
    elif field_name == "bool_contents":
        contents.bool_contents.extend(bool(v) for v in flat[:4])
    else:
        lo, hi = {
            "uint_contents": (0, 2**32 - 1),
            "int_contents": (-(2**31), 2**31 - 1),
            "int64_contents": (-(2**63), 2**63 - 1),
            "uint64_contents": (0, 2**64 - 1),
        }[field_name]
        ints = [min(max(int(v) if math.isfinite(v) else 0, lo), hi) for v in flat]
        getattr(contents, field_name).extend(ints)


@st.composite
def oip_outputs(draw: st.DrawFn, request: Any, names: Sequence[str]) -> None:
    for name in draw(st.lists(st.sampled_from((*names, "", LONG, "images")), max_size=3)):
        out = request.outputs.add(name=name)
        if draw(st.integers(0, 9)) == 0:
            out.parameters[
                draw(st.sampled_from(("binary_data", "classification", LONG)))
            ].bool_param = True


@st.composite
def oip_digit_infer_requests(draw: st.DrawFn) -> Any:
    request = service_pb2.ModelInferRequest(
        model_name=draw(st.one_of(st.just(MODEL), st.just(MODEL), texts())),
        model_version=default_or(draw, "", st.sampled_from(VERSION_STRINGS)),
        id=draw(st.sampled_from(("", "1", LONG, "ü"))),
    )
    draw(oip_parameters(request.parameters, ()))
    draw(oip_inputs(request, ("images",), image_blobs(), draw(st.booleans())))
    draw(oip_outputs(request, ("probabilities", "digits")))
    return request


@st.composite
def oip_conv_infer_requests(draw: st.DrawFn) -> Any:
    request = service_pb2.ModelInferRequest(
        model_name=CONV_MODEL,
        model_version=default_or(draw, "", st.sampled_from(VERSION_STRINGS)),
        id=draw(st.sampled_from(("", "c", LONG))),
    )
    draw(
        oip_parameters(
            request.parameters, ("strides", "dilations", "padding", "explicit_padding", "mode")
        )
    )
    raw = draw(st.booleans())
    count = draw(st.sampled_from((2, 2, 2, 3, 1, 0)))
    shapes = (conv_input_shapes(), kernel_shapes(), st.sampled_from(((1,), (2,), ())))
    dtypes = conv_dtypes(draw)
    for name, shapes_of in list(zip(("input", "kernel", "bias"), shapes, strict=True))[:count]:
        choices = blobs(dtypes, shapes_of)
        if name == "kernel":
            choices = st.one_of(choices, st.just(mate_kernel_blob()))
        blob = draw(choices)
        datatype = _OIP_DATATYPE[blob.dtype]
        if draw(st.integers(0, 9)) == 0:
            datatype = draw(st.sampled_from(OIP_DATATYPES))
        tensor = request.inputs.add(
            name=name if draw(st.integers(0, 19)) else draw(texts("input")),
            datatype=datatype,
            shape=list(blob.shape),
        )
        if raw:
            request.raw_input_contents.append(blob.content)
        else:
            values = blob.values if blob.values is not None else np.array([1.0, math.nan])
            _fill_contents(tensor.contents, _OIP_CONTENTS.get(datatype, "fp64_contents"), values)
    draw(oip_outputs(request, ("output",)))
    return request


@st.composite
def oip_model_requests(draw: st.DrawFn, message: Any) -> Any:
    """A ModelMetadataRequest or ModelReadyRequest (both: name and version strings)."""
    return message(
        name=draw(st.one_of(st.just(MODEL), st.just(CONV_MODEL), texts())),
        version=draw(st.sampled_from(VERSION_STRINGS)),
    )


# -- TF Serving ----------------------------------------------------------------

_TF_DTYPE = {
    "uint8": types_pb2.DT_UINT8,
    "float32": types_pb2.DT_FLOAT,
    "float64": types_pb2.DT_DOUBLE,
    "int32": types_pb2.DT_INT32,
    "int64": types_pb2.DT_INT64,
}
_TF_VALUES = {
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
}
TF_OTHER_DTYPES = (
    types_pb2.DT_INVALID, types_pb2.DT_STRING, types_pb2.DT_HALF, types_pb2.DT_BOOL,
    types_pb2.DT_FLOAT_REF, 999, -1,
)  # fmt: skip


def tf_shape(shape: Sequence[int]) -> Any:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in shape]
    )


@st.composite
def tf_tensors(draw: st.DrawFn, blob_strategy: st.SearchStrategy[Blob]) -> Any:
    blob = draw(blob_strategy)
    dtype = _TF_DTYPE[blob.dtype]
    if draw(st.integers(0, 9)) == 0:
        dtype = draw(st.sampled_from(TF_OTHER_DTYPES))
    proto = tf_tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tf_shape(blob.shape))
    if draw(st.integers(0, 19)) == 0:
        proto.tensor_shape.unknown_rank = True
    if draw(st.integers(0, 2)):
        proto.tensor_content = blob.content
        return proto
    values = blob.values if blob.values is not None else np.array([1.0, 0.0, 300.0, -5.0])
    name = _TF_VALUES.get(dtype, "float_val")
    if draw(st.integers(0, 9)) == 0:
        name = draw(
            st.sampled_from(
                (
                    "float_val",
                    "double_val",
                    "int_val",
                    "int64_val",
                    "half_val",
                    "string_val",
                    "bool_val",
                    "uint32_val",
                )
            )
        )
    flat = values.reshape(-1)
    if name in ("float_val", "double_val"):
        getattr(proto, name).extend(float(v) for v in flat)
    elif name == "string_val":
        proto.string_val.extend(b"x" for _ in flat[:4])
    elif name == "bool_val":
        proto.bool_val.extend(bool(v) for v in flat[:4])
    else:
        lo, hi = {
            "int_val": (-(2**31), 2**31 - 1),
            "half_val": (-(2**31), 2**31 - 1),
            "int64_val": (-(2**63), 2**63 - 1),
            "uint32_val": (0, 2**32 - 1),
        }[name]
        getattr(proto, name).extend(
            min(max(int(v) if math.isfinite(v) else 0, lo), hi) for v in flat
        )
    return proto


@st.composite
def tf_model_specs(draw: st.DrawFn, signature: str = "") -> Any:
    spec = model_pb2.ModelSpec(
        name=default_or(draw, MODEL, texts(MODEL, "")),
        signature_name=draw(
            st.sampled_from(
                (signature, signature, "", "serving_default", "predict_uint8", "x", LONG)
            )
        ),
    )
    choice = draw(st.sampled_from(("none", "version", "label")))
    if choice == "version":
        spec.version.value = draw(int64s())
    elif choice == "label":
        spec.version_label = draw(st.one_of(st.sampled_from(LABELS), st.text(max_size=12)))
    return spec


@st.composite
def tf_predict_requests(draw: st.DrawFn) -> Any:
    blob_strategy = image_blobs()
    blob = draw(blob_strategy)
    signature = "predict_uint8" if blob.dtype == "uint8" else "serving_default"
    request = predict_pb2.PredictRequest(
        model_spec=draw(tf_model_specs(signature)),
        output_filter=draw(
            st.lists(st.sampled_from(("probabilities", "", "images", LONG)), max_size=3)
        ),
    )
    for key in draw(
        st.lists(
            st.sampled_from(("images", "images", "images", "x", "", LONG)), max_size=2, unique=True
        )
    ):
        request.inputs[key].CopyFrom(draw(tf_tensors(st.one_of(st.just(blob), blob_strategy))))
    return request


@st.composite
def tf_metadata_requests(draw: st.DrawFn) -> Any:
    return get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=draw(tf_model_specs()),
        metadata_field=draw(
            st.lists(st.sampled_from(("signature_def", "signature_def", "", "x", LONG)), max_size=3)
        ),
    )


@st.composite
def tf_status_requests(draw: st.DrawFn) -> Any:
    return get_model_status_pb2.GetModelStatusRequest(model_spec=draw(tf_model_specs()))


# -- requests built valid, with the answers they must get -----------------------

# The share (in percent) of generated requests of each RPC that are built valid
# and checked for their exact answer; the rest stack hostile choices, of which
# only a few come out valid by chance.
VALID_PERCENT = 40
FIT_STEPS_CAP = 50  # the server's --max-fit-steps in the suite
FIT_STOP_REASONS = frozenset({"converged", "max_steps", "time_budget"})


@dataclass(frozen=True)
class Expect:
    """A drawn request with `check`, which runs on its OK response (raising
    AssertionError); `valid`: built valid, so anything but OK is a failure."""

    request: Any
    check: Callable[[Any], None]
    valid: bool = True


def unwrap(drawn: Any) -> Any:
    """The request of a drawn `Expect` or plain request."""
    return drawn.request if isinstance(drawn, Expect) else drawn


@st.composite
def either(
    draw: st.DrawFn,
    valid: st.SearchStrategy[Any],
    hostile: st.SearchStrategy[Any],
    percent: int = VALID_PERCENT,
) -> Any:
    """A request from `valid` for `percent` of draws, else one from `hostile`.

    Hypothesis does not draw independently from example to example, so the share
    of valid requests it sends differs from `percent` per RPC (the final test
    prints it); `percent` is tuned per RPC in `RPCS`."""
    if draw(st.integers(0, 99)) < percent:
        return draw(valid)
    return draw(hostile)


@dataclass(frozen=True)
class Reference:
    """What the idle server answered: the probabilities of each reference digit sent
    alone, and the feature maps (layer -> float32 [H,W,F]) of the first few."""

    images: np.ndarray = field(repr=False)  # uint8 [R,28,28]
    probabilities: np.ndarray = field(repr=False)  # float32 [R,10]
    feature_maps: tuple[dict[str, np.ndarray], ...] = field(repr=False)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.feature_maps[0])


@dataclass(frozen=True)
class Digits:
    """Reference digits as a valid request sends them: uint8 or float32 (x / 255), in
    one of the accepted shapes."""

    indices: tuple[int, ...]
    array: np.ndarray


@st.composite
def digit_batches(draw: st.DrawFn, ref: Reference, max_images: int = 4) -> Digits:
    count = len(ref.images)
    indices = draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=max_images))
    images = ref.images[indices]
    if draw(st.booleans()):
        # The server's own uint8 -> float32 conversion gives exactly these values.
        images = images.astype(np.float32) / np.float32(255.0)
    shape = draw(st.sampled_from(((28, 28), (28, 28, 1), (784,))))
    return Digits(tuple(indices), images.reshape(len(indices), *shape))


def expect_probabilities(ref: Reference, digits: Digits, got: np.ndarray) -> None:
    """Batched answers equal the idle ones up to float32 rounding of the engine's batch."""
    expected = ref.probabilities[list(digits.indices)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg="probabilities")


@st.composite
def cs_valid_specs(draw: st.DrawFn) -> convserve_pb2.ModelSpec:
    spec = convserve_pb2.ModelSpec(name=draw(st.sampled_from(("", MODEL))))
    choice = draw(st.sampled_from(("none", "version", "label")))
    if choice == "version":
        spec.version = 1
    elif choice == "label":
        # The implicit labels: the serving version, with no labels configured.
        spec.version_label = draw(st.sampled_from(("stable", "latest")))
    return spec


def cs_array(tensor: tensor_pb2.Tensor, dtype: str) -> np.ndarray:
    """A convserve.v1 tensor's values, which must have `dtype`."""
    assert tensor.dtype == _CS_DTYPE[dtype], f"{dtype} expected, got dtype {tensor.dtype}"
    values = np.frombuffer(tensor.content, dtype=np.dtype(dtype).newbyteorder("<"))
    return values.reshape(tuple(tensor.shape))


def _cs_predict_check(ref: Reference, digits: Digits) -> Callable[[Any], None]:
    def check(response: Any) -> None:
        assert (response.model_name, response.model_version) == (MODEL, 1), response.model_name
        got = cs_array(response.probabilities, "float32")
        expect_probabilities(ref, digits, got)
        assert list(response.digits) == got.argmax(axis=1).tolist(), "digits"
        np.testing.assert_array_equal(response.confidences, got.max(axis=1), "confidences")

    return check


@st.composite
def cs_valid_predicts(draw: st.DrawFn, ref: Reference) -> Expect:
    digits = draw(digit_batches(ref))
    request = convserve_pb2.PredictRequest(
        model_spec=draw(cs_valid_specs()), images=cs_tensor(digits.array)
    )
    return Expect(request, _cs_predict_check(ref, digits))


def stream_answers_check(checks: dict[int, Callable[[Any], None]]) -> Callable[[Any], None]:
    """Check the answers (a list of PredictStreamResponse) of the ids in `checks`."""

    def check(answers: Any) -> None:
        by_id = {answer.id: answer for answer in answers}
        for i, check_one in checks.items():
            answer = by_id[i]
            if answer.WhichOneof("result") != "response":
                raise AssertionError(f"valid stream request {i} answered {answer.error}")
            check_one(answer.response)

    return check


@st.composite
def cs_valid_streams(draw: st.DrawFn, ref: Reference) -> Expect:
    count = draw(st.integers(1, 4))
    ids = draw(st.lists(uint64s(), min_size=count, max_size=count, unique=True))
    drawn = [draw(cs_valid_predicts(ref)) for _ in ids]
    stream = [
        convserve_pb2.PredictStreamRequest(id=i, request=d.request)
        for i, d in zip(ids, drawn, strict=True)
    ]
    return Expect(
        stream, stream_answers_check({i: d.check for i, d in zip(ids, drawn, strict=True)})
    )


def cs_streams(ref: Reference) -> st.SearchStrategy[Any]:
    """Streams of valid requests, or streams of any requests (some of them valid)."""
    messages = either(cs_valid_predicts(ref), cs_predict_requests(), 25)
    return either(cs_valid_streams(ref), cs_stream_requests(messages), 35)


@dataclass(frozen=True)
class ConvSpec:
    """A valid convolution; None and "" mean the option is not sent (its default)."""

    x: np.ndarray
    k: np.ndarray
    bias: np.ndarray | None
    strides: tuple[int, int] | None
    dilations: tuple[int, int] | None
    padding: str  # "", VALID, SAME or EXPLICIT
    pads: tuple[int, int, int, int] | None  # with EXPLICIT: top, bottom, left, right
    mode: str  # "", CROSS_CORRELATION or CONVOLUTION

    @property
    def dtype(self) -> str:
        return self.x.dtype.name

    def expected(self) -> np.ndarray:
        """The textbook answer, computed in float64 (convolution.py's semantics and
        TensorFlow's padding)."""
        two_d = self.x.ndim == 2
        x = self.x[None, :, :, None] if two_d else self.x
        k = self.k[:, :, None, None] if two_d else self.k
        x, k = x.astype(np.float64), k.astype(np.float64)
        if self.mode == "CONVOLUTION":
            k = k[::-1, ::-1]
        sh, sw = self.strides or (1, 1)
        dh, dw = self.dilations or (1, 1)
        kh, kw = k.shape[:2]
        span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        if self.padding == "SAME":
            # Output ceil(size / stride); the odd extra row/column at the bottom/right.
            total_h = max((-(-x.shape[1] // sh) - 1) * sh + span_h - x.shape[1], 0)
            total_w = max((-(-x.shape[2] // sw) - 1) * sw + span_w - x.shape[2], 0)
            pads = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        else:
            pads = self.pads or (0, 0, 0, 0)
        top, bottom, left, right = pads
        xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        out_h = (xp.shape[1] - span_h) // sh + 1
        out_w = (xp.shape[2] - span_w) // sw + 1
        y = np.zeros((x.shape[0], out_h, out_w, k.shape[3]))
        for a in range(kh):
            for b in range(kw):
                rows = slice(a * dh, a * dh + (out_h - 1) * sh + 1, sh)
                cols = slice(b * dw, b * dw + (out_w - 1) * sw + 1, sw)
                y += xp[:, rows, cols, :] @ k[a, b]
        if self.bias is not None:
            y += self.bias.astype(np.float64).reshape(-1)
        return y[0, :, :, 0] if two_d else y

    def check(self, got: np.ndarray) -> None:
        tolerance = 1e-10 if self.dtype == "float64" else 1e-4
        np.testing.assert_allclose(
            got, self.expected(), rtol=tolerance, atol=tolerance, err_msg="convolution"
        )


@st.composite
def conv_specs(draw: st.DrawFn) -> ConvSpec:
    """Valid convolutions of every geometry the options allow, small enough to be cheap."""
    dtype = draw(st.sampled_from(("float64", "float32")))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.integers(0, 4)) == 0:
        # The storm's batch-mate geometry: merged with its valid Convolve requests.
        x = rng.normal(size=MATE_SHAPE).astype(dtype)
        return ConvSpec(x, MATE_KERNEL.astype(dtype), None, None, None, "", None, "")
    four_d = draw(st.booleans())
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    strides = draw(st.one_of(st.none(), st.tuples(*[st.sampled_from((1, 1, 2, 3, 8))] * 2)))
    dilations = draw(st.one_of(st.none(), st.tuples(*[st.sampled_from((1, 1, 2))] * 2)))
    padding = draw(st.sampled_from(("", "VALID", "SAME", "EXPLICIT")))
    pads = None
    if padding == "EXPLICIT":
        pads = draw(st.tuples(*[st.integers(0, 2)] * 4))
    top, bottom, left, right = pads or (0, 0, 0, 0)
    dh, dw = dilations or (1, 1)
    # SAME pads any kernel; otherwise the dilated kernel must fit the padded input.
    fit_h = 4 if padding == "SAME" else min(4, (h + top + bottom - 1) // dh + 1)
    fit_w = 4 if padding == "SAME" else min(4, (w + left + right - 1) // dw + 1)
    kh, kw = draw(st.integers(1, fit_h)), draw(st.integers(1, fit_w))
    mode = draw(st.sampled_from(("", "CROSS_CORRELATION", "CONVOLUTION")))
    x_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    bias_shapes: tuple[tuple[int, ...], ...]
    if four_d:
        n, c, f = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        x_shape, k_shape, bias_shapes = (n, h, w, c), (kh, kw, c, f), ((f,),)
    else:
        # Not a scalar bias: convserve.proto and convolution.py allow one, but every protocol's
        # tensor reader refuses shape [] (`convserve.v1.tensor_codec.from_tensor`).
        x_shape, k_shape, bias_shapes = (h, w), (kh, kw), ((1,),)
    bias = None
    if draw(st.booleans()):
        bias = rng.normal(size=draw(st.sampled_from(bias_shapes))).astype(dtype)
    x = rng.normal(size=x_shape).astype(dtype)
    k = rng.normal(size=k_shape).astype(dtype)
    return ConvSpec(x, k, bias, strides, dilations, padding, pads, mode)


_CS_PADDING = {"": 0, "VALID": 1, "SAME": 2, "EXPLICIT": 3}
_CS_MODE = {"": 0, "CROSS_CORRELATION": 1, "CONVOLUTION": 2}


@st.composite
def cs_valid_convolves(draw: st.DrawFn) -> Expect:
    spec = draw(conv_specs())
    options = convserve_pb2.ConvolutionOptions(
        strides=spec.strides or (),
        padding=_CS_PADDING[spec.padding],  # type: ignore[arg-type]
        explicit_padding=spec.pads or (),
        dilations=spec.dilations or (),
        mode=_CS_MODE[spec.mode],  # type: ignore[arg-type]
    )
    request = convserve_pb2.ConvolveRequest(
        input=cs_tensor(spec.x), kernel=cs_tensor(spec.k), options=options
    )
    if spec.bias is not None:
        request.bias.CopyFrom(cs_tensor(spec.bias))

    def check(response: Any) -> None:
        spec.check(cs_array(response.output, spec.dtype))

    return Expect(request, check)


def oip_output(response: Any, name: str) -> np.ndarray:
    """The named output of a ModelInferResponse, from raw or typed contents."""
    names = [out.name for out in response.outputs]
    assert name in names, f"output {name!r} expected, got {names}"
    index = names.index(name)
    tensor = response.outputs[index]
    dtype = {"FP32": "<f4", "FP64": "<f8", "INT32": "<i4"}[tensor.datatype]
    if response.raw_output_contents:
        values = np.frombuffer(response.raw_output_contents[index], dtype=dtype)
    else:
        field_name = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT32": "int_contents"}
        values = np.array(getattr(tensor.contents, field_name[tensor.datatype]), dtype=dtype)
    return values.reshape(tuple(tensor.shape))


@st.composite
def _oip_pair(draw: st.DrawFn, pair: tuple[int, int], params: Any, name: str) -> None:
    """Set `name` to `pair` in any of the accepted forms."""
    forms: list[str | int] = [f"{pair[0]},{pair[1]}"]
    if pair[0] == pair[1]:
        forms += [str(pair[0]), pair[0]]
    form = draw(st.sampled_from(forms))
    if isinstance(form, int):
        params[name].int64_param = form
    else:
        params[name].string_param = form


@st.composite
def oip_valid_conv_infers(draw: st.DrawFn) -> Expect:
    spec = draw(conv_specs())
    request = service_pb2.ModelInferRequest(
        model_name=CONV_MODEL,
        model_version=draw(st.sampled_from(("", "1"))),
        id=draw(st.sampled_from(("", "c", LONG))),
    )
    params = request.parameters
    if spec.strides:
        draw(_oip_pair(spec.strides, params, "strides"))
    if spec.dilations:
        draw(_oip_pair(spec.dilations, params, "dilations"))
    if spec.padding:
        params["padding"].string_param = spec.padding
    if spec.pads:
        if len(set(spec.pads)) == 1 and draw(st.booleans()):
            params["explicit_padding"].int64_param = spec.pads[0]
        else:
            params["explicit_padding"].string_param = ",".join(map(str, spec.pads))
    if spec.mode:
        params["mode"].string_param = spec.mode
    if draw(st.booleans()):
        params[draw(st.sampled_from(("priority", "timeout")))].int64_param = 1
    raw = draw(st.booleans())
    inputs = [("input", spec.x), ("kernel", spec.k)]
    if spec.bias is not None:
        inputs.append(("bias", spec.bias))
    for name, array in draw(st.permutations(inputs)):
        datatype = _OIP_DATATYPE[spec.dtype]
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if raw:
            request.raw_input_contents.append(little_bytes(array))
        else:
            _fill_contents(tensor.contents, _OIP_CONTENTS[datatype], array)
    if draw(st.booleans()):
        request.outputs.add(name="output")

    def check(response: Any) -> None:
        assert response.id == request.id, "the request id echoed"
        assert response.outputs[0].datatype == _OIP_DATATYPE[spec.dtype], "output datatype"
        spec.check(oip_output(response, "output"))

    return Expect(request, check)


@st.composite
def cs_valid_fits(draw: st.DrawFn) -> Expect:
    in_shape, out_shape, kernel_shape = draw(_fit_geometries())
    dtype = draw(st.sampled_from(("float64", "float32")))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    max_steps = draw(st.sampled_from((0, 1, 2, 5, 10)))  # 0: the server's cap
    tolerance = draw(st.sampled_from((0.0, 0.0, 1e-3, 1e3)))  # 1e3: converged at once
    request = convserve_pb2.FitKernelRequest(
        inputs=cs_tensor(rng.random(in_shape).astype(dtype)),
        targets=cs_tensor(rng.random(out_shape).astype(dtype)),
        kernel_shape=kernel_shape,
        fit_bias=draw(st.booleans()),
        learning_rate=draw(st.sampled_from((0.0, 0.01, 0.05))),  # 0: the server's default
        max_steps=max_steps,
        tolerance=tolerance,
        seed=draw(uint64s()),
    )
    if draw(st.booleans()):
        # The defaults spelled out: the same geometry (no new traced function).
        request.options.CopyFrom(
            convserve_pb2.ConvolutionOptions(
                strides=[1, 1],
                padding=convserve_pb2.PADDING_VALID,
                dilations=[1, 1],
                mode=convserve_pb2.CONVOLUTION_MODE_CROSS_CORRELATION,
            )
        )
    cap = min(max_steps or FIT_STEPS_CAP, FIT_STEPS_CAP)
    filters = kernel_shape[3] if len(kernel_shape) == 4 else 1

    def check(response: Any) -> None:
        kernel = cs_array(response.kernel, "float64")
        assert kernel.shape == tuple(kernel_shape), f"kernel shape {kernel.shape}"
        assert np.all(np.isfinite(kernel)), "finite kernel"
        if request.fit_bias:
            bias = cs_array(response.bias, "float64")
            assert bias.shape == (filters,), f"bias shape {bias.shape}"
            assert np.all(np.isfinite(bias)), f"bias {bias}"
        else:
            assert not response.HasField("bias"), "no bias without fit_bias"
        assert response.stop_reason in FIT_STOP_REASONS, response.stop_reason
        assert 0 <= response.steps <= cap, f"{response.steps} steps, at most {cap} expected"
        assert len(response.loss) == response.steps + 1, f"{len(response.loss)} losses"
        assert all(math.isfinite(v) for v in response.loss), "finite losses"
        if response.stop_reason == "max_steps":
            assert response.steps == cap, f"max_steps after {response.steps} of {cap} steps"
        if response.stop_reason == "converged":
            assert response.loss[-1] <= tolerance, "converged above the tolerance"

    return Expect(request, check)


@st.composite
def cs_valid_feature_maps(draw: st.DrawFn, ref: Reference) -> Expect:
    index = draw(st.integers(0, len(ref.feature_maps) - 1))
    image: np.ndarray = ref.images[index]
    if draw(st.booleans()):
        image = image.astype(np.float32) / np.float32(255.0)
    shape = draw(
        st.sampled_from(((28, 28), (28, 28, 1), (1, 28, 28), (1, 28, 28, 1), (784,), (1, 784)))
    )
    layers = draw(st.lists(st.sampled_from(ref.layers), max_size=3))
    request = convserve_pb2.GetFeatureMapsRequest(
        model_spec=draw(cs_valid_specs()), image=cs_tensor(image.reshape(shape)), layers=layers
    )

    def check(response: Any) -> None:
        assert (response.model_name, response.model_version) == (MODEL, 1), response.model_name
        names = [m.layer for m in response.feature_maps]
        assert names == (layers or list(ref.layers)), f"layers {names}"
        for feature_map in response.feature_maps:
            got = cs_array(feature_map.activations, "float32")
            assert got.ndim == 3, f"{feature_map.layer}: [H,W,F] expected, got {got.shape}"
            assert np.all(np.isfinite(got)), f"{feature_map.layer}: finite values expected"
            np.testing.assert_array_equal(got, ref.feature_maps[index][feature_map.layer])

    return Expect(request, check)


@st.composite
def cs_valid_metadata(draw: st.DrawFn) -> Expect:
    request = convserve_pb2.GetModelMetadataRequest(model_spec=draw(cs_valid_specs()))

    def check(response: Any) -> None:
        assert response.model_name == MODEL, response.model_name
        assert list(response.loaded_versions) == [1], list(response.loaded_versions)
        assert response.serving_version == 1, response.serving_version

    return Expect(request, check)


@st.composite
def oip_valid_digit_infers(draw: st.DrawFn, ref: Reference) -> Expect:
    digits = draw(digit_batches(ref))
    request = service_pb2.ModelInferRequest(
        model_name=MODEL,
        model_version=draw(st.sampled_from(("", "1"))),
        id=draw(st.sampled_from(("", "1", LONG, "ü"))),
    )
    if draw(st.booleans()):
        request.parameters[draw(st.sampled_from(("priority", "timeout")))].int64_param = 1
    datatype = _OIP_DATATYPE[digits.array.dtype.name]
    tensor = request.inputs.add(name="images", datatype=datatype, shape=list(digits.array.shape))
    if draw(st.booleans()):
        request.raw_input_contents.append(little_bytes(digits.array))
    else:
        _fill_contents(tensor.contents, _OIP_CONTENTS[datatype], digits.array)
    outputs = draw(
        st.sampled_from(((), ("probabilities",), ("digits",), ("digits", "probabilities")))
    )
    for name in outputs:
        out = request.outputs.add(name=name)
        if draw(st.booleans()):
            out.parameters["binary_data"].bool_param = True

    def check(response: Any) -> None:
        assert (response.model_name, response.model_version) == (MODEL, "1"), "model"
        assert response.id == request.id, "the request id echoed"
        names = [out.name for out in response.outputs]
        assert names == list(outputs or ("probabilities", "digits")), f"outputs {names}"
        expected = ref.probabilities[list(digits.indices)]
        if "probabilities" in names:
            expect_probabilities(ref, digits, oip_output(response, "probabilities"))
        if "digits" in names:
            got = oip_output(response, "digits")
            # Only a near tie could make a batched argmax differ from the idle one.
            top = np.sort(expected, axis=1)
            clear = top[:, -1] - top[:, -2] > 1e-5
            np.testing.assert_array_equal(got[clear], expected.argmax(axis=1)[clear], "digits")

    return Expect(request, check)


@st.composite
def oip_valid_model_requests(draw: st.DrawFn, message: Any) -> Expect:
    name = draw(st.sampled_from((MODEL, CONV_MODEL)))
    request = message(name=name, version=draw(st.sampled_from(("", "1"))))

    def check(response: Any) -> None:
        if message is service_pb2.ModelReadyRequest:
            assert response.ready is True, f"{name} not ready"
        else:
            assert response.name == name, response.name
            assert list(response.versions) == ["1"], list(response.versions)

    return Expect(request, check)


@st.composite
def tf_valid_specs(draw: st.DrawFn, signature: str) -> Any:
    spec = model_pb2.ModelSpec(name=draw(st.sampled_from((MODEL, ""))), signature_name=signature)
    choice = draw(st.sampled_from(("none", "version", "label")))
    if choice == "version":
        spec.version.value = 1
    elif choice == "label":
        spec.version_label = draw(st.sampled_from(("stable", "latest")))
    return spec


@st.composite
def tf_valid_predicts(draw: st.DrawFn, ref: Reference) -> Expect:
    digits = draw(digit_batches(ref))
    array = digits.array
    if array.dtype == np.uint8:
        signature, dtype, typed = "predict_uint8", types_pb2.DT_UINT8, "int_val"
    else:
        signature = draw(st.sampled_from(("", "serving_default")))
        dtype, typed = types_pb2.DT_FLOAT, "float_val"
    tensor = tf_tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tf_shape(array.shape))
    if draw(st.booleans()):
        tensor.tensor_content = array.tobytes()
    else:
        getattr(tensor, typed).extend(array.reshape(-1).tolist())
    request = predict_pb2.PredictRequest(
        model_spec=draw(tf_valid_specs(signature)),
        output_filter=draw(st.sampled_from(((), ("probabilities",)))),
    )
    request.inputs["images"].CopyFrom(tensor)

    def check(response: Any) -> None:
        assert response.model_spec.name == MODEL, response.model_spec.name
        assert list(response.outputs) == ["probabilities"], list(response.outputs)
        out = response.outputs["probabilities"]
        assert out.dtype == types_pb2.DT_FLOAT, f"dtype {out.dtype}"
        got = np.frombuffer(out.tensor_content, dtype="<f4").reshape(-1, 10)
        expect_probabilities(ref, digits, got)

    return Expect(request, check)


@st.composite
def tf_valid_metadata(draw: st.DrawFn) -> Expect:
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=draw(tf_valid_specs("")), metadata_field=["signature_def"]
    )

    def check(response: Any) -> None:
        assert response.model_spec.name == MODEL, response.model_spec.name
        assert list(response.metadata) == ["signature_def"], list(response.metadata)

    return Expect(request, check)


@st.composite
def tf_valid_status(draw: st.DrawFn) -> Expect:
    request = get_model_status_pb2.GetModelStatusRequest(model_spec=draw(tf_valid_specs("")))

    def check(response: Any) -> None:
        states = [(s.version, s.state) for s in response.model_version_status]
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert states == [(1, available)], f"version states {states}"

    return Expect(request, check)


# -- calls ---------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request of one RPC. `request` is a message, a list of messages (PredictStream)
    or raw wire bytes (then `note` says what they encode)."""

    protocol: str
    rpc: str
    request: Any
    note: str = ""
    # Runs on an OK response (see `Expect`).
    check: Callable[[Any], None] | None = field(default=None, compare=False)
    # Built valid: anything but OK is a failure.
    valid: bool = False

    def __repr__(self) -> str:
        kind = "valid " if self.valid else ""
        return f"Call({kind}{self.label}: {self.describe()})"

    @property
    def label(self) -> str:
        """ "protocol rpc", with "[conv2d]" for OIP requests to the convolution model."""
        model = getattr(self.request, "model_name", None) if self.protocol == "oip" else None
        suffix = "[conv2d]" if model == CONV_MODEL else ""
        return f"{self.protocol} {self.rpc}{suffix}"

    def describe(self) -> str:
        if isinstance(self.request, bytes):
            return f"{self.note} (raw bytes {self.request[:48].hex()}...)"
        if isinstance(self.request, list):
            return " | ".join(describe(m) for m in self.request)
        return describe(self.request)

    @property
    def messages(self) -> int:
        return len(self.request) if isinstance(self.request, list) else 1


_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_REPEATED = re.compile(r"\b(\w+): \S+(?: \1: \S+){5,}")


def _cut_string(match: re.Match[str]) -> str:
    inside = match.group(1)
    if len(inside) <= 48:
        return match.group(0)
    return f'"{inside[:40]}…" ({len(inside)} chars)'


def describe(message: Message, limit: int = 700) -> str:
    """A one-line text form of `message` with long strings and long repeated fields cut."""
    text = text_format.MessageToString(message, as_one_line=True)
    text = _STRING.sub(_cut_string, text)
    text = _REPEATED.sub(
        lambda m: f"{m.group(1)}: [{m.group(0).count(m.group(1) + ':')} values]", text
    )
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    response: Any  # the response message, the list of stream answers, or None


class ServerDied(AssertionError):
    """The server process exited: every later request fails with this at once."""


_RESPONSES: dict[str, Any] = {
    "Predict": convserve_pb2.PredictResponse,
    "Convolve": convserve_pb2.ConvolveResponse,
    "FitKernel": convserve_pb2.FitKernelResponse,
    "GetModelMetadata": convserve_pb2.GetModelMetadataResponse,
}


@dataclass
class Target:
    """A server child process and stubs for its three protocols; counts what it sends."""

    server: ServerProcess
    channel: grpc.Channel
    sent: int = 0
    death: str | None = None
    # Answers by "protocol rpc code" (a stream's also by message), to show what the
    # suite reached.
    tally: Counter[str] = field(default_factory=Counter)
    # Generated requests by (test, label, built valid, code); stream messages as
    # "label message".
    generated: Counter[tuple[str, str, bool, str]] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __repr__(self) -> str:
        return f"Target({self.server.target}, {self.sent} requests sent)"

    def __post_init__(self) -> None:
        self._stubs: dict[str, Any] = {
            "convserve": convserve_pb2_grpc.ConvServeStub(self.channel),
            "oip": service_pb2_grpc.GRPCInferenceServiceStub(self.channel),
            "tfserving": prediction_service_pb2_grpc.PredictionServiceStub(self.channel),
            "tfserving-model": model_service_pb2_grpc.ModelServiceStub(self.channel),
        }

    def require_alive(self) -> None:
        """Fail at once (ServerDied) when the process has exited."""
        if self.death is None and self.server.process.poll() is not None:
            self._died("between requests")
        if self.death is not None:
            raise ServerDied(self.death)

    def _died(self, when: str) -> None:
        with self._lock:
            if self.death is None:
                # The fatal line (TensorFlow's "F0000 ... Check failed") comes
                # before the stack trace it prints.
                lines = self.server.lines[-300:]
                fatal = [line for line in lines if re.match(r"[FE]\d{4} |Traceback|Fatal", line)]
                tail = "".join([*fatal[-3:], "...\n", *lines[-6:]])
                self.death = (
                    f"the server process exited with code {self.server.process.returncode} "
                    f"{when}; the rest of the suite cannot run. Its last log lines:\n{tail}"
                )

    def send(self, call: Call, timeout: float = CALL_TIMEOUT_S) -> Outcome:
        """Send `call` with a deadline; its status, message and response (None if not OK)."""
        self.require_alive()
        with self._lock:
            self.sent += call.messages
        try:
            outcome = Outcome(Code.OK, "", self._invoke(call, timeout))
        except grpc.RpcError as exc:
            outcome = Outcome(exc.code(), exc.details() or "", None)
        with self._lock:
            self.tally[f"{call.label} {outcome.code.name}"] += 1
            for name in _message_codes(call, outcome):
                self.tally[f"{call.label} message {name}"] += 1
        if outcome.code == Code.UNAVAILABLE:
            self._check_exit(call)
        return outcome

    def count_generated(self, test: str, call: Call, outcome: Outcome) -> None:
        """Count the answer to a request generated by `test` for `generated_table`."""
        with self._lock:
            self.generated[(test, call.label, call.valid, outcome.code.name)] += 1
            for name in _message_codes(call, outcome):
                self.generated[(test, f"{call.label} message", False, name)] += 1

    def generated_table(self) -> str:
        """Per test and RPC: generated requests, how many were built valid, how many got OK."""
        lines = []
        for test in sorted({key[0] for key in self.generated}):
            title = f"generated by {test}"
            lines.append(f"  {title:<40} {'sent':>5} {'built valid':>11} {'OK':>5} {'OK %':>5}")
            for label in sorted({key[1] for key in self.generated if key[0] == test}):
                rows = {k: n for k, n in self.generated.items() if k[:2] == (test, label)}
                sent = sum(rows.values())
                valid = sum(n for (_, _, built, _), n in rows.items() if built)
                ok = sum(n for (_, _, _, code), n in rows.items() if code == "OK")
                share = f"{100 * ok / sent:.0f}%"
                lines.append(f"  {label:<40} {sent:>5} {valid:>11} {ok:>5} {share:>5}")
        return "\n".join(lines)

    def _invoke(self, call: Call, timeout: float) -> Any:
        if isinstance(call.request, bytes):
            method = self.channel.unary_unary(
                f"/convserve.v1.ConvServe/{call.rpc}",
                response_deserializer=_RESPONSES[call.rpc].FromString,
            )
            return method(call.request, timeout=timeout)
        stub = self._stubs["tfserving-model" if call.rpc == "GetModelStatus" else call.protocol]
        if call.rpc == "PredictStream":
            return list(stub.PredictStream(iter(call.request), timeout=timeout))
        return getattr(stub, call.rpc)(call.request, timeout=timeout)

    def _check_exit(self, call: Call) -> None:
        # UNAVAILABLE from a live server is a plain failure; from a dying one it
        # comes just before the exit.
        try:
            self.server.process.wait(timeout=5)
        except Exception:
            return
        self._died(f"while {call.label} was in flight (request: {call.describe()})")
        raise ServerDied(self.death)


def _message_codes(call: Call, outcome: Outcome) -> list[str]:
    """The status code names of a stream's answers, one per message (none for other RPCs)."""
    if call.rpc != "PredictStream" or outcome.code != Code.OK:
        return []
    return [
        Code.OK.name
        if answer.WhichOneof("result") == "response"
        else _CODE_NAMES.get(answer.error.code, str(answer.error.code))
        for answer in outcome.response
    ]


_CODE_NAMES = {code.value[0]: code.name for code in Code}


def check_answer(call: Call, outcome: Outcome) -> None:
    """The rule for hostile requests: OK or a client error, with a short message;
    a stream answers every request with its id, an error answer with a client error."""
    shown = outcome.details if len(outcome.details) < 200 else outcome.details[:200] + "…"
    where = f"{call.label} -> {outcome.code.name} {shown!r}\n  request: {call.describe()}"
    assert outcome.code in ALLOWED, f"forbidden status: {where}"
    # gRPC's own answer when the status message overflows the trailers.
    assert "metadata size exceeds" not in outcome.details, f"status message too long: {where}"
    assert len(outcome.details) < MAX_MESSAGE_CHARS, (
        f"status message of {len(outcome.details)} characters: {where}"
    )
    if call.rpc != "PredictStream" or outcome.code != Code.OK:
        return
    ids = [m.id for m in call.request]
    answers = outcome.response
    assert sorted(a.id for a in answers) == sorted(ids), f"stream answers {answers!r}: {where}"
    allowed_numbers = {code.value[0] for code in CLIENT_ERRORS}
    for answer in answers:
        if answer.WhichOneof("result") == "error":
            code, text = answer.error.code, answer.error.message
            assert code in allowed_numbers, f"stream answer with code {code} {text!r}: {where}"
            assert len(text) < MAX_MESSAGE_CHARS, f"stream answer of {len(text)} chars: {where}"
        else:
            assert answer.WhichOneof("result") == "response", f"empty stream answer: {where}"


def check_call(call: Call, outcome: Outcome) -> None:
    """`check_answer`, and for a call built valid: OK, and the answer it must be."""
    check_answer(call, outcome)
    if call.valid:
        assert outcome.code == Code.OK, (
            f"valid {call.label} -> {outcome.code.name} {outcome.details[:300]!r}\n"
            f"  request: {call.describe()}"
        )
    if call.check is not None and outcome.code == Code.OK:
        try:
            call.check(outcome.response)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n  {call.label} request: {call.describe()}") from None


def _mixed(
    valid: Callable[[Reference], st.SearchStrategy[Any]],
    hostile: Callable[[], st.SearchStrategy[Any]],
    percent: int = VALID_PERCENT,
) -> Callable[[Reference], st.SearchStrategy[Any]]:
    return lambda ref: either(valid(ref), hostile(), percent)


def _model_requests(message: Any) -> tuple[Any, Any]:
    return (
        lambda _: oip_valid_model_requests(message),
        lambda: oip_model_requests(message),
    )


# Each entry: an id, the protocol, the RPC and its request strategy given the reference.
RPCS: tuple[tuple[str, str, str, Callable[[Reference], st.SearchStrategy[Any]]], ...] = (
    ("cs-Predict", "convserve", "Predict", _mixed(cs_valid_predicts, cs_predict_requests, 25)),
    ("cs-PredictStream", "convserve", "PredictStream", cs_streams),
    (
        "cs-Convolve",
        "convserve",
        "Convolve",
        _mixed(lambda _: cs_valid_convolves(), cs_convolve_requests),
    ),
    (
        "cs-FitKernel",
        "convserve",
        "FitKernel",
        _mixed(lambda _: cs_valid_fits(), cs_fit_kernel_requests),
    ),
    (
        "cs-GetFeatureMaps",
        "convserve",
        "GetFeatureMaps",
        _mixed(cs_valid_feature_maps, cs_feature_maps_requests),
    ),
    (
        "cs-GetModelMetadata",
        "convserve",
        "GetModelMetadata",
        _mixed(lambda _: cs_valid_metadata(), cs_metadata_requests),
    ),
    (
        "oip-ModelInfer",
        "oip",
        "ModelInfer",
        _mixed(oip_valid_digit_infers, oip_digit_infer_requests),
    ),
    (
        "oip-ModelInfer-conv2d",
        "oip",
        "ModelInfer",
        _mixed(lambda _: oip_valid_conv_infers(), oip_conv_infer_requests),
    ),
    (
        "oip-ModelMetadata",
        "oip",
        "ModelMetadata",
        _mixed(*_model_requests(service_pb2.ModelMetadataRequest)),
    ),
    (
        "oip-ModelReady",
        "oip",
        "ModelReady",
        _mixed(*_model_requests(service_pb2.ModelReadyRequest)),
    ),
    ("tf-Predict", "tfserving", "Predict", _mixed(tf_valid_predicts, tf_predict_requests, 35)),
    (
        "tf-GetModelMetadata",
        "tfserving",
        "GetModelMetadata",
        _mixed(lambda _: tf_valid_metadata(), tf_metadata_requests, 55),
    ),
    (
        "tf-GetModelStatus",
        "tfserving",
        "GetModelStatus",
        _mixed(lambda _: tf_valid_status(), tf_status_requests),
    ),
)


@st.composite
def calls(
    draw: st.DrawFn,
    protocol: str,
    rpc: str,
    strategy: st.SearchStrategy[Any],
) -> Call:
    """A `Call` of `rpc` with a request from `strategy` (shown by `Call.describe` on failure)."""
    drawn = draw(strategy)
    if isinstance(drawn, Expect):
        return Call(protocol, rpc, drawn.request, check=drawn.check, valid=drawn.valid)
    return Call(protocol, rpc, drawn)


def rpc_calls(entry: tuple[str, str, str, Any], ref: Reference) -> st.SearchStrategy[Call]:
    """The calls of one `RPCS` entry."""
    _, protocol, rpc, strategy = entry
    return calls(protocol, rpc, strategy(ref))


def any_calls(ref: Reference) -> st.SearchStrategy[Call]:
    """A request of any RPC of any protocol (a share of them built valid)."""
    return st.one_of([rpc_calls(entry, ref) for entry in RPCS])


# -- raw wire encoding (values the generated classes refuse to set) -----------


def wire_varints(field_number: int, values: Sequence[int]) -> bytes:
    """Unpacked varint entries of a scalar field (parsers accept packed or not)."""
    return b"".join(varint(field_number << 3) + varint(v) for v in values)


def wire_message(field_number: int, payload: bytes) -> bytes:
    """An embedded message field; appended to a message, parsers merge it in."""
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload


# -- valid requests and their answers -------------------------------------------


def corr2d(x: np.ndarray, k: np.ndarray, stride: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Cross-correlation with VALID padding, the textbook loop (the reference)."""
    h, w = x.shape[0] - k.shape[0] + 1, x.shape[1] - k.shape[1] + 1
    y = np.array(
        [
            [np.sum(x[i : i + k.shape[0], j : j + k.shape[1]] * k) for j in range(w)]
            for i in range(h)
        ]
    )
    return y[:: stride[0], :: stride[1]]


def cs_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(
        dtype=_CS_DTYPE[array.dtype.name], shape=array.shape, content=little_bytes(array)
    )


def valid_predict(protocol: str, images: np.ndarray) -> Call:
    """A valid digit request (uint8 [N,28,28]) in `protocol`'s form."""
    if protocol == "convserve":
        request: Any = convserve_pb2.PredictRequest(images=cs_tensor(images))
        return Call(protocol, "Predict", request)
    if protocol == "oip":
        request = service_pb2.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
        request.raw_input_contents.append(little_bytes(images))
        return Call(protocol, "ModelInfer", request)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "predict_uint8"
    request.inputs["images"].CopyFrom(
        tf_tensor_pb2.TensorProto(
            dtype=types_pb2.DT_UINT8,
            tensor_shape=tf_shape(images.shape),
            tensor_content=images.tobytes(),
        )
    )
    return Call(protocol, "Predict", request)


def probabilities_of(call: Call, response: Any) -> np.ndarray:
    """The [N,10] probabilities of a valid predict call's response."""
    if call.protocol == "convserve":
        content = response.probabilities.content
    elif call.protocol == "oip":
        names = [out.name for out in response.outputs]
        content = response.raw_output_contents[names.index("probabilities")]
    else:
        content = response.outputs["probabilities"].tensor_content
    return np.frombuffer(content, dtype="<f4").reshape(-1, 10)


def valid_convolve(protocol: str, x: np.ndarray, k: np.ndarray) -> Call:
    """A valid [H,W] cross-correlation request (float32 or float64) in `protocol`'s form."""
    if protocol == "convserve":
        request: Any = convserve_pb2.ConvolveRequest(input=cs_tensor(x), kernel=cs_tensor(k))
        return Call(protocol, "Convolve", request)
    request = service_pb2.ModelInferRequest(model_name=CONV_MODEL)
    for name, array in (("input", x), ("kernel", k)):
        datatype = _OIP_DATATYPE[array.dtype.name]
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(little_bytes(array))
    return Call(protocol, "ModelInfer", request)


def convolution_of(call: Call, response: Any, dtype: str = "float64") -> np.ndarray:
    """The output of a convolve call's response (either protocol), which must be `dtype`."""
    if call.protocol == "convserve":
        out = response.output
        assert out.dtype == _CS_DTYPE[dtype], f"{dtype} output expected, got dtype {out.dtype}"
        content, shape = out.content, out.shape
    else:
        (tensor,) = response.outputs
        expected = _OIP_DATATYPE[dtype]
        assert tensor.datatype == expected, f"{expected} output expected: {tensor.datatype}"
        content, shape = response.raw_output_contents[0], tensor.shape
    return np.frombuffer(content, dtype=np.dtype(dtype).newbyteorder("<")).reshape(tuple(shape))
