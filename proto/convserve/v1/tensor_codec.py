"""Conversion between numpy arrays and `convserve.v1.Tensor` messages.

Wire code: the client and the server both import it (the server never imports
`convserve.client`), so both sides read and write tensors the same way.

Both directions move the raw bytes in one piece (little-endian, C order), so
a batch of images costs one copy at most. `from_tensor` checks everything a
peer could get wrong and names the offending field in its error.
"""

from __future__ import annotations

import math

import numpy as np

from convserve.v1 import tensor_pb2

DTYPE_TO_PROTO: dict[np.dtype, tensor_pb2.DataType.ValueType] = {
    np.dtype(np.uint8): tensor_pb2.DATA_TYPE_UINT8,
    np.dtype(np.float32): tensor_pb2.DATA_TYPE_FLOAT32,
    np.dtype(np.float64): tensor_pb2.DATA_TYPE_FLOAT64,
    np.dtype(np.int32): tensor_pb2.DATA_TYPE_INT32,
    np.dtype(np.int64): tensor_pb2.DATA_TYPE_INT64,
}
PROTO_TO_DTYPE: dict[int, np.dtype] = {v: k.newbyteorder("<") for k, v in DTYPE_TO_PROTO.items()}
# Arrays already in wire byte order (little-endian) convert without a copy to a new layout.
_LITTLE_ENDIAN_TO_PROTO = {k.newbyteorder("<"): v for k, v in DTYPE_TO_PROTO.items()}

# Far above any real request, far below what int64 shape products overflow to.
MAX_ELEMENTS = 1 << 40


class TensorError(ValueError):
    """A tensor message that cannot be turned into an array.

    `field` names the request field (e.g. ``images`` or ``kernel``), so the
    server can answer INVALID_ARGUMENT with a message a user can act on.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def dtype_name(dtype: int) -> str:
    """`DATA_TYPE_FLOAT32` -> ``float32``; unknown values print as numbers."""
    if dtype in PROTO_TO_DTYPE:
        return PROTO_TO_DTYPE[dtype].name
    return f"unknown dtype {dtype}"


def to_tensor(
    array: np.ndarray | object, dtype: np.dtype | type | None = None
) -> tensor_pb2.Tensor:
    """Wrap an array (or anything np.asarray takes) in a Tensor message.

    Raises TypeError for element types the wire format does not carry.
    """
    arr = np.asarray(array, dtype=dtype)
    proto_dtype = _LITTLE_ENDIAN_TO_PROTO.get(arr.dtype)
    if proto_dtype is not None and arr.flags.c_contiguous:
        # Already what the wire carries (the common case of a server's outputs).
        return tensor_pb2.Tensor(dtype=proto_dtype, shape=arr.shape, content=arr.tobytes())
    if arr.dtype == np.float16 or arr.dtype == np.bool_:
        arr = arr.astype(np.float32 if arr.dtype == np.float16 else np.uint8)
    native = arr.dtype.newbyteorder("=")
    if native not in DTYPE_TO_PROTO:
        raise TypeError(
            f"cannot send dtype {arr.dtype}: use one of "
            + ", ".join(sorted(d.name for d in DTYPE_TO_PROTO))
        )
    little = np.ascontiguousarray(arr, dtype=native.newbyteorder("<"))
    return tensor_pb2.Tensor(
        dtype=DTYPE_TO_PROTO[native], shape=little.shape, content=little.tobytes()
    )


def from_tensor(
    tensor: tensor_pb2.Tensor,
    field: str,
    *,
    max_elements: int = MAX_ELEMENTS,
) -> np.ndarray:
    """Read a Tensor message as a read-only array that shares its bytes.

    Raises TensorError naming `field` when the dtype is unknown, a dimension
    is not positive, the element count exceeds `max_elements`, or the byte
    length does not equal product(shape) * itemsize.
    """
    if tensor.dtype not in PROTO_TO_DTYPE:
        raise TensorError(
            field,
            f"dtype must be one of {', '.join(d.name for d in PROTO_TO_DTYPE.values())}, "
            f"got {dtype_name(tensor.dtype)}",
        )
    dtype = PROTO_TO_DTYPE[tensor.dtype]
    shape = tuple(tensor.shape)
    if not shape:
        raise TensorError(field, "shape must have at least one dimension, got []")
    if min(shape) <= 0:
        raise TensorError(field, f"every dimension must be positive, got shape {list(shape)}")
    # math.prod on Python ints cannot overflow, so a huge product is caught
    # here instead of wrapping around in numpy.
    count = math.prod(shape)
    if count > max_elements:
        raise TensorError(
            field,
            f"shape {list(shape)} has {count} elements, more than the limit of {max_elements}",
        )
    expected = count * dtype.itemsize
    if len(tensor.content) != expected:
        raise TensorError(
            field,
            f"content has {len(tensor.content)} bytes, expected {expected} "
            f"(shape {list(shape)} x {dtype.itemsize} bytes per {dtype.name})",
        )
    return np.frombuffer(tensor.content, dtype=dtype).reshape(shape)
