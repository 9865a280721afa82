"""Open Inference Protocol (KServe v2) messages <-> convserve's typed values.

Pure functions: nothing here talks to the network or the runtime. Messages are
tritonclient's generated ``inference.*`` classes (``tritonclient.grpc.service_pb2``).

Models as the protocol sees them
--------------------------------
``<model name>`` (``mnist`` unless configured otherwise), the digit model:

- versions: the loaded model versions as decimal strings; ``model_version``
  ``""`` means the serving version, ``"3"`` pins version 3.
- input ``images``: UINT8 in [0, 255] or FP32 in [0, 1], shape
  ``[-1,28,28,1]`` (also accepted: ``[N,28,28]`` and ``[N,784]``).
- outputs ``probabilities`` FP32 ``[N,10]`` and ``digits`` INT32 ``[N]`` (the
  most likely digit, as ``convserve.v1.PredictResponse.digits``).

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
exactly when the request used raw input contents. Requested outputs select and
order the outputs; an empty list means all of them. The request id is echoed.

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
from google.protobuf.internal import wire_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from convserve.client.tensor import DTYPE_TO_PROTO, from_tensor
from convserve.server import errors, types
from convserve.v1 import tensor_pb2

CONV_MODEL = "conv2d"
CONV_VERSION = "1"
DIGIT_INPUT = "images"
DIGIT_OUTPUTS = ("probabilities", "digits")
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
# A tensor message carries a handful of fields (dtype, shape, one value field);
# walking many more would be work proportional to junk the client sent.
MAX_TENSOR_FIELDS = 64
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


# -- packed repeated scalars -------------------------------------------------
#
# proto3 serializes a repeated scalar field packed (one length-delimited entry
# holding the values back to back), whatever encoding the client used, so the
# values of a parsed message are read by serializing it (in C) and viewing the
# entry's bytes with numpy.


def _varint(data: memoryview, pos: int, field: str) -> tuple[int, int]:
    """The varint at `pos` and the position after it (used for tags and lengths only)."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            break
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise errors.InvalidArgument(field, "a well-formed tensor message expected (bad varint)")


def packed_payload(serialized: bytes, number: int, field: str) -> memoryview:
    """The packed values of repeated scalar field `number` in a serialized message
    (empty when absent). Other fields are skipped; InvalidArgument naming `field`
    when the message holds more than `MAX_TENSOR_FIELDS` entries or an encoding no
    generated message produces (groups, unknown wire types)."""
    data = memoryview(serialized)
    parts: list[memoryview] = []
    pos = entries = 0
    while pos < len(data):
        entries += 1
        if entries > MAX_TENSOR_FIELDS:
            raise errors.InvalidArgument(
                field, f"at most {MAX_TENSOR_FIELDS} fields in the tensor message expected"
            )
        tag, pos = _varint(data, pos, field)
        found, wire_type = wire_format.UnpackTag(tag)
        if wire_type == wire_format.WIRETYPE_VARINT:
            _, pos = _varint(data, pos, field)
        elif wire_type == wire_format.WIRETYPE_FIXED64:
            pos += 8
        elif wire_type == wire_format.WIRETYPE_FIXED32:
            pos += 4
        elif wire_type == wire_format.WIRETYPE_LENGTH_DELIMITED:
            length, pos = _varint(data, pos, field)
            if found == number:
                parts.append(data[pos : pos + length])
            pos += length
        else:
            raise errors.InvalidArgument(
                field, f"a tensor message without groups expected, got wire type {wire_type}"
            )
        # The field number with another wire type can only be an unknown field
        # (protobuf did not take it as values), so it is skipped like one.
    if pos != len(data):
        raise errors.InvalidArgument(field, "a well-formed tensor message expected (truncated)")
    if len(parts) == 1:
        return parts[0]
    return memoryview(b"".join(parts))


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def packed_field(number: int, payload: bytes | memoryview) -> bytes:
    """Field `number` as one packed entry holding `payload`, ready for MergeFromString."""
    tag = wire_format.PackTag(number, wire_format.WIRETYPE_LENGTH_DELIMITED)
    return b"".join((_varint_bytes(tag), _varint_bytes(len(payload)), payload))


