"""`errors.shown` and the status messages of `errors.status_of`."""

from __future__ import annotations

import grpc

from convserve.server import errors
from convserve.v1.tensor_codec import TensorError


def test_short_values_are_shown_as_their_repr() -> None:
    assert errors.shown("mnist") == "'mnist'"
    assert errors.shown(b"\x00") == "b'\\x00'"
    assert errors.shown([1, 2]) == "[1, 2]"
    assert errors.shown("a" * 62) == repr("a" * 62)  # 64 characters with the quotes


def test_long_strings_are_cut_and_give_their_length() -> None:
    shown = errors.shown("a" * 9000)
    assert shown == "'" + "a" * 63 + "…' (9000 characters)"
    assert errors.shown(b"x" * 100, limit=8) == "b'xxxxxx…' (100 bytes)"
    assert errors.shown("é" * 20, limit=10) == "'ééééééééé…' (20 characters)"


def test_long_other_values_are_cut_with_the_length_of_their_repr() -> None:
    values = list(range(1000))
    shown = errors.shown(values, limit=10)
    assert shown == f"[0, 1, 2, … ({len(repr(values))} characters)"


def test_status_messages_are_capped() -> None:
    code, message = errors.status_of(errors.NotFound("unknown model " + "a" * 9000))
    assert code == grpc.StatusCode.NOT_FOUND
    assert len(message) <= errors.MAX_MESSAGE_CHARS
    assert message.startswith("unknown model aaa")
    assert message.endswith("(message cut from 9014 characters)")
    code, message = errors.status_of(TensorError("images", "t" * 5000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message) <= errors.MAX_MESSAGE_CHARS
    short = errors.InvalidArgument("images", "a tensor is required, got none")
    assert errors.status_of(short)[1] == "images: a tensor is required, got none"


def test_unexpected_exceptions_leak_nothing() -> None:
    assert errors.status_of(RuntimeError("secret")) == (
        grpc.StatusCode.INTERNAL,
        "internal error; see the server log",
    )
