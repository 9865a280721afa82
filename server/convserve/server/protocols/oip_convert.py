"""Open Inference Protocol (KServe v2) messages <-> convserve's typed values.

Pure functions: nothing here talks to the network or the runtime. Messages are
tritonclient's generated ``inference.*`` classes (``tritonclient.grpc.service_pb2``).

About 650 lines, a fifth of them the description below: one converter per
message of one protocol, kept together so each answer's shape sits beside its
request's.

Models as the protocol sees them
--------------------------------
Each configured image classifier, by its name (``model_name`` ``""``: the
default model). [H,W,C] is the model's input shape and K its class count
(ModelMetadata; [28,28,1] and 10 for MNIST):

- versions: the loaded model versions as decimal strings; ``model_version``
  ``""`` means the serving version, ``"3"`` pins version 3.
- input ``images``: UINT8 in [0, 255] or FP32 in [0, 1], shape
  ``[-1,H,W,C]`` (single-channel models also take ``[N,H,W]`` and ``[N,H*W]``).
- outputs ``probabilities`` FP32 ``[N,K]`` and ``digits`` INT32 ``[N]`` (the
  most likely class index, as ``convserve.v1.PredictResponse.digits``), and,
  only when requested by name, ``labels`` BYTES ``[N]``: the most likely
  class's name (its index as text when the model names none).

``conv2d`` (`CONV_MODEL`), 2-D convolution with an arbitrary kernel, version ``"1"``:

- inputs ``input`` ([H,W] or [N,H,W,C]), ``kernel`` ([kh,kw] or [kh,kw,C,F]) and
  optional ``bias`` ([F]); FP32 or FP64, all three the same datatype.
- output ``output``: the input's datatype, [H',W'] or [N,H',W',F].
- request parameters (all optional), each a ``string_param`` or an ``int64_param``:
  ``strides`` and ``dilations`` (``"2,1"``, ``"2"`` or 2: default 1),
  ``padding`` (``"VALID"`` (default), ``"SAME"`` or ``"EXPLICIT"``),
  ``explicit_padding`` (``"top,bottom,left,right"`` or one int for all four;
  only with EXPLICIT) and ``mode`` (``"CROSS_CORRELATION"`` (default) or
  ``"CONVOLUTION"``). Names and values are as in ``convserve.v1.ConvolutionOptions``.

Wire conventions: an input's data comes either from ``raw_input_contents``
(one entry per input, little-endian, C order) or from the typed
``contents`` field of its datatype (``uint_contents`` for UINT8,
``fp32_contents``, ``fp64_contents``). The response uses raw output contents
exactly when the request used raw input contents (BYTES elements as Triton
writes them: a 4-byte little-endian length, then the bytes). Requested outputs
select and order the outputs; an empty list means every output but ``labels``.
The request id is echoed.

Typed contents are read and written as the packed bytes protobuf carries them
(`packed_payload`, `packed_field`), never element by element: a Python loop
over tens of millions of values would hold the GIL for seconds.

Every number that reaches numpy or TensorFlow is range-checked here first:
versions are positive and fit int64, ``strides`` and ``dilations`` are in
[1, 2**31-1], ``explicit_padding`` in [0, 2**31-1], shapes have at most
`MAX_RANK` dimensions and must match the data's length before anything is
allocated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2

from convserve.server import errors, types
from convserve.server.protocols.wire import (
    WireReader,
    fixed_values,
    largest_varint,
    packed_field,
    packed_payload,
    small_varints,
    typed_limit_deserializer,
    varint_values,
)
from convserve.v1 import tensor_pb2
from convserve.v1.tensor_codec import DTYPE_TO_PROTO, from_tensor

CONV_MODEL = "conv2d"
CONV_VERSION = "1"
DIGIT_INPUT = "images"
DIGIT_OUTPUTS = ("probabilities", "digits")
# Returned only when requested: names are strings, which most clients have no use for.
LABELS_OUTPUT = "labels"
PREDICT_OUTPUTS = (*DIGIT_OUTPUTS, LABELS_OUTPUT)
CONV_INPUTS = ("input", "kernel", "bias")
CONV_OUTPUTS = ("output",)
CONV_PARAMETERS = ("strides", "dilations", "padding", "explicit_padding", "mode")
# Triton's scheduling hints, which tritonclient sends when asked; convserve
# schedules by the gRPC deadline alone, so they are accepted and ignored.
IGNORED_PARAMETERS = ("priority", "timeout")

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
# No model takes more than four dimensions; the bound keeps shapes (and the
# messages that quote them) small.
MAX_RANK = 8
# "top,bottom,left,right" of 10-digit numbers fits easily.
MAX_PARAMETER_CHARS = 64
_DECIMAL = re.compile(r"[0-9]+")

DATATYPES: dict[str, np.dtype] = {
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DATATYPE_OF: dict[np.dtype, str] = {v: k for k, v in DATATYPES.items()}
# The typed `contents` field that carries each datatype's values.
CONTENTS_FIELD = {
    "UINT8": "uint_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_CONTENTS_NUMBER = {
    datatype: service_pb2.InferTensorContents.DESCRIPTOR.fields_by_name[name].number
    for datatype, name in CONTENTS_FIELD.items()
}


@dataclass(frozen=True)
class InferInputs:
    """The decoded input tensors of a ModelInferRequest, by name."""

    arrays: dict[str, np.ndarray]
    raw: bool  # the data came in raw_input_contents


def shown_names(names: Collection[str], limit: int = 5) -> str:
    """Client-chosen names for a message: each shortened, at most `limit` of them."""
    ordered = sorted(names)
    text = ", ".join(errors.shown(name) for name in ordered[:limit])
    if len(ordered) > limit:
        text += f" and {len(ordered) - limit} more"
    return text


_INFER_INPUTS = service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["inputs"].number
_INPUT_CONTENTS = service_pb2.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields_by_name[
    "contents"
].number


def infer_typed_payloads(reader: WireReader) -> Iterator[tuple[str, int]]:
    """``(inputs[i].contents, bytes)`` for each input of a serialized ModelInferRequest:
    its `contents` message holds nothing but typed values."""
    index = 0
    for field in reader.fields(0, len(reader.data)):
        if field.number != _INFER_INPUTS or not field.length_delimited:
            continue  # a mistyped field is an unknown field to protobuf
        size = sum(
            part.end - part.start
            for part in reader.fields(field.start, field.end)
            if part.number == _INPUT_CONTENTS and part.length_delimited
        )
        yield f"inputs[{index}].contents", size
        index += 1


def infer_request_deserializer(limit: int) -> Callable[[bytes], Any]:
    """ModelInferRequest's deserializer: typed contents of more than `limit` bytes in all
    are refused unparsed (`wire.typed_limit_deserializer`)."""
    return typed_limit_deserializer(
        service_pb2.ModelInferRequest,
        infer_typed_payloads,
        limit,
        "contents.*",
        "raw_input_contents",
    )


# -- requests -----------------------------------------------------------------


def request_bytes(request: Any) -> int:
    """About how many bytes converting a ModelInferRequest goes through, without
    serializing it (ByteSize would: as long as converting it)."""
    total = sum(len(raw) for raw in request.raw_input_contents)
    for tensor in request.inputs:
        for _, values in tensor.contents.ListFields():
            total += 8 * len(values)
    # Each entry of these costs a little Python work.
    return total + 64 * (len(request.inputs) + len(request.outputs) + len(request.parameters))


def parse_version(text: str, field: str = "model_version") -> int | None:
    """``""`` -> None (the serving version); ``"3"`` -> 3; InvalidArgument unless a
    positive decimal number that fits int64."""
    if text == "":
        return None
    version = 0
    if len(text) <= 32 and _DECIMAL.fullmatch(text):
        version = int(text)
    # Versions are positive, as in convserve.v1's ModelSpec (an int64).
    if not 1 <= version <= INT64_MAX:
        raise errors.InvalidArgument(
            field,
            "a positive version number that fits int64 (e.g. '1') or empty expected, "
            f"got {errors.shown(text)}",
        )
    return version


def model_ref(name: str, version: str, field: str = "model_version") -> types.ModelRef:
    """The model a request names; an empty name means the default model."""
    return types.ModelRef(name=name or None, version=parse_version(version, field))


def _typed_values(field: str, datatype: str, contents: Any) -> np.ndarray:
    expected = CONTENTS_FIELD[datatype]
    present = [f.name for f, _ in contents.ListFields()]
    if present != [expected]:
        raise errors.InvalidArgument(
            field,
            f"{datatype} values expected in contents.{expected} (or in raw_input_contents), "
            f"got {', '.join('contents.' + p for p in present) or 'no data'}",
        )
    payload = packed_payload(contents.SerializeToString(), _CONTENTS_NUMBER[datatype], field)
    dtype = DATATYPES[datatype]
    if datatype in ("FP32", "FP64"):
        return fixed_values(payload, dtype, field)
    if datatype == "UINT8":
        values = small_varints(payload)
        if values is None:
            raise errors.InvalidArgument(
                field, f"UINT8 values in [0, 255] expected, got {largest_varint(payload, field)}"
            )
        return values
    return varint_values(payload, dtype, field)


def _shape(field: str, dims: Sequence[int]) -> list[int]:
    if len(dims) > MAX_RANK:
        raise errors.InvalidArgument(
            f"{field}.shape", f"at most {MAX_RANK} dimensions expected, got {len(dims)}"
        )
    return [int(d) for d in dims]


def _array(field: str, datatype: str, shape: Sequence[int], data: bytes) -> np.ndarray:
    """Checks shape and byte length exactly as convserve.v1 tensors are checked."""
    dtype = DATATYPES[datatype]
    tensor = tensor_pb2.Tensor(dtype=DTYPE_TO_PROTO[dtype], shape=shape, content=data)
    return from_tensor(tensor, field)


def decode_inputs(
    request: Any, accepted: dict[str, tuple[str, ...]], required: Iterable[str]
) -> InferInputs:
    """Decode `request.inputs` to arrays (read-only).

    `accepted` maps each input name the model takes to its accepted
    datatypes; every name in `required` must be present. Raises
    InvalidArgument naming the input and what was expected.
    """
    raw_count = len(request.raw_input_contents)
    raw = raw_count > 0
    if raw and raw_count != len(request.inputs):
        raise errors.InvalidArgument(
            "raw_input_contents",
            f"one entry per input expected ({len(request.inputs)}), got {raw_count}",
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name not in accepted:
            raise errors.InvalidArgument(
                f"inputs[{index}]",
                f"one of the inputs {', '.join(accepted)} expected, got {errors.shown(name)}",
            )
        field = f"inputs[{name}]"
        if name in arrays:
            raise errors.InvalidArgument(field, "each input at most once expected")
        if tensor.datatype not in accepted[name]:
            raise errors.InvalidArgument(
                f"{field}.datatype",
                f"{' or '.join(accepted[name])} expected, "
                f"got {errors.shown(tensor.datatype or 'none')}",
            )
        if len(tensor.parameters):
            raise errors.InvalidArgument(
                f"{field}.parameters",
                "no input parameters expected (shared memory is not supported), got "
                + shown_names(tensor.parameters),
            )
        shape = _shape(field, tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise errors.InvalidArgument(
                    f"{field}.contents",
                    "no typed contents expected when the request uses raw_input_contents",
                )
            arrays[name] = _array(field, tensor.datatype, shape, request.raw_input_contents[index])
            continue
        values = _typed_values(f"{field}.contents", tensor.datatype, tensor.contents)
        if shape and all(d > 0 for d in shape) and values.size != math.prod(shape):
            raise errors.InvalidArgument(
                f"{field}.contents",
                f"{math.prod(shape)} values expected for shape {shape}, got {values.size}",
            )
        little = values.astype(values.dtype.newbyteorder("<"), copy=False)
        arrays[name] = _array(field, tensor.datatype, shape, little.tobytes())
    for name in required:
        if name not in arrays:
            raise errors.InvalidArgument(f"inputs[{name}]", "this input is required")
    return InferInputs(arrays, raw)


def requested_outputs(
    request: Any, available: Sequence[str], default: Sequence[str] | None = None
) -> list[str]:
    """The output names to return, in order; none requested means `default` (all of
    `available` when None)."""
    if not request.outputs:
        return list(available if default is None else default)
    names: list[str] = []
    for index, out in enumerate(request.outputs):
        if out.name not in available:
            raise errors.InvalidArgument(
                f"outputs[{index}]",
                f"one of the outputs {', '.join(available)} expected, got {errors.shown(out.name)}",
            )
        field = f"outputs[{out.name}]"
        if out.name in names:
            raise errors.InvalidArgument(field, "each output at most once expected")
        # binary_data is the HTTP protocol's flag; over gRPC it means nothing.
        unsupported = set(out.parameters) - {"binary_data"}
        if unsupported:
            raise errors.InvalidArgument(
                f"{field}.parameters",
                "no output parameters expected (classification and shared memory are not "
                f"supported), got {shown_names(unsupported)}",
            )
        names.append(out.name)
    return names


def _check_no_parameters(request: Any, allowed: Sequence[str]) -> None:
    unknown = set(request.parameters) - set(allowed) - set(IGNORED_PARAMETERS)
    if unknown:
        expected = ", ".join(allowed) if allowed else "none for this model"
        raise errors.InvalidArgument(
            "parameters",
            f"known request parameters expected ({expected}), got {shown_names(unknown)}",
        )


def predict_request(request: Any) -> tuple[np.ndarray, types.ModelRef, list[str], bool]:
    """An image-classifier ModelInferRequest -> (images as sent, model, outputs, raw).

    The images still need the runtime's check against the model (shape, range,
    limits).
    """
    ref = model_ref(request.model_name, request.model_version)
    _check_no_parameters(request, ())
    inputs = decode_inputs(request, {DIGIT_INPUT: ("UINT8", "FP32")}, (DIGIT_INPUT,))
    outputs = requested_outputs(request, PREDICT_OUTPUTS, DIGIT_OUTPUTS)
    return inputs.arrays[DIGIT_INPUT], ref, outputs, inputs.raw


def _int_list(field: str, param: Any) -> list[int]:
    kind = param.WhichOneof("parameter_choice")
    if kind == "int64_param":
        return [int(param.int64_param)]
    if kind == "string_param":
        text = param.string_param
        # Short strings only: the longest sensible value is four 10-digit numbers.
        if len(text) <= MAX_PARAMETER_CHARS:
            try:
                return [int(part) for part in text.split(",")]
            except ValueError:
                pass
    raise errors.InvalidArgument(
        field,
        "comma-separated integers as a string (e.g. '2,2') or one int64 expected, got "
        + errors.shown(getattr(param, kind) if kind else None),
    )


def _in_range(field: str, values: Sequence[int], low: int, high: int) -> None:
    # Checked here, before TensorFlow sees them: it aborts the process on some
    # integers that do not fit its int32 attributes.
    if any(not low <= v <= high for v in values):
        raise errors.InvalidArgument(
            field, f"integers in [{low}, {high}] expected, got {errors.shown(list(values))}"
        )


def _pair(field: str, param: Any) -> tuple[int, int]:
    values = _int_list(field, param)
    if len(values) not in (1, 2):
        raise errors.InvalidArgument(
            field, f"one or two integers expected, got {errors.shown(values)}"
        )
    _in_range(field, values, 1, INT32_MAX)
    return values[0], values[-1]


def _choice(field: str, param: Any, choices: Sequence[str]) -> str:
    kind = param.WhichOneof("parameter_choice")
    if kind == "string_param":
        value = param.string_param.upper()
        if value in choices:
            return value
        got = errors.shown(param.string_param)
    else:
        got = f"a non-string parameter ({kind})"
    raise errors.InvalidArgument(field, f"one of {', '.join(choices)} expected, got {got}")


def convolution_options(parameters: Any) -> types.ConvolutionOptions:
    """The conv2d request parameters -> ConvolutionOptions (see the module docstring)."""
    options: dict[str, Any] = {}
    if "strides" in parameters:
        options["strides"] = _pair("parameters.strides", parameters["strides"])
    if "dilations" in parameters:
        options["dilations"] = _pair("parameters.dilations", parameters["dilations"])
    if "padding" in parameters:
        options["padding"] = _choice(
            "parameters.padding", parameters["padding"], ("VALID", "SAME", "EXPLICIT")
        )
    if "explicit_padding" in parameters:
        field = "parameters.explicit_padding"
        pads = _int_list(field, parameters["explicit_padding"])
        if len(pads) == 1:
            pads = pads * 4
        if len(pads) != 4:
            raise errors.InvalidArgument(
                field,
                "four integers 'top,bottom,left,right' (or one) expected, "
                f"got {errors.shown(pads)}",
            )
        _in_range(field, pads, 0, INT32_MAX)
        options["explicit_padding"] = (pads[0], pads[1], pads[2], pads[3])
    if "mode" in parameters:
        options["mode"] = _choice(
            "parameters.mode", parameters["mode"], ("CROSS_CORRELATION", "CONVOLUTION")
        )
    return types.ConvolutionOptions(**options)


def check_conv_version(version: str) -> None:
    """conv2d has one version; any other raises NotFound (InvalidArgument if not a number)."""
    if parse_version(version) not in (None, int(CONV_VERSION)):
        raise errors.NotFound(
            f"model {CONV_MODEL!r} has only version {CONV_VERSION}, got {errors.shown(version)}"
        )


def convolve_request(request: Any) -> tuple[types.ConvolveInput, bool]:
    """A conv2d ModelInferRequest -> (convolution, raw); its one output is always returned."""
    check_conv_version(request.model_version)
    _check_no_parameters(request, CONV_PARAMETERS)
    floats = ("FP32", "FP64")
    inputs = decode_inputs(request, {name: floats for name in CONV_INPUTS}, ("input", "kernel"))
    options = convolution_options(request.parameters)
    requested_outputs(request, CONV_OUTPUTS)
    arrays = inputs.arrays
    value = types.ConvolveInput(
        input=arrays["input"], kernel=arrays["kernel"], bias=arrays.get("bias"), options=options
    )
    return value, inputs.raw


# -- responses ----------------------------------------------------------------


def _add_output(response: Any, name: str, array: np.ndarray, raw: bool) -> None:
    datatype = DATATYPE_OF[array.dtype.newbyteorder("=")]
    tensor = response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    if raw:
        response.raw_output_contents.append(little.tobytes())
    elif datatype in ("FP32", "FP64"):
        # Packed little-endian bytes are exactly what the field holds on the wire.
        payload = little.reshape(-1).view(np.uint8).data
        tensor.contents.MergeFromString(packed_field(_CONTENTS_NUMBER[datatype], payload))
    else:
        # Varint fields (only the small `digits` output) take the values themselves.
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.ravel().tolist())


def _add_bytes_output(response: Any, name: str, values: Sequence[str], raw: bool) -> None:
    """A BYTES output of shape [len(values)], each value UTF-8 encoded."""
    encoded = [value.encode() for value in values]
    tensor = response.outputs.add(name=name, datatype="BYTES", shape=[len(encoded)])
    if raw:
        response.raw_output_contents.append(
            b"".join(len(item).to_bytes(4, "little") + item for item in encoded)
        )
    else:
        tensor.contents.bytes_contents.extend(encoded)


Output = tuple[str, np.ndarray | Sequence[str]]


def infer_response(
    request: Any,
    model_name: str,
    model_version: str,
    outputs: Sequence[Output],
    raw: bool,
) -> Any:
    """A ModelInferResponse carrying `outputs` in order, echoing the request id. An
    output given as an array is numeric; one given as strings is BYTES."""
    response = service_pb2.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request.id
    )
    for name, values in outputs:
        if isinstance(values, np.ndarray):
            _add_output(response, name, values, raw)
        else:
            _add_bytes_output(response, name, values, raw)
    return response


def predict_response(
    request: Any, result: types.PredictOutput, names: Sequence[str], raw: bool
) -> Any:
    """An image classifier's ModelInferResponse for the requested output `names`."""
    values: dict[str, Callable[[], np.ndarray | Sequence[str]]] = {
        "probabilities": lambda: result.probabilities,
        "digits": lambda: result.digits,
        LABELS_OUTPUT: lambda: result.labels,
    }
    return infer_response(
        request,
        result.model_name,
        str(result.model_version),
        [(name, values[name]()) for name in names],
        raw,
    )


