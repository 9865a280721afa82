"""JSON arrays of numbers -> numpy arrays, checked, without holding the event loop.

The HTTP APIs take tensors as (nested) JSON arrays, which the JSON worker may
already have read into numpy arrays (`json_worker`). `json_array` reads them as
numpy does, refusing what is not a rectangular array of numbers; `to_array`
converts to the dtype a model or operation takes, range-checking integers
first. Both name the field in their errors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convserve.server import errors
from convserve.server.json_worker import RefusedArray
from convserve.server.protocols.oip_convert import MAX_RANK

# Numbers numpy reads from a list in one call at most (a few milliseconds of GIL).
SLICE_NUMBERS = 1 << 16


def _sliced_asarray(value: Any) -> np.ndarray:
    """np.asarray(value), reading a long top-level list in slices of about
    `SLICE_NUMBERS` numbers (ValueError for ragged nesting, as numpy raises)."""
    if not isinstance(value, list) or len(value) < 2:
        return np.asarray(value)
    first = np.asarray(value[0])
    rows = max(1, SLICE_NUMBERS // max(1, first.size))
    if len(value) <= rows:
        return np.asarray(value)
    parts = [np.asarray(value[start : start + rows]) for start in range(0, len(value), rows)]
    if any(part.shape[1:] != parts[0].shape[1:] for part in parts):
        raise ValueError("ragged")
    return np.concatenate(parts)


def json_array(value: Any, field: str) -> np.ndarray:
    """JSON numbers (nested arrays) -> an array as numpy reads them (integers or floats),
    refusing objects, strings, nulls, arrays of booleans and ragged nesting (a boolean
    among numbers reads as 0 or 1, as numpy reads it).

    A long array is converted a slice at a time: numpy holds the GIL while it reads a
    list, so one call over millions of numbers, even in a worker thread, would stall
    the event loop for as long."""
    if isinstance(value, np.ndarray):
        array = value  # read by the JSON worker (`json_worker`)
    elif isinstance(value, RefusedArray):
        raise errors.InvalidArgument(field, value.reason)
    elif isinstance(value, dict):
        raise errors.InvalidArgument(field, "numbers or arrays of numbers expected, got an object")
    try:
        if not isinstance(value, np.ndarray):
            array = _sliced_asarray(value)
    except ValueError:
        raise errors.InvalidArgument(
            field, "a rectangular array of numbers expected (rows of equal length)"
        ) from None
    if array.ndim > MAX_RANK:
        raise errors.InvalidArgument(
            field, f"at most {MAX_RANK} dimensions expected, got {array.ndim}"
        )
    if array.dtype.kind not in "iuf":
        raise errors.InvalidArgument(field, f"numbers expected, got {_kind(array.dtype.kind)}")
    return array


def to_array(value: Any, dtype: np.dtype, field: str, what: str) -> np.ndarray:
    """JSON numbers (nested arrays) -> an array of `dtype` (uint8: integers in [0, 255];
    floats: any numbers), checked before conversion. `what` names what takes them."""
    array = json_array(value, field)
    if dtype != np.uint8:
        return array.astype(dtype)
    if array.dtype.kind == "f" and array.size:
        raise errors.InvalidArgument(
            field, f"integers in [0, 255] expected for {what}, got numbers with fractions"
        )
    if array.size and (int(array.min()) < 0 or int(array.max()) > 255):
        raise errors.InvalidArgument(
            field,
            f"integers in [0, 255] expected for {what}, got values in "
            f"[{int(array.min())}, {int(array.max())}]",
        )
    return array.astype(np.uint8)


def _kind(kind: str) -> str:
    return {
        "b": "booleans",
        "U": "strings",
        "O": "arrays mixing numbers with other values",
    }.get(kind, f"values of numpy kind {kind!r}")
