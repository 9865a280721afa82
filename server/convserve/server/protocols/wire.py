"""Protobuf wire bytes read and written without protobuf's element-by-element work.

Typed tensor values (OIP ``contents``, TensorProto ``*_val``) are read by
serializing their message in C and viewing the packed entry with numpy, and
written by merging packed bytes; a `WireReader` walks tags and lengths of a
serialized request without parsing its values, so that a request whose typed
values are too large is refused (`typed_limit_deserializer`) before protobuf
parses it, which would hold the event loop for as long.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from convserve.server import errors

# The wire types of the protobuf encoding (protobuf.dev/programming-guides/encoding): a
# field's tag is its number << 3 | its wire type. Spelled out here rather than taken
# from protobuf's private `internal.wire_format`, which may change in any release.
WIRETYPE_VARINT = 0
WIRETYPE_FIXED64 = 1
WIRETYPE_LENGTH_DELIMITED = 2
WIRETYPE_START_GROUP = 3
WIRETYPE_END_GROUP = 4
WIRETYPE_FIXED32 = 5
_TAG_TYPE_BITS = 3


def pack_tag(number: int, wire_type: int) -> int:
    return (number << _TAG_TYPE_BITS) | wire_type


def unpack_tag(tag: int) -> tuple[int, int]:
    """(field number, wire type) of a tag."""
    return tag >> _TAG_TYPE_BITS, tag & ((1 << _TAG_TYPE_BITS) - 1)


# A tensor message carries a handful of fields (dtype, shape, one value field);
# walking many more would be work proportional to junk the client sent.
MAX_TENSOR_FIELDS = 64


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
        found, wire_type = unpack_tag(tag)
        if wire_type == WIRETYPE_VARINT:
            _, pos = _varint(data, pos, field)
        elif wire_type == WIRETYPE_FIXED64:
            pos += 8
        elif wire_type == WIRETYPE_FIXED32:
            pos += 4
        elif wire_type == WIRETYPE_LENGTH_DELIMITED:
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
    tag = pack_tag(number, WIRETYPE_LENGTH_DELIMITED)
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
        return self.wire_type == WIRETYPE_LENGTH_DELIMITED


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
            if field.wire_type == WIRETYPE_END_GROUP:
                raise WireError("an end-group tag outside a group")
            yield field

    def _field(self, pos: int, end: int, depth: int) -> tuple[WireField, int]:
        """The field whose tag is at `pos`, and the position after it."""
        self.walked += 1
        if self.walked > self.max_fields:
            raise TooManyFields
        tag, pos = self._varint(pos, end)
        number, wire_type = unpack_tag(tag)
        if number == 0:
            raise WireError("field number 0")
        after = pos
        if wire_type == WIRETYPE_VARINT:
            _, after = self._varint(pos, end)
        elif wire_type == WIRETYPE_FIXED64:
            after = pos + 8
        elif wire_type == WIRETYPE_FIXED32:
            after = pos + 4
        elif wire_type == WIRETYPE_LENGTH_DELIMITED:
            length, pos = self._varint(pos, end)
            after = pos + length
        elif wire_type == WIRETYPE_START_GROUP:
            return self._group(number, pos, end, depth + 1)
        elif wire_type != WIRETYPE_END_GROUP:
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
            if field.wire_type == WIRETYPE_END_GROUP:
                if field.number != number:
                    raise WireError("mismatched end-group tag")
                return WireField(number, WIRETYPE_START_GROUP, start, pos), after
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