def convolve_response(request: Any, result: types.ConvolveOutput, raw: bool) -> Any:
    """The conv2d model's ModelInferResponse."""
    return infer_response(request, CONV_MODEL, CONV_VERSION, [("output", result.output)], raw)


def datatype_of(dtype_name: str) -> str:
    """A numpy dtype name as the model metadata gives it -> its OIP datatype ("uint8": "UINT8")."""
    return DATATYPE_OF[np.dtype(dtype_name)]


def _first_spec(specs: Sequence[types.TensorSpecInfo], what: str) -> types.TensorSpecInfo:
    # An image classifier has one image input and one probability output.
    if not specs:
        raise errors.Internal(f"the model's metadata describes no {what}")
    return specs[0]


def model_metadata_response(meta: types.ModelMetadata, version: int | None) -> Any:
    """An image classifier's ModelMetadataResponse, its shapes the model's own:
    ``images`` [-1,H,W,C], ``probabilities`` [-1,K], ``digits`` and ``labels`` [-1].

    `version` (a pinned, loaded version) lists only that version; None lists
    every loaded version. The input is declared with the model's first dtype
    (UINT8, the smallest on the wire); FP32 is accepted as well.
    """
    versions = [version] if version is not None else list(meta.loaded_versions)
    response = service_pb2.ModelMetadataResponse(
        name=meta.model_name,
        versions=[str(v) for v in versions],
        platform="tensorflow_savedmodel",
    )
    images = _first_spec(meta.inputs, "input")
    probabilities = _first_spec(meta.outputs, "output")
    response.inputs.add(
        name=DIGIT_INPUT, datatype=datatype_of(images.dtypes[0]), shape=list(images.shape)
    )
    response.outputs.add(
        name="probabilities",
        datatype=datatype_of(probabilities.dtypes[0]),
        shape=list(probabilities.shape),
    )
    response.outputs.add(name="digits", datatype="INT32", shape=[-1])
    response.outputs.add(name=LABELS_OUTPUT, datatype="BYTES", shape=[-1])
    return response


