"""The shared polling helper: what it returns, what it retries, how it fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.polling import until, wait_for


def answers(*outcomes: object) -> Callable[[], object]:
    """A check that returns (or, for exceptions, raises) `outcomes` one per call."""
    pending: Iterator[object] = iter(outcomes)

    def check() -> object:
        outcome = next(pending)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return check


def test_wait_for_returns_the_first_truthy_value() -> None:
    check = answers(0, "", None, [], {"port": 8500}, "never asked for")
    assert wait_for(check, what="a port", interval_s=0) == {"port": 8500}
    assert check() == "never asked for"


async def test_until_returns_the_first_truthy_value() -> None:
    check = answers(False, 7, 8)
    assert await until(check, what="a count", interval_s=0) == 7
    assert check() == 8


def test_the_listed_exceptions_count_as_not_yet() -> None:
    check = answers(ConnectionRefusedError("not listening"), TimeoutError(), "up")
    assert wait_for(check, what="a listener", interval_s=0, retry_on=(OSError,)) == "up"


async def test_until_retries_the_listed_exceptions() -> None:
    check = answers(ConnectionRefusedError("not listening"), "up")
    assert await until(check, what="a listener", interval_s=0, retry_on=(OSError,)) == "up"


def test_other_exceptions_end_the_wait_at_once() -> None:
    check = answers(KeyError("mnist"), "never asked for")
    with pytest.raises(KeyError, match="mnist"):
        wait_for(check, what="a model", interval_s=0, retry_on=(OSError,))
    assert check() == "never asked for"


async def test_until_raises_other_exceptions_at_once() -> None:
    check = answers(AssertionError("a client failed"), "never asked for")
    with pytest.raises(AssertionError, match="a client failed"):
        await until(check, what="traffic", interval_s=0, retry_on=(OSError,))
    assert check() == "never asked for"


def test_a_timeout_names_what_was_awaited_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"waiting for the queue to drain \(last: 0\)$"):
        wait_for(lambda: 0, what="the queue to drain", timeout_s=0)


async def test_a_timeout_names_the_last_error() -> None:
    def refused() -> bool:
        raise ConnectionRefusedError("nothing on 127.0.0.1:8500")

    with pytest.raises(
        AssertionError,
        match=r"waiting for a listener \(last: ConnectionRefusedError\('nothing on 127",
    ):
        await until(refused, what="a listener", timeout_s=0, retry_on=(OSError,))
