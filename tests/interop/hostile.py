"""Hostile requests for all three protocols, and the client that checks every answer.

`Target` sends a `Call` (one RPC of convserve.v1, the Open Inference Protocol or
TF Serving, as a generated message or as raw wire bytes) to a server child
process and notices when the process dies. `check_answer` holds the rule every
answer to a hostile request must keep: OK or a client-error status, with a short
message. The hypothesis strategies build structurally valid messages whose
fields take normal and extreme values (int64 limits, huge shapes, NaN/Inf,
wrong dtypes and byte lengths, empty and 9,000-character strings, unknown enum
values).
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
def cs_stream_requests(draw: st.DrawFn) -> list[convserve_pb2.PredictStreamRequest]:
    count = draw(st.integers(1, 4))
    ids = draw(st.lists(uint64s(), min_size=count, max_size=count))
    return [
        convserve_pb2.PredictStreamRequest(id=i, request=draw(cs_predict_requests())) for i in ids
    ]


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
            ((5, 5), (3, 3), (2, 2)),
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
        spec.version_label = draw(st.sampled_from(("stable", "latest", "", "canary", LONG)))
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


# -- calls ---------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request of one RPC. `request` is a message, a list of messages (PredictStream)
    or raw wire bytes (then `note` says what they encode)."""

    protocol: str
    rpc: str
    request: Any
    note: str = ""

    def __repr__(self) -> str:
        return f"Call({self.label}: {self.describe()})"

    @property
    def label(self) -> str:
        return f"{self.protocol} {self.rpc}"

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
    # Answers by "protocol rpc code", to show what the suite reached.
    tally: Counter[str] = field(default_factory=Counter)
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
        if outcome.code == Code.UNAVAILABLE:
            self._check_exit(call)
        return outcome

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


RPCS: tuple[tuple[str, str, Callable[[], st.SearchStrategy[Any]]], ...] = (
    ("convserve", "Predict", cs_predict_requests),
    ("convserve", "PredictStream", cs_stream_requests),
    ("convserve", "Convolve", cs_convolve_requests),
    ("convserve", "FitKernel", cs_fit_kernel_requests),
    ("convserve", "GetFeatureMaps", cs_feature_maps_requests),
    ("convserve", "GetModelMetadata", cs_metadata_requests),
    ("oip", "ModelInfer", oip_digit_infer_requests),
    ("oip", "ModelInfer", oip_conv_infer_requests),
    ("oip", "ModelMetadata", lambda: oip_model_requests(service_pb2.ModelMetadataRequest)),
    ("oip", "ModelReady", lambda: oip_model_requests(service_pb2.ModelReadyRequest)),
    ("tfserving", "Predict", tf_predict_requests),
    ("tfserving", "GetModelMetadata", tf_metadata_requests),
    ("tfserving", "GetModelStatus", tf_status_requests),
)


@st.composite
def calls(
    draw: st.DrawFn, protocol: str, rpc: str, strategy: Callable[[], st.SearchStrategy[Any]]
) -> Call:
    """A `Call` of `rpc` with a request from `strategy` (shown by `Call.describe` on failure)."""
    return Call(protocol, rpc, draw(strategy()))


def any_calls() -> st.SearchStrategy[Call]:
    """A hostile request of any RPC of any protocol."""
    return st.one_of([calls(*entry) for entry in RPCS])


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