def conv_metadata_response() -> Any:
    """The conv2d model's ModelMetadataResponse (FP64 is accepted wherever FP32 is listed)."""
    response = service_pb2.ModelMetadataResponse(
        name=CONV_MODEL, versions=[CONV_VERSION], platform="convserve"
    )
    response.inputs.add(name="input", datatype="FP32", shape=[-1, -1, -1, -1])
    response.inputs.add(name="kernel", datatype="FP32", shape=[-1, -1, -1, -1])
    response.inputs.add(name="bias", datatype="FP32", shape=[-1])
    response.outputs.add(name="output", datatype="FP32", shape=[-1, -1, -1, -1])
    return response


# -- the model repository ------------------------------------------------------

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


def check_repository_name(name: str) -> None:
    """convserve has one model repository, which an empty name means."""
    if name:
        raise errors.InvalidArgument(
            "repository_name",
            f"empty expected (convserve serves one model repository), got {errors.shown(name)}",
        )


def unavailable_reason(status: types.ModelStatus) -> str:
    """Why a model that is not ready cannot serve, from its versions' states."""
    failed = [f"version {v.version}: {v.error}" for v in status.versions if v.error]
    if failed:
        return "; ".join(failed)
    serving = [v for v in status.versions if v.serving]
    if serving:
        return f"version {serving[0].version} is {serving[0].state} but cannot serve"
    if not status.versions:
        return "no version found"
    states = ", ".join(f"{v.version} {v.state}" for v in status.versions)
    return f"no version serves yet (versions: {states})"


def _index_version(status: types.ModelStatus) -> str:
    # The serving version; else the newest one, which is the one being loaded or refused.
    serving = [v.version for v in status.versions if v.serving]
    known = serving or [v.version for v in status.versions]
    return str(max(known)) if known else ""


def repository_index_response(
    models: Sequence[types.ModelStatus], conv_ready: bool, ready_only: bool
) -> Any:
    """A RepositoryIndexResponse: each model (`models`, then conv2d) with the version that
    serves it, READY or UNAVAILABLE and, when unavailable, why. `ready_only` leaves out
    the models that are not ready."""
    response = service_pb2.RepositoryIndexResponse()
    for status in models:
        if status.ready:
            response.models.add(name=status.name, version=_index_version(status), state=READY)
        elif not ready_only:
            response.models.add(
                name=status.name,
                version=_index_version(status),
                state=UNAVAILABLE,
                reason=unavailable_reason(status),
            )
    if conv_ready:
        response.models.add(name=CONV_MODEL, version=CONV_VERSION, state=READY)
    elif not ready_only:
        response.models.add(
            name=CONV_MODEL,
            version=CONV_VERSION,
            state=UNAVAILABLE,
            reason="the server is not ready",
        )
    return response