def fixed_values(payload: memoryview, dtype: np.dtype, field: str) -> np.ndarray:
    """Packed fixed-width values (float, double: little-endian on the wire) as an array."""
    wire = dtype.newbyteorder("<")
    if len(payload) % wire.itemsize:
        raise errors.InvalidArgument(field, "a whole number of packed values expected")
    return np.frombuffer(payload, dtype=wire)


def small_varints(payload: memoryview) -> np.ndarray | None:
    """Packed varints as uint8, or None when any value is outside [0, 255].

    A value below 128 is one byte; 128..255 are two, the value itself (its
    continuation bit is its top bit) followed by 0x01. So the values are the
    bytes that do not follow a continuation byte, provided every such byte is
    0x01 and no varint is longer than two bytes (16384 and more, or negative).
    """
    data = np.frombuffer(payload, dtype=np.uint8)
    if data.size == 0:
        return data.copy()
    more = data >= 0x80
    second = np.zeros(data.size, dtype=bool)
    second[1:] = more[:-1]
    # Elementwise tests over the whole array: boolean indexing is several times slower.
    if more[-1] or np.any(more & second) or np.any(second & (data != 1)):
        return None
    return np.compress(~second, data)


_VARINT_CHUNK = 1 << 20


def varint_chunks(payload: memoryview, field: str) -> Iterator[np.ndarray]:
    """Packed varints as uint64 arrays of at most about `_VARINT_CHUNK` values each, in
    order (int32/int64 values come out as their two's complement: view as int64)."""
    data = np.frombuffer(payload, dtype=np.uint8)
    pos = 0
    while pos < data.size:
        end = min(pos + _VARINT_CHUNK, data.size)
        while end < data.size and data[end - 1] >= 0x80:  # finish the varint cut at `end`
            end += 1
        chunk = data[pos:end]
        ends = np.flatnonzero(chunk < 0x80)
        if ends.size == 0 or ends[-1] != chunk.size - 1:
            raise errors.InvalidArgument(field, "well-formed packed values expected")
        starts = np.empty_like(ends)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        lengths = ends - starts + 1
        longest = int(lengths.max())
        if longest > 10:
            raise errors.InvalidArgument(field, "well-formed packed values expected")
        values = (chunk[starts] & 0x7F).astype(np.uint64)
        for j in range(1, longest):
            longer = np.flatnonzero(lengths > j)
            byte = (chunk[starts[longer] + j] & 0x7F).astype(np.uint64)
            values[longer] |= byte << np.uint64(7 * j)
        yield values
        pos = end


def varint_values(payload: memoryview, dtype: np.dtype, field: str) -> np.ndarray:
    """Packed int32/int64/uint32 varints as an array of `dtype` (protobuf's truncation)."""
    chunks = [c.view(np.int64).astype(dtype) for c in varint_chunks(payload, field)]
    return np.concatenate(chunks) if chunks else np.empty(0, dtype)


def largest_varint(payload: memoryview, field: str) -> int:
    """The largest of packed unsigned varints (0 when there are none)."""
    return max((int(c.max()) for c in varint_chunks(payload, field)), default=0)


# -- typed payload size, read from the wire before parsing ---------------------
#
# grpc.aio parses each request on the event loop, and protobuf's parser holds the
# GIL throughout: tens of MiB of typed values (varints above all) stall every other
# call for up to a second, and no thread can help. So ModelInfer's request bytes are
# first walked field by field (tags and lengths only, never the values), and a request
# whose typed values exceed the server's limit is refused without being parsed.

# Large requests legitimately carry a handful of fields (inputs, raw contents,
# outputs, parameters); walking many more would be work proportional to junk.
MAX_WALKED_FIELDS = 1024
# protobuf's own limit on nested groups and messages.
_MAX_DEPTH = 100


class WireError(Exception):
    """The bytes are not a well-formed protobuf message (protobuf reports it on parsing)."""


class TooManyFields(Exception):
    """The walk met more than `MAX_WALKED_FIELDS` fields."""


