"""`logs.RejectionSummary`: every rejection at DEBUG, counts at INFO at most once per interval."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from convserve.server.logs import RejectionSummary

NAME = "convserve.test.rejections"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Timers:
    """Records `schedule(delay, callback)` calls; the test decides when they fire."""

    def __init__(self) -> None:
        self.set: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay_s: float, callback: Callable[[], None]) -> None:
        self.set.append((delay_s, callback))


def lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == NAME and r.levelno == level]


def summary(clock: Clock, timers: Timers) -> RejectionSummary:
    return RejectionSummary(logging.getLogger(NAME), interval_s=10.0, clock=clock, schedule=timers)


def test_a_flood_gives_one_info_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=NAME)
    clock, timers = Clock(), Timers()
    rejections = summary(clock, timers)
    rejections.rejected("UNAUTHENTICATED", "/convserve.v1.ConvServe/Predict", "invalid token")
    # The first rejection after a quiet spell is reported at once.
    assert lines(caplog, logging.INFO) == ["rejected 1 call: UNAUTHENTICATED 1"]
    for i in range(500):
        clock.now += 0.01
        rejections.rejected("INVALID_ARGUMENT", "convserve Predict", f"images: bad {i}")
    for _ in range(31):
        rejections.rejected("UNAUTHENTICATED", "/convserve.v1.ConvServe/Predict", "invalid token")
    assert len(lines(caplog, logging.INFO)) == 1
    assert len(lines(caplog, logging.DEBUG)) == 532
    assert "rejected convserve Predict with INVALID_ARGUMENT: images: bad 7" in lines(
        caplog, logging.DEBUG
    )
    # One timer, set by the first unreported rejection (0.01 s after the line) and due
    # when the interval since the line has passed.
    assert len(timers.set) == 1
    delay, fire = timers.set[0]
    assert delay == pytest.approx(9.99)
    clock.now = 1010.0
    fire()
    assert lines(caplog, logging.INFO)[1] == (
        "rejected 531 calls in the last 10 s: INVALID_ARGUMENT 500, UNAUTHENTICATED 31"
    )
    fire()  # a timer fires once per window; nothing is left to report
    assert len(lines(caplog, logging.INFO)) == 2


def test_without_a_timer_the_next_rejection_after_the_interval_reports(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    clock, timers = Clock(), Timers()
    rejections = summary(clock, timers)
    rejections.rejected("NOT_FOUND", "convserve Predict", "unknown model")
    clock.now += 3
    rejections.rejected("NOT_FOUND", "convserve Predict", "unknown model")
    clock.now += 9  # 12 s after the first line; the timer never fired
    rejections.rejected("RESOURCE_EXHAUSTED", "oip ModelInfer", "queue full")
    assert lines(caplog, logging.INFO) == [
        "rejected 1 call: NOT_FOUND 1",
        "rejected 2 calls in the last 12 s: NOT_FOUND 1, RESOURCE_EXHAUSTED 1",
    ]
    # The timer of the window already reported does nothing.
    timers.set[0][1]()
    assert len(lines(caplog, logging.INFO)) == 2


def test_flush_reports_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    clock, timers = Clock(), Timers()
    rejections = summary(clock, timers)
    rejections.flush()
    assert lines(caplog, logging.INFO) == []
    rejections.rejected("DEADLINE_EXCEEDED", "convserve Predict", "late")
    clock.now += 1
    rejections.rejected("DEADLINE_EXCEEDED", "convserve Predict", "late")
    rejections.flush()
    assert lines(caplog, logging.INFO) == [
        "rejected 1 call: DEADLINE_EXCEEDED 1",
        "rejected 1 call in the last 1 s: DEADLINE_EXCEEDED 1",
    ]
