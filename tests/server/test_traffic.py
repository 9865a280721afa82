"""The traffic history: per-interval rates, latency quantiles, batch sizes and
queue depths computed from the server's real metrics."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from convserve.server.metrics import Metrics
from convserve.server.traffic import Traffic


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def finish(metrics: Metrics, model: str, seconds: float, code: str = "OK", count: int = 1) -> None:
    for _ in range(count):
        metrics.request_started("grpc", "Predict", model)
        metrics.request_finished("grpc", "Predict", code, seconds, model)


def interpolated(
    q: float, lower: float, upper: float, below: int, inside: int, total: int
) -> float:
    """histogram_quantile's answer for the rank q * total falling in the bucket
    (lower, upper] that holds `inside` observations, `below` lying in lower buckets."""
    return lower + (upper - lower) * (q * total - below) / inside


def row(series: dict, model: str) -> dict:
    [found] = [m for m in series["models"] if m["model"] == model]
    return found


def test_one_interval_of_traffic() -> None:
    metrics, clock = Metrics(), Clock()
    traffic = Traffic(metrics.registry, clock=clock)
    traffic.sample()

    finish(metrics, "mnist", 0.003, count=10)
    metrics.request_started("http", "GetFeatureMaps", "mnist")
    metrics.request_finished("http", "GetFeatureMaps", "INVALID_ARGUMENT", 0.003, "mnist")
    finish(metrics, "mnist", 0.003, code="UNAVAILABLE")
    observer = metrics.batch_observer("Predict", "mnist")
    observer.on_batch(4, 4, [0.001] * 4, 0.002)
    observer.on_batch(8, 8, [0.001] * 8, 0.002)
    observer.on_queue_depth(5)
    metrics.batch_observer("GetFeatureMaps", "mnist").on_queue_depth(2)
    clock.advance(2.0)
    traffic.sample()

    series = traffic.series()
    assert series["interval_s"] == 2.0
    assert series["window_s"] == 600.0
    assert series["time"] == [1002.0]
    mnist = row(series, "mnist")
    assert mnist["requests_per_s"] == [6.0]
    assert mnist["errors_per_s"] == [1.0]
    # All 12 took 0.003 s: the (0.0025, 0.005] bucket holds every observation.
    assert mnist["p50_s"] == [pytest.approx(interpolated(0.5, 0.0025, 0.005, 0, 12, 12))]
    assert mnist["p99_s"] == [pytest.approx(interpolated(0.99, 0.0025, 0.005, 0, 12, 12))]
    assert mnist["batch_size"] == [6.0]
    assert mnist["queue_depth"] == [7.0]


def test_quantiles_span_buckets_and_the_infinite_bucket_answers_its_lower_bound() -> None:
    metrics, clock = Metrics(), Clock()
    traffic = Traffic(metrics.registry, clock=clock)
    traffic.sample()
    finish(metrics, "mnist", 0.003, count=10)
    finish(metrics, "mnist", 0.02, count=2)
    clock.advance(2.0)
    traffic.sample()
    # 99 quick requests and one beyond the highest finite bound (30 s).
    finish(metrics, "mnist", 0.00005, count=99)
    finish(metrics, "mnist", 45.0, count=1)
    clock.advance(2.0)
    traffic.sample()

    mnist = row(traffic.series(), "mnist")
    assert mnist["p50_s"] == [
        pytest.approx(interpolated(0.5, 0.0025, 0.005, 0, 10, 12)),
        pytest.approx(interpolated(0.5, 0.0, 0.0001, 0, 99, 100)),
    ]
    assert mnist["p99_s"] == [
        pytest.approx(interpolated(0.99, 0.01, 0.025, 10, 2, 12)),
        pytest.approx(interpolated(0.99, 0.0, 0.0001, 0, 99, 100)),
    ]
    # A quantile falling in the +Inf bucket answers the highest finite bound.
    finish(metrics, "mnist", 45.0, count=1)
    clock.advance(2.0)
    traffic.sample()
    assert row(traffic.series(), "mnist")["p99_s"][-1] == 30.0


def test_an_idle_interval_has_zero_rates_and_no_latency_or_batch() -> None:
    metrics, clock = Metrics(), Clock()
    traffic = Traffic(metrics.registry, clock=clock)
    finish(metrics, "mnist", 0.01, count=3)
    metrics.batch_observer("Predict", "mnist").on_batch(3, 4, [0.0] * 3, 0.001)
    metrics.batch_observer("Predict", "mnist").on_queue_depth(1)
    traffic.sample()
    clock.advance(2.0)
    traffic.sample()

    mnist = row(traffic.series(), "mnist")
    assert mnist["requests_per_s"] == [0.0]
    assert mnist["errors_per_s"] == [0.0]
    assert mnist["p50_s"] == [None]
    assert mnist["p99_s"] == [None]
    assert mnist["batch_size"] == [None]
    assert mnist["queue_depth"] == [1.0]


def test_rates_divide_by_the_measured_interval() -> None:
    metrics, clock = Metrics(), Clock()
    traffic = Traffic(metrics.registry, clock=clock)
    traffic.sample()
    finish(metrics, "mnist", 0.01, count=5)
    clock.advance(2.5)
    traffic.sample()
    finish(metrics, "mnist", 0.01, count=5)
    traffic.sample()  # the clock stood still: no rate can be told

    mnist = row(traffic.series(), "mnist")
    assert mnist["requests_per_s"] == [2.0, None]
    assert mnist["errors_per_s"] == [0.0, None]


def test_the_window_keeps_only_the_last_snapshots() -> None:
    metrics, clock = Metrics(), Clock(0.0)
    traffic = Traffic(metrics.registry, interval_s=2.0, window_s=6.0, clock=clock)
    for step in range(6):
        finish(metrics, "mnist", 0.01, count=step)
        traffic.sample()
        clock.advance(2.0)

    series = traffic.series()
    # Four snapshots (6 / 2 + 1) kept, at 4, 6, 8 and 10 s: three intervals.
    assert series["time"] == [6.0, 8.0, 10.0]
    assert row(series, "mnist")["requests_per_s"] == [1.5, 2.0, 2.5]


def test_a_reset_counter_counts_its_new_value_and_a_removed_model_counts_zero() -> None:
    metrics, clock = Metrics(), Clock()
    traffic = Traffic(metrics.registry, clock=clock)
    finish(metrics, "mnist", 1.5, count=4)
    finish(metrics, "mnist", 1.5, code="INTERNAL", count=2)
    metrics.batch_observer("Predict", "mnist").on_batch(10, 16, [0.0] * 10, 0.01)
    traffic.sample()

    # Removed and added again: every series starts over, below its old value.
    metrics.forget_model("mnist")
    finish(metrics, "mnist", 0.003, count=2)
    finish(metrics, "mnist", 0.003, code="INTERNAL", count=1)
    metrics.batch_observer("Predict", "mnist").on_batch(4, 4, [0.0] * 4, 0.01)
    clock.advance(2.0)
    traffic.sample()

    metrics.forget_model("mnist")
    clock.advance(2.0)
    traffic.sample()

    mnist = row(traffic.series(), "mnist")
    assert mnist["requests_per_s"] == [1.5, 0.0]
    assert mnist["errors_per_s"] == [0.5, 0.0]
    assert mnist["p50_s"] == [pytest.approx(interpolated(0.5, 0.0025, 0.005, 0, 3, 3)), None]
    assert mnist["batch_size"] == [4.0, None]
    assert mnist["queue_depth"] == [0.0, 0.0]


def test_models_are_sorted_and_include_requests_without_a_model() -> None:
    metrics, clock = Metrics(), Clock()
    traffic = Traffic(metrics.registry, clock=clock)
    traffic.sample()
    finish(metrics, "zeta", 0.01)
    finish(metrics, "alpha", 0.01)
    metrics.request_started("grpc", "Convolve")
    metrics.request_finished("grpc", "Convolve", "OK", 0.01)
    metrics.batch_observer("Convolve").on_batch(2, 2, [0.0, 0.0], 0.01)
    clock.advance(2.0)
    traffic.sample()

    series = traffic.series()
    assert [m["model"] for m in series["models"]] == ["", "alpha", "zeta"]
    assert row(series, "")["requests_per_s"] == [0.5]
    assert row(series, "")["batch_size"] == [2.0]


def test_a_model_seen_only_before_an_interval_is_still_listed() -> None:
    metrics, clock = Metrics(), Clock()
    traffic = Traffic(metrics.registry, clock=clock)
    finish(metrics, "old", 0.01)
    traffic.sample()
    metrics.forget_model("old")
    clock.advance(2.0)
    traffic.sample()

    assert traffic.series()["models"] == [
        {
            "model": "old",
            "requests_per_s": [0.0],
            "errors_per_s": [0.0],
            "p50_s": [None],
            "p99_s": [None],
            "batch_size": [None],
            "queue_depth": [0.0],
        }
    ]


def test_a_registry_without_the_metrics_reads_as_no_traffic() -> None:
    clock = Clock()
    traffic = Traffic(CollectorRegistry(), clock=clock)
    assert traffic.series()["time"] == []
    traffic.sample()
    clock.advance(2.0)
    traffic.sample()
    assert traffic.series() == {
        "interval_s": 2.0,
        "window_s": 600.0,
        "time": [1002.0],
        "models": [],
    }


def test_series_is_json() -> None:
    metrics, clock = Metrics(), Clock()
    traffic = Traffic(metrics.registry, clock=clock)
    traffic.sample()
    finish(metrics, "mnist", 0.003, count=3)
    clock.advance(2.0)
    traffic.sample()
    clock.advance(2.0)
    traffic.sample()

    series = traffic.series()
    assert json.loads(json.dumps(series, allow_nan=False)) == series


@pytest.mark.parametrize(("interval_s", "window_s"), [(0.0, 10.0), (-1.0, 10.0), (5.0, 4.0)])
def test_rejects_a_bad_interval_or_window(interval_s: float, window_s: float) -> None:
    with pytest.raises(ValueError, match="interval_s"):
        Traffic(CollectorRegistry(), interval_s=interval_s, window_s=window_s)


class FlakyRegistry:
    """Fails its first collection; signals once it has been collected `until` times."""

    def __init__(self, until: int) -> None:
        self.calls = 0
        self.until = until
        self.done = asyncio.Event()

    def collect(self) -> Iterable[Metric]:
        self.calls += 1
        if self.calls == self.until:
            self.done.set()
        if self.calls == 1:
            raise RuntimeError("collector broke")
        return []


async def test_run_samples_until_cancelled_and_survives_a_failing_sample(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, clock = FlakyRegistry(until=3), Clock()
    traffic = Traffic(registry, interval_s=0.001, window_s=1.0, clock=clock)
    with caplog.at_level(logging.ERROR, logger="convserve.server.traffic"):
        task = asyncio.create_task(traffic.run())
        await asyncio.wait_for(registry.done.wait(), timeout=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    # The first sample failed; the second and third were kept.
    assert traffic.series()["time"] == [1000.0]
    assert registry.calls == 3
    assert [r.getMessage() for r in caplog.records] == ["traffic sample failed"]