@dataclass(frozen=True)
class WireField:
    """One field of a serialized message: its value is ``data[start:end]`` (the payload of a
    length-delimited field, the bytes of a number, the contents of a group)."""

    number: int
    wire_type: int
    start: int
    end: int

    @property
    def length_delimited(self) -> bool:
        return self.wire_type == wire_format.WIRETYPE_LENGTH_DELIMITED


class WireReader:
    """Walks the fields of serialized protobuf bytes without parsing their values: the work
    is proportional to the number of fields walked, at most `max_fields` in all."""

    def __init__(self, data: bytes, max_fields: int = MAX_WALKED_FIELDS) -> None:
        self.data = memoryview(data)
        self.max_fields = max_fields
        self.walked = 0

    def fields(self, start: int, end: int) -> Iterator[WireField]:
        """The fields of the message in ``data[start:end]``, in wire order. Raises
        WireError on malformed bytes, TooManyFields past the budget."""
        pos = start
        while pos < end:
            field, pos = self._field(pos, end, depth=0)
            if field.wire_type == wire_format.WIRETYPE_END_GROUP:
                raise WireError("an end-group tag outside a group")
            yield field

    def _field(self, pos: int, end: int, depth: int) -> tuple[WireField, int]:
        """The field whose tag is at `pos`, and the position after it."""
        self.walked += 1
        if self.walked > self.max_fields:
            raise TooManyFields
        tag, pos = self._varint(pos, end)
        number, wire_type = wire_format.UnpackTag(tag)
        if number == 0:
            raise WireError("field number 0")
        after = pos
        if wire_type == wire_format.WIRETYPE_VARINT:
            _, after = self._varint(pos, end)
        elif wire_type == wire_format.WIRETYPE_FIXED64:
            after = pos + 8
        elif wire_type == wire_format.WIRETYPE_FIXED32:
            after = pos + 4
        elif wire_type == wire_format.WIRETYPE_LENGTH_DELIMITED:
            length, pos = self._varint(pos, end)
            after = pos + length
        elif wire_type == wire_format.WIRETYPE_START_GROUP:
            return self._group(number, pos, end, depth + 1)
        elif wire_type != wire_format.WIRETYPE_END_GROUP:
            raise WireError(f"wire type {wire_type}")
        if after > end:
            raise WireError("truncated")
        return WireField(number, wire_type, pos, after), after

    def _group(self, number: int, start: int, end: int, depth: int) -> tuple[WireField, int]:
        # Groups are walked (only their tags cost anything): skipping them unread would
        # let a request hide typed values after one.
        if depth > _MAX_DEPTH:
            raise WireError("nested too deeply")
        pos = start
        while pos < end:
            field, after = self._field(pos, end, depth)
            if field.wire_type == wire_format.WIRETYPE_END_GROUP:
                if field.number != number:
                    raise WireError("mismatched end-group tag")
                return WireField(number, wire_format.WIRETYPE_START_GROUP, start, pos), after
            pos = after
        raise WireError("truncated group")

    def _varint(self, pos: int, end: int) -> tuple[int, int]:
        value = 0
        for shift in range(0, 70, 7):
            if pos >= end:
                break
            byte = self.data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
        raise WireError("bad varint")


@dataclass(frozen=True)
class RefusedRequest:
    """What a checking request deserializer returns instead of a message it would not
    parse; the servicer raises `error` where it counts the call (`Calls.run`)."""

    error: Exception


TypedPayloads = Callable[[WireReader], Iterator[tuple[str, int]]]
"""(field, bytes of typed values) for each part of a serialized request that carries some."""


