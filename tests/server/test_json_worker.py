"""Parsing JSON bodies inline or in the worker process (`json_worker`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest

from convserve.server.json_worker import (
    ARRAY_MIN_NUMBERS,
    JsonError,
    JsonParser,
    RefusedArray,
    parse,
)

LONG = list(range(ARRAY_MIN_NUMBERS))
SHORT = list(range(ARRAY_MIN_NUMBERS - 1))


def test_long_arrays_of_numbers_become_numpy_arrays() -> None:
    value = parse(orjson.dumps({"inputs": LONG}))
    assert isinstance(value["inputs"], np.ndarray)
    np.testing.assert_array_equal(value["inputs"], np.arange(ARRAY_MIN_NUMBERS))
    assert value["inputs"].dtype.kind == "i"


def test_nested_long_arrays_become_one_array_of_their_shape() -> None:
    rows = [[0.5] * 32 for _ in range(ARRAY_MIN_NUMBERS // 32)]
    value = parse(orjson.dumps({"instances": rows}))
    assert isinstance(value["instances"], np.ndarray)
    assert value["instances"].shape == (ARRAY_MIN_NUMBERS // 32, 32)
    assert value["instances"].dtype == np.float64


def test_short_arrays_stay_lists() -> None:
    value = parse(orjson.dumps({"a": SHORT, "b": [[1, 2], [3, 4]], "c": 5}))
    assert value == {"a": SHORT, "b": [[1, 2], [3, 4]], "c": 5}
    assert isinstance(value["a"], list)


def test_dicts_and_lists_are_walked_to_their_arrays() -> None:
    document = {
        "outer": {"inner": {"data": LONG}, "name": "x"},
        "items": [{"data": LONG}, {"data": [1, 2]}],
        "rows": [[{"data": LONG}]],
    }
    value = parse(orjson.dumps(document))
    assert isinstance(value["outer"]["inner"]["data"], np.ndarray)
    assert value["outer"]["name"] == "x"
    assert isinstance(value["items"][0]["data"], np.ndarray)
    assert value["items"][1] == {"data": [1, 2]}
    assert isinstance(value["rows"][0][0]["data"], np.ndarray)


def test_a_top_level_long_array_becomes_an_array() -> None:
    value = parse(orjson.dumps(LONG))
    assert isinstance(value, np.ndarray)
    assert value.shape == (ARRAY_MIN_NUMBERS,)


def test_a_ragged_long_array_is_refused_in_place() -> None:
    ragged = [[0] * 600, [0] * 599]
    value = parse(orjson.dumps({"instances": ragged, "signature_name": "s"}))
    assert value["signature_name"] == "s"
    assert isinstance(value["instances"], RefusedArray)
    assert "rows of equal length" in value["instances"].reason


@pytest.mark.parametrize("odd", ["x", None, {"a": 1}])
def test_a_long_array_of_numbers_with_other_values_is_refused(odd: Any) -> None:
    value = parse(orjson.dumps({"inputs": [*LONG, odd]}))
    assert value["inputs"] == RefusedArray("an array of numbers only expected")


def test_arrays_not_starting_with_a_number_are_left_for_the_server_to_refuse() -> None:
    strings = ["a"] * ARRAY_MIN_NUMBERS
    booleans = [True] * ARRAY_MIN_NUMBERS
    value = parse(orjson.dumps({"s": strings, "b": booleans}))
    # Kept as parsed: `json_values` names the field and the kind of value in its error.
    assert value == {"s": strings, "b": booleans}


@pytest.mark.parametrize("body", [b"{", b'{"a": [1, 2}', b"nope", b'{"a": 1} x'])
def test_invalid_json_is_a_json_error(body: bytes) -> None:
    with pytest.raises(JsonError) as exc:
        parse(body)
    assert str(exc.value)


@pytest.fixture
async def process_parser() -> AsyncIterator[JsonParser]:
    """A parser that sends every body of 16 bytes or more to the worker process."""
    parser = JsonParser(process_min_bytes=16)
    try:
        yield parser
    finally:
        parser.close()


async def test_small_bodies_are_parsed_inline_without_arrays() -> None:
    parser = JsonParser()
    body = orjson.dumps({"inputs": LONG})
    assert len(body) < parser.process_min_bytes
    value = await parser.parse(body)
    # Inline parsing is plain orjson: the long array stays a list.
    assert value == {"inputs": LONG}
    assert isinstance(value["inputs"], list)
    parser.close()


async def test_inline_invalid_json_is_a_json_error() -> None:
    parser = JsonParser()
    with pytest.raises(JsonError):
        await parser.parse(b'{"inputs": [1, 2')
    parser.close()


async def test_large_bodies_are_parsed_in_the_worker_process(process_parser: JsonParser) -> None:
    body = orjson.dumps({"inputs": LONG, "short": [1, 2], "ragged": [[0] * 600, [0] * 599]})
    assert len(body) >= process_parser.process_min_bytes
    value = await process_parser.parse(body)
    assert isinstance(value["inputs"], np.ndarray)
    np.testing.assert_array_equal(value["inputs"], np.arange(ARRAY_MIN_NUMBERS))
    assert value["short"] == [1, 2]
    assert isinstance(value["ragged"], RefusedArray)
    # The same worker answers the next body, and invalid JSON is reported from it too.
    with pytest.raises(JsonError):
        await process_parser.parse(b'{"inputs": [1, 2, 3, 4, 5, 6')
    assert await process_parser.parse(b'{"a": "a long enough body"}') == {"a": "a long enough body"}


def test_closing_a_parser_that_never_started_a_worker() -> None:
    parser = JsonParser()
    parser.close()
    parser.close()
