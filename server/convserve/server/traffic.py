"""The server's own short history of traffic, for charts drawn without Prometheus.

`Traffic` reads the server's Prometheus registry at a fixed interval and keeps
the last few minutes of per-model totals; `Traffic.series` turns consecutive
snapshots into per-interval rates, latency quantiles, mean batch sizes and
queue depths. Only the metric names and labels of `convserve.server.metrics`
are relied on, and a family the registry lacks reads as zeros.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_REQUESTS = "convserve_requests"
_DURATION = "convserve_request_duration_seconds"
_BATCH_SIZE = "convserve_batch_size"
_QUEUED = "convserve_queued_images"


@dataclass
class _Histogram:
    """One model's histogram, summed over its other labels: cumulative bucket
    counts by ascending upper bound, and the count and sum of observations."""

    bounds: tuple[float, ...] = ()
    buckets: tuple[float, ...] = ()
    count: float = 0.0
    total: float = 0.0


@dataclass
class _ModelTotals:
    """One model's cumulative figures at one snapshot."""

    requests: float = 0.0
    errors: float = 0.0
    duration: _Histogram = field(default_factory=_Histogram)
    batch: _Histogram = field(default_factory=_Histogram)
    queued: float = 0.0


@dataclass
class _Snapshot:
    time: float
    models: dict[str, _ModelTotals]


# One model's figures over one interval: requests/s, errors/s, p50 s, p99 s, mean batch
# size, queue depth at the end.
_Values = tuple[float | None, float | None, float | None, float | None, float | None, float]
_IDLE: _Values = (0.0, 0.0, None, None, None, 0.0)
_FIELDS = ("requests_per_s", "errors_per_s", "p50_s", "p99_s", "batch_size", "queue_depth")


@dataclass
class _Point:
    """One interval, ending at `time`: each model's figures over it."""

    time: float
    models: dict[str, _Values]


