"""Server-side figures for a bench level, from the server's Prometheus ``/metrics``.

The bench scrapes ``/metrics`` before and after each level and reads the
difference of three histograms the server keeps (see the server's
``metrics.py``): ``convserve_batch_size`` (images per model call),
``convserve_queue_wait_seconds`` (enqueue to the start of the batch) and
``convserve_model_execution_seconds`` (one model call). Percentiles come from
the bucket deltas, interpolated within a bucket as Prometheus'
``histogram_quantile`` does, so they are as coarse as the server's buckets.

A small parser of the text exposition format keeps the bare client free of
``prometheus_client``.
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from convserve.client.errors import InputError

BATCH_SIZE = "convserve_batch_size"
QUEUE_WAIT = "convserve_queue_wait_seconds"
MODEL_TIME = "convserve_model_execution_seconds"
SCRAPE_TIMEOUT_S = 5.0

# name{labels} value [timestamp]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


class MetricsError(Exception):
    """The metrics endpoint could not be read or parsed."""


def _unescape(value: str) -> str:
    return value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def _labels(text: str, line: str) -> Labels:
    inner = text[1:-1]
    labels = []
    position = 0
    while position < len(inner):
        match = _LABEL.match(inner, position)
        if match is None:
            raise MetricsError(f"cannot parse the labels of {line!r}")
        labels.append((match.group(1), _unescape(match.group(2))))
        position = match.end()
    return tuple(sorted(labels))


def parse_text(text: str) -> Samples:
    """Every sample of a Prometheus text exposition: (name, sorted labels) -> value."""
    samples: Samples = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise MetricsError(f"cannot parse the metrics line {line!r}")
        name, label_text, value = match.group(1), match.group(2), match.group(3)
        labels = _labels(label_text, line) if label_text else ()
        try:
            samples[(name, labels)] = float(value)
        except ValueError:
            raise MetricsError(f"not a number in the metrics line {line!r}") from None
    return samples


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
    """What the server saw during one level (histogram deltas between two scrapes)."""

    model_calls: float
    mean_batch_size: float
    queue_wait_p50_s: float
    queue_wait_p99_s: float
    model_time_p50_s: float
    model_time_p99_s: float

    def as_dict(self) -> dict[str, Any]:
        def ms(seconds: float) -> float | None:
            return None if math.isnan(seconds) else round(seconds * 1000.0, 3)

        return {
            "model_calls": int(self.model_calls),
            "mean_batch_size": None
            if math.isnan(self.mean_batch_size)
            else round(self.mean_batch_size, 3),
            "queue_wait_ms": {"p50": ms(self.queue_wait_p50_s), "p99": ms(self.queue_wait_p99_s)},
            "model_time_ms": {"p50": ms(self.model_time_p50_s), "p99": ms(self.model_time_p99_s)},
        }


def server_figures(before: Samples, after: Samples, model: str = "") -> ServerFigures:
    """The figures between two scrapes; only the series of `model` when it is named.

    Without a model name (the server's default model) every model's series
    count: a bench loads one model, and the others' deltas stay zero.
    """
    match = {"model": model} if model else None

    def delta(name: str) -> Histogram:
        return histogram(after, name, match).minus(histogram(before, name, match))

    batch, queue, model_time = delta(BATCH_SIZE), delta(QUEUE_WAIT), delta(MODEL_TIME)
    return ServerFigures(
        model_calls=batch.count,
        mean_batch_size=batch.mean,
        queue_wait_p50_s=queue.quantile(0.5),
        queue_wait_p99_s=queue.quantile(0.99),
        model_time_p50_s=model_time.quantile(0.5),
        model_time_p99_s=model_time.quantile(0.99),
    )
