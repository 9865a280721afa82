"""Server-side figures for a bench level, from the server's Prometheus ``/metrics``.

The bench scrapes ``/metrics`` at every window boundary of a level
(`WindowScraper`), so that the server's figures cover exactly the windows
the client's figures pool, and reads the difference of the server's request
counter (``convserve_requests_total``, successful requests per protocol) and
three histograms it keeps (see the server's ``metrics.py``):
``convserve_batch_size`` (images per model call),
``convserve_queue_wait_seconds`` (enqueue to the start of the batch) and
``convserve_model_execution_seconds`` (one model call). Percentiles come from
the bucket deltas, interpolated within a bucket as Prometheus'
``histogram_quantile`` does, so they are as coarse as the server's buckets.
The text exposition format is read by ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from convserve.client.bench_results import rounded_ms
from convserve.client.errors import InputError

REQUESTS = "convserve_requests_total"
BATCH_SIZE = "convserve_batch_size"
QUEUE_WAIT = "convserve_queue_wait_seconds"
MODEL_TIME = "convserve_model_execution_seconds"
SCRAPE_TIMEOUT_S = 5.0
# A boundary's scrape later than this share of a window (or than the floor, for
# short windows) no longer marks the boundary.
LATE_SCRAPE_FRACTION = 0.25
LATE_SCRAPE_FLOOR_S = 0.1

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


class MetricsError(Exception):
    """The metrics endpoint could not be read or parsed."""


def parse_text(text: str) -> Samples:
    """Every sample of a Prometheus text exposition: (name, sorted labels) -> value."""
    # Imported here: prometheus_client pulls in an HTTP server, which would slow every
    # command's start-up for what only ``bench --metrics-url`` needs.
    from prometheus_client.parser import text_string_to_metric_families

    try:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
    except ValueError as exc:
        raise MetricsError(f"cannot parse the metrics ({exc})") from exc


def scrape(url: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> Samples:
    """GET `url` and parse it; MetricsError names the URL when that fails."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MetricsError(f"--metrics-url {url}: cannot read it ({exc})") from exc
    return parse_text(body)


def check_url(url: str) -> str:
    """`url` if it looks like an http(s) URL, else an InputError naming --metrics-url."""
    if not re.match(r"^https?://[^/\s]+", url):
        raise InputError(f"--metrics-url: expected http://HOST:PORT/metrics, got {url!r}")
    return url


@dataclass(frozen=True)
class Histogram:
    """One histogram summed over the series that match: cumulative buckets, sum, count."""

    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending
    sum: float
    count: float

    def minus(self, earlier: Histogram) -> Histogram:
        before = dict(earlier.buckets)
        return Histogram(
            tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets),
            self.sum - earlier.sum,
            self.count - earlier.count,
        )

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count > 0 else math.nan

    def quantile(self, q: float) -> float:
        """Prometheus' histogram_quantile: linear within the bucket holding rank q*count."""
        if self.count <= 0 or not self.buckets:
            return math.nan
        rank = q * self.buckets[-1][1]
        lower, below = 0.0, 0.0
        for upper, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(upper):
                    return lower  # the rank is beyond the last finite bound
                inside = cumulative - below
                if inside <= 0:
                    return upper
                return lower + (upper - lower) * (rank - below) / inside
            lower, below = upper, cumulative
        return lower


def histogram(samples: Samples, name: str, match: Mapping[str, str] | None = None) -> Histogram:
    """The histogram `name` summed over every series whose labels include `match`."""
    wanted = set((match or {}).items())
    buckets: dict[float, float] = {}
    total = count = 0.0
    for (sample_name, labels), value in samples.items():
        if not wanted <= set(labels):
            continue
        if sample_name == f"{name}_bucket":
            le = dict(labels).get("le")
            if le is not None:
                bound = float(le)
                buckets[bound] = buckets.get(bound, 0.0) + value
        elif sample_name == f"{name}_sum":
            total += value
        elif sample_name == f"{name}_count":
            count += value
    return Histogram(tuple(sorted(buckets.items())), total, count)