class Traffic:
    """A rolling history of the traffic the server's metrics record, per model.

    Call `sample` (or run `run`) every `interval_s`; each sample turns the
    registry's totals since the previous one into one interval's figures, and
    the last `window_s / interval_s` intervals are kept. The work is done once
    per sample, so `series` (which every console tab polls) only copies lists.
    Runs on the event loop (sampling and reading alike), so it takes no locks.
    """

    def __init__(
        self,
        registry: Collector,
        *,
        interval_s: float = 2.0,
        window_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if window_s < interval_s:
            raise ValueError(f"window_s ({window_s}) must be at least interval_s ({interval_s})")
        self._registry = registry
        self.interval_s = float(interval_s)
        self.window_s = float(window_s)
        self._clock = clock
        # The small tolerance keeps e.g. 0.3 / 0.1 (2.9999...) from losing an interval.
        keep = int(self.window_s / self.interval_s + 1e-9)
        self._points: deque[_Point] = deque(maxlen=max(1, keep))
        self._last: _Snapshot | None = None

    def sample(self) -> None:
        """Take one snapshot of the registry now and record the interval since the last."""
        snapshot = _Snapshot(float(self._clock()), _read(self._registry))
        before, self._last = self._last, snapshot
        if before is not None:
            self._points.append(_interval(before, snapshot))

    async def run(self) -> None:
        """Sample every `interval_s` until cancelled; a failing sample is logged and skipped."""
        while True:
            try:
                self.sample()
            except Exception:  # a broken collector must not end the history
                log.exception("traffic sample failed")
            await asyncio.sleep(self.interval_s)

    def series(self) -> dict[str, Any]:
        """The history as plain JSON values.

        ``time`` holds each interval's end (unix seconds); each entry of
        ``models`` (sorted by name, "" for requests naming no model) holds lists
        of the same length: ``requests_per_s``, ``errors_per_s``, ``p50_s``,
        ``p99_s`` (None when no request finished), ``batch_size`` (mean images
        per call, None when no batch ran) and ``queue_depth`` (at the end).
        Rates are None for an interval whose clock did not advance.
        """
        points = list(self._points)
        names = sorted({name for point in points for name in point.models})
        models = []
        for name in names:
            values = [point.models.get(name, _IDLE) for point in points]
            row: dict[str, Any] = {"model": name}
            for index, field_name in enumerate(_FIELDS):
                row[field_name] = [v[index] for v in values]
            models.append(row)
        return {
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "time": [point.time for point in points],
            "models": models,
        }


def _interval(before: _Snapshot, after: _Snapshot) -> _Point:
    """Each model's figures between two snapshots (a model in either of them)."""
    dt = after.time - before.time
    models: dict[str, _Values] = {}
    for name in before.models.keys() | after.models.keys():
        old = before.models.get(name, _ModelTotals())
        new = after.models.get(name, _ModelTotals())
        requests, errors = _request_deltas(old, new)
        duration = _histogram_delta(old.duration, new.duration)
        batch = _histogram_delta(old.batch, new.batch)
        models[name] = (
            requests / dt if dt > 0 else None,
            errors / dt if dt > 0 else None,
            _quantile(0.5, duration),
            _quantile(0.99, duration),
            batch.total / batch.count if batch.count > 0 else None,
            new.queued,
        )
    return _Point(after.time, models)


def _read(registry: Collector) -> dict[str, _ModelTotals]:
    """Sum the registry's traffic samples per model."""
    models: dict[str, _ModelTotals] = {}
    # Bucket counts by upper bound, per model, until every sample is read.
    buckets: dict[tuple[str, str], dict[float, float]] = {}

    def totals(labels: dict[str, str]) -> _ModelTotals:
        return models.setdefault(labels.get("model", ""), _ModelTotals())

    for family in registry.collect():
        if family.name == _REQUESTS:
            for s in family.samples:
                if s.name == _REQUESTS + "_total":
                    t = totals(s.labels)
                    t.requests += s.value
                    if s.labels.get("code") != "OK":
                        t.errors += s.value
        elif family.name in (_DURATION, _BATCH_SIZE):
            for s in family.samples:
                t = totals(s.labels)
                hist = t.duration if family.name == _DURATION else t.batch
                if s.name == family.name + "_bucket":
                    by_bound = buckets.setdefault((family.name, s.labels.get("model", "")), {})
                    bound = float(s.labels["le"])
                    by_bound[bound] = by_bound.get(bound, 0.0) + s.value
                elif s.name == family.name + "_count":
                    hist.count += s.value
                elif s.name == family.name + "_sum":
                    hist.total += s.value
        elif family.name == _QUEUED:
            for s in family.samples:
                if s.name == _QUEUED:
                    totals(s.labels).queued += s.value
    for (name, model), by_bound in buckets.items():
        hist = models[model].duration if name == _DURATION else models[model].batch
        bounds = tuple(sorted(by_bound))
        hist.bounds = bounds
        hist.buckets = tuple(by_bound[b] for b in bounds)
    return models


def _request_deltas(old: _ModelTotals, new: _ModelTotals) -> tuple[float, float]:
    """Requests and failed requests between two snapshots. A total that went
    down means the model's series were reset: the new value is what happened
    since (as Prometheus' rate reads a counter reset)."""
    reset = new.requests < old.requests
    requests = new.requests if reset else new.requests - old.requests
    errors = new.errors if reset or new.errors < old.errors else new.errors - old.errors
    return requests, errors


def _histogram_delta(old: _Histogram, new: _Histogram) -> _Histogram:
    """The observations between two snapshots. Any figure that went down, or a
    change of buckets, means the histogram was reset, so the new one counts whole
    (a bucket-by-bucket choice could mix reset and running buckets)."""
    reset = (
        new.bounds != old.bounds
        or new.count < old.count
        or new.total < old.total
        or any(n < o for n, o in zip(new.buckets, old.buckets, strict=True))
    )
    if reset:
        return new
    return _Histogram(
        bounds=new.bounds,
        buckets=tuple(n - o for n, o in zip(new.buckets, old.buckets, strict=True)),
        count=new.count - old.count,
        total=new.total - old.total,
    )


def _quantile(q: float, hist: _Histogram) -> float | None:
    """The `q`-quantile of a histogram's observations, interpolated linearly
    within its bucket as Prometheus' histogram_quantile does; None without
    observations or without a +Inf bucket."""
    bounds, counts = hist.bounds, hist.buckets
    if len(bounds) < 2 or not math.isinf(bounds[-1]):
        return None
    # Summed series read at slightly different moments can dip; the counts are
    # cumulative, so a dip is read as no change (as Prometheus does).
    monotonic = []
    highest = 0.0
    for count in counts:
        highest = max(highest, count)
        monotonic.append(highest)
    observed = monotonic[-1]
    if observed <= 0:
        return None
    rank = q * observed
    b = next(i for i, count in enumerate(monotonic) if count >= rank)
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start = 0.0 if b == 0 else bounds[b - 1]
    below = 0.0 if b == 0 else monotonic[b - 1]
    return start + (bounds[b] - start) * (rank - below) / (monotonic[b] - below)