def typed_limit_deserializer(
    message_class: Any, typed_payloads: TypedPayloads, limit: int, values: str, raw_field: str
) -> Callable[[bytes], Any]:
    """A gRPC request deserializer for `message_class` that refuses, without parsing it, a
    request whose typed values (`typed_payloads`, named `values` in the message) exceed
    `limit` bytes: it returns a `RefusedRequest` whose InvalidArgument names the input and
    points to `raw_field`. Others are parsed as usual. It never raises: gRPC would answer
    an exception with a generic status."""
    name = message_class.DESCRIPTOR.full_name

    def refusal(data: bytes) -> RefusedRequest | None:
        total = largest = 0
        field = ""
        complete = True
        try:
            for part, size in typed_payloads(WireReader(data)):
                total += size
                if size > largest:
                    field, largest = part, size
        except WireError:
            # protobuf reports malformed bytes as it always has (it parses no further).
            complete = False
        except TooManyFields:
            if total <= limit:
                return RefusedRequest(
                    errors.InvalidArgument(
                        "request",
                        f"at most {MAX_WALKED_FIELDS} fields expected in a request larger "
                        f"than the server's max_typed_payload_bytes ({limit})",
                    )
                )
            complete = False
        if total <= limit:
            return None
        has = total if complete else f"at least {total}"
        return RefusedRequest(
            errors.InvalidArgument(
                field,
                f"at most {limit} bytes of typed values ({values}) per request expected "
                f"(the server's max_typed_payload_bytes); this request has {has}. "
                f"Send large tensors in {raw_field}",
            )
        )

    def deserialize(data: bytes) -> Any:
        try:
            # A request no longer than the limit cannot carry more typed values.
            refused = refusal(data) if len(data) > limit else None
            return refused or message_class.FromString(data)
        except DecodeError as exc:
            return RefusedRequest(
                errors.InvalidArgument("request", f"a well-formed {name} expected ({exc})")
            )
        except Exception as exc:
            return RefusedRequest(exc)  # a defect: logged with its traceback by Calls.run

    return deserialize


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
    are refused unparsed (`typed_limit_deserializer`)."""
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


def requested_outputs(request: Any, available: Sequence[str]) -> list[str]:
    """The output names to return, in order; none requested means all of them."""
    if not request.outputs:
        return list(available)
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
    """A digit-model ModelInferRequest -> (images as sent, model, outputs, raw).

    The images still need the runtime's image check (shape, range, limits).
    """
    ref = model_ref(request.model_name, request.model_version)
    _check_no_parameters(request, ())
    inputs = decode_inputs(request, {DIGIT_INPUT: ("UINT8", "FP32")}, (DIGIT_INPUT,))
    outputs = requested_outputs(request, DIGIT_OUTPUTS)
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


def infer_response(
    request: Any,
    model_name: str,
    model_version: str,
    outputs: Sequence[tuple[str, np.ndarray]],
    raw: bool,
) -> Any:
    """A ModelInferResponse carrying `outputs` in order, echoing the request id."""
    response = service_pb2.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request.id
    )
    for name, array in outputs:
        _add_output(response, name, array, raw)
    return response


def predict_response(
    request: Any, result: types.PredictOutput, names: Sequence[str], raw: bool
) -> Any:
    """The digit model's ModelInferResponse for the requested output `names`."""
    values = {"probabilities": result.probabilities, "digits": result.digits}
    return infer_response(
        request,
        result.model_name,
        str(result.model_version),
        [(name, values[name]) for name in names],
        raw,
    )


def convolve_response(request: Any, result: types.ConvolveOutput, raw: bool) -> Any:
    """The conv2d model's ModelInferResponse."""
    return infer_response(request, CONV_MODEL, CONV_VERSION, [("output", result.output)], raw)


def model_metadata_response(meta: types.ModelMetadata, version: int | None) -> Any:
    """The digit model's ModelMetadataResponse.

    `version` (a pinned, loaded version) lists only that version; None lists
    every loaded version. The input is declared UINT8 (the smallest on the
    wire); FP32 is accepted as well.
    """
    versions = [version] if version is not None else list(meta.loaded_versions)
    response = service_pb2.ModelMetadataResponse(
        name=meta.model_name,
        versions=[str(v) for v in versions],
        platform="tensorflow_savedmodel",
    )
    response.inputs.add(name=DIGIT_INPUT, datatype="UINT8", shape=[-1, 28, 28, 1])
    response.outputs.add(name="probabilities", datatype="FP32", shape=[-1, 10])
    response.outputs.add(name="digits", datatype="INT32", shape=[-1])
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