@dataclass(frozen=True)
class ServerFigures:
    """What the server saw during one level's measured windows (deltas between two scrapes)."""

    requests_ok: dict[str, float]  # protocol -> successful requests the server answered
    model_calls: float
    mean_batch_size: float
    queue_wait_p50_s: float
    queue_wait_p99_s: float
    model_time_p50_s: float
    model_time_p99_s: float

    def as_dict(self) -> dict[str, Any]:
        ms = rounded_ms
        return {
            "requests_ok": {protocol: int(n) for protocol, n in sorted(self.requests_ok.items())},
            "model_calls": int(self.model_calls),
            "mean_batch_size": None
            if math.isnan(self.mean_batch_size)
            else round(self.mean_batch_size, 3),
            "queue_wait_ms": {"p50": ms(self.queue_wait_p50_s), "p99": ms(self.queue_wait_p99_s)},
            "model_time_ms": {"p50": ms(self.model_time_p50_s), "p99": ms(self.model_time_p99_s)},
        }


def _requests_ok(samples: Samples, match: Mapping[str, str] | None) -> dict[str, float]:
    """Successful requests per protocol label (of `match`'s series only)."""
    wanted = {("code", "OK"), *(match or {}).items()}
    counts: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if name == REQUESTS and wanted <= set(labels):
            protocol = dict(labels).get("protocol", "")
            counts[protocol] = counts.get(protocol, 0.0) + value
    return counts


def server_figures(before: Samples, after: Samples, model: str = "") -> ServerFigures:
    """The figures between two scrapes; only the series of `model` when it is named.

    Without a model name (the server's default model) every model's series
    count: a bench loads one model, and the others' deltas stay zero.
    """
    match = {"model": model} if model else None

    def delta(name: str) -> Histogram:
        return histogram(after, name, match).minus(histogram(before, name, match))

    batch, queue, model_time = delta(BATCH_SIZE), delta(QUEUE_WAIT), delta(MODEL_TIME)
    requests_before = _requests_ok(before, match)
    return ServerFigures(
        requests_ok={
            protocol: n - requests_before.get(protocol, 0.0)
            for protocol, n in _requests_ok(after, match).items()
        },
        model_calls=batch.count,
        mean_batch_size=batch.mean,
        queue_wait_p50_s=queue.quantile(0.5),
        queue_wait_p99_s=queue.quantile(0.99),
        model_time_p50_s=model_time.quantile(0.5),
        model_time_p99_s=model_time.quantile(0.99),
    )


class WindowScraper:
    """Scrapes a ``/metrics`` URL at every window boundary of one level, on its own thread.

    Boundary k is ``first_start + k * window_s`` (`time.perf_counter()` time);
    `figures` reads the deltas between two boundaries, so that the server's
    figures cover the same windows as the client's.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._scrapes: dict[int, Samples | str] = {}  # boundary -> samples or why none
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, first_start: float, window_s: float) -> None:
        """Begin scraping at `first_start`, then every `window_s` until `close`."""
        self._thread = threading.Thread(
            target=self._run, args=(first_start, window_s), name="metrics-scraper", daemon=True
        )
        self._thread.start()

    def _run(self, first_start: float, window_s: float) -> None:
        k = 0
        while not self._stop.wait(max(0.0, first_start + k * window_s - time.perf_counter())):
            boundary = first_start + k * window_s
            result: Samples | str
            try:
                result = scrape(self.url)
            except MetricsError as exc:
                result = str(exc)
            # The scrape's time is when the server's counters were read: at the
            # response, at the latest.
            late_s = time.perf_counter() - boundary
            tolerance_s = max(LATE_SCRAPE_FRACTION * window_s, LATE_SCRAPE_FLOOR_S)
            if isinstance(result, dict) and late_s > tolerance_s:
                result = (
                    f"--metrics-url {self.url}: the scrape at a window boundary came "
                    f"{late_s:.2f} s late"
                )
            with self._changed:
                self._scrapes[k] = result
                self._changed.notify_all()
            k += 1

    def _at(self, boundary: int) -> Samples:
        with self._changed:
            self._changed.wait_for(
                lambda: boundary in self._scrapes or self._thread is None,
                timeout=SCRAPE_TIMEOUT_S + 1.0,
            )
            result = self._scrapes.get(boundary)
        if result is None:
            raise MetricsError(f"--metrics-url {self.url}: no scrape at window boundary {boundary}")
        if isinstance(result, str):
            raise MetricsError(result)
        return result

    def figures(self, first: int, end: int, model: str = "") -> ServerFigures:
        """The server's figures over windows `first` to `end` - 1 (MetricsError if unknown)."""
        return server_figures(self._at(first), self._at(end), model)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=SCRAPE_TIMEOUT_S + 1.0)
