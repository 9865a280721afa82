"""JSON arrays of numbers -> checked numpy arrays (`json_values`)."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest

from convserve.server import errors
from convserve.server.json_worker import RefusedArray
from convserve.server.protocols import json_values as jv
from convserve.server.protocols.oip_convert import MAX_RANK

UINT8 = np.dtype(np.uint8)
FLOAT32 = np.dtype(np.float32)


def refused(value: Any, problem: str, field: str = "images") -> None:
    """`json_array(value)` is INVALID_ARGUMENT naming `field`, its message containing
    `problem`."""
    with pytest.raises(errors.InvalidArgument) as exc:
        jv.json_array(value, field)
    code, message = errors.status_of(exc.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.field == field
    assert problem in message, message


@pytest.mark.parametrize(
    ("value", "dtype", "shape"),
    [
        ([[1, 2, 3], [4, 5, 6]], np.int64, (2, 3)),
        ([[0.5, 1], [2, 3]], np.float64, (2, 2)),
        ([1, 2, 3], np.int64, (3,)),
        (7, np.int64, ()),
        ([[[[0.25]]]], np.float64, (1, 1, 1, 1)),
        ([], np.float64, (0,)),
    ],
)
def test_nested_and_flat_arrays_read_as_numpy_reads_them(
    value: Any, dtype: type, shape: tuple[int, ...]
) -> None:
    array = jv.json_array(value, "x")
    assert array.dtype == dtype
    assert array.shape == shape
    np.testing.assert_array_equal(array, np.asarray(value))


def test_numpy_arrays_from_the_json_worker_pass_through() -> None:
    given = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert jv.json_array(given, "x") is given


def test_arrays_the_json_worker_refused_name_the_field_and_its_reason() -> None:
    refused(RefusedArray("rows of equal length expected"), "rows of equal length expected")
    with pytest.raises(errors.InvalidArgument) as exc:
        jv.json_array(RefusedArray("why"), "inputs")
    assert str(exc.value) == "inputs: why"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ([[1, 2], [3]], "a rectangular array of numbers expected (rows of equal length)"),
        ([[1, 2], 3], "a rectangular array of numbers expected"),
        ("abc", "numbers expected, got strings"),
        ([["a", "b"]], "numbers expected, got strings"),
        ([1, "2"], "numbers expected, got strings"),
        ([True, False], "numbers expected, got booleans"),
        ([[True]], "numbers expected, got booleans"),
        (None, "numbers expected, got arrays mixing numbers with other values"),
        ([1, None], "numbers expected, got arrays mixing numbers with other values"),
        ([{"a": 1}], "numbers expected, got arrays mixing numbers with other values"),
        ({"images": [1, 2]}, "numbers or arrays of numbers expected, got an object"),
        ([2**70], "numbers expected, got arrays mixing numbers with other values"),
    ],
)
def test_what_is_not_a_rectangular_array_of_numbers_is_refused(value: Any, problem: str) -> None:
    refused(value, problem)


def test_rank_above_the_maximum_is_refused() -> None:
    deepest: Any = 1
    for _ in range(MAX_RANK):
        deepest = [deepest]
    assert jv.json_array(deepest, "x").ndim == MAX_RANK
    refused([deepest], f"at most {MAX_RANK} dimensions expected, got {MAX_RANK + 1}")


def _long_rows(count: int, width: int) -> list[list[int]]:
    return [[i % 256] * width for i in range(count)]


def test_a_long_list_is_read_in_slices_into_one_array() -> None:
    width = 100
    rows = jv.SLICE_NUMBERS // width
    value = _long_rows(3 * rows + 7, width)  # four slices, the last one short
    array = jv.json_array(value, "x")
    assert array.shape == (3 * rows + 7, width)
    np.testing.assert_array_equal(array, np.asarray(value))


def test_a_long_flat_list_is_read_in_slices() -> None:
    value = list(range(jv.SLICE_NUMBERS * 2 + 3))
    array = jv.json_array(value, "x")
    np.testing.assert_array_equal(array, np.arange(jv.SLICE_NUMBERS * 2 + 3))


def test_a_ragged_row_in_a_later_slice_is_refused() -> None:
    width = 100
    rows = jv.SLICE_NUMBERS // width
    value = _long_rows(3 * rows, width)
    value[2 * rows + 5] = [0] * (width - 1)  # inside the third slice
    refused(value, "a rectangular array of numbers expected (rows of equal length)")


def test_slices_of_different_row_shapes_are_refused() -> None:
    # Each slice is rectangular on its own; only together they are ragged.
    width = 100
    rows = jv.SLICE_NUMBERS // width
    value = _long_rows(rows, width) + _long_rows(rows, width - 1)
    refused(value, "a rectangular array of numbers expected (rows of equal length)")


def test_a_string_in_a_later_slice_is_refused() -> None:
    width = 100
    rows = jv.SLICE_NUMBERS // width
    value: list[Any] = _long_rows(2 * rows, width)
    value[-1] = ["x"] * width
    refused(value, "numbers expected")


def test_uint8_takes_integers_from_0_to_255() -> None:
    array = jv.to_array([[0, 255], [17, 3]], UINT8, "images", "signature predict_uint8")
    assert array.dtype == np.uint8
    np.testing.assert_array_equal(array, np.array([[0, 255], [17, 3]], dtype=np.uint8))
    # No values: nothing out of range (the worker's arrays keep their integer dtype).
    empty = jv.to_array(np.zeros((0, 4), dtype=np.int64), UINT8, "images", "x")
    assert (empty.dtype, empty.shape) == (np.uint8, (0, 4))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ([[0, 256]], "got values in [0, 256]"),
        ([[-1, 3]], "got values in [-1, 3]"),
        ([2**40], f"got values in [{2**40}, {2**40}]"),
        ([[0.5, 1]], "got numbers with fractions"),
        ([1.0, 2.0], "got numbers with fractions"),
    ],
)
def test_uint8_refuses_out_of_range_and_floats(value: Any, problem: str) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        jv.to_array(value, UINT8, "images", "signature predict_uint8")
    message = str(exc.value)
    assert message.startswith(
        "images: integers in [0, 255] expected for signature predict_uint8, "
    ), message
    assert problem in message, message


def test_floats_convert_to_the_dtype_asked_for() -> None:
    array = jv.to_array([[0, 1], [0.5, 0.25]], FLOAT32, "images", "signature serving_default")
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, np.array([[0, 1], [0.5, 0.25]], dtype=np.float32))
    # Integers are numbers too for a float signature.
    assert jv.to_array([3], np.dtype(np.float64), "x", "y").dtype == np.float64


def test_to_array_refuses_what_json_array_refuses() -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        jv.to_array([[1, 2], [3]], FLOAT32, "inputs", "signature serving_default")
    assert exc.value.field == "inputs"
    with pytest.raises(errors.InvalidArgument) as refused_exc:
        jv.to_array(RefusedArray("because"), UINT8, "inputs", "signature predict_uint8")
    assert str(refused_exc.value) == "inputs: because"
