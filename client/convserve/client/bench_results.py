"""What ``convserve bench`` measured: one process's share of a window (`WorkerResult`),
and a phase's windows pooled across processes (`PhaseResult`, `merge`, `combine`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convserve.client.bench_config import Phase

# Generator-bottleneck warnings: an open loop that sent less than this share of
# its schedule by the window's end, or a process using at least this many cores.
SENT_FRACTION_WARNING = 0.95
BUSY_PROCESS_CORES = 0.9


@dataclass
class WorkerResult:
    """One process's share of one measurement window: raw samples, so that merging is exact.

    Latency samples and status codes belong to the requests *sent* (open loop:
    scheduled) in the window, each awaited even when it ends after the window,
    so that no slow answer escapes the window it was asked in. `completed`
    counts the successful answers *received* in the window, whenever they were
    sent: the achieved throughput, which an overloaded server keeps at its
    capacity however many requests are offered.
    """

    latencies_s: np.ndarray  # successful requests sent in the window
    codes: dict[str, int]  # status code name -> requests sent in the window (OK included)
    completed: int  # successful answers received in the window
    cpu_s: float
    wall_s: float
    # Successful requests in the window per replica name (the server's trailing
    # ``convserve-replica`` metadata); empty when the server sends none.
    replicas: dict[str, int] = field(default_factory=dict)
    # Open loop: requests scheduled in the window, and how many of them had gone
    # out by the window's end (fewer when the generator fell behind its schedule).
    scheduled: int | None = None
    sent_by_end: int | None = None


def rounded_ms(seconds: float) -> float | None:
    """Seconds as milliseconds rounded to the microsecond; None for NaN (nothing measured)."""
    return None if math.isnan(seconds) else round(seconds * 1000.0, 3)


@dataclass
class PhaseResult:
    """A phase's measured time: one window, or several pooled (see `combine`)."""

    phase: Phase
    duration_s: float  # measured time: the window(s), warm-up excluded
    images_per_request: int
    latencies_s: np.ndarray
    codes: dict[str, int]
    completed: int  # successful answers received within the measured time
    cpu_s: list[float]  # per process
    wall_s: list[float]
    replicas: dict[str, int] = field(default_factory=dict)
    scheduled: int | None = None
    sent_by_end: int | None = None

    @property
    def ok(self) -> int:
        """Successful requests among those sent in the measured time (the latency samples)."""
        return self.codes.get("OK", 0)

    @property
    def errors(self) -> dict[str, int]:
        return {code: n for code, n in sorted(self.codes.items()) if code != "OK"}

    @property
    def requests_per_s(self) -> float:
        """Achieved throughput: successful answers received per second of measured time."""
        return self.completed / self.duration_s

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.images_per_request

    def percentile_s(self, q: float) -> float:
        """Nearest-rank percentile of the successful requests' latencies (NaN if none)."""
        if self.latencies_s.size == 0:
            return math.nan
        return float(np.percentile(self.latencies_s, q, method="inverted_cdf"))

    @property
    def max_s(self) -> float:
        return float(self.latencies_s.max()) if self.latencies_s.size else math.nan

    @property
    def cpu_cores(self) -> float:
        """The generator's CPU use in cores: per-process CPU time / wall time, summed."""
        return sum(self.cpu_per_process)

    @property
    def cpu_per_process(self) -> list[float]:
        return [c / w if w > 0 else 0.0 for c, w in zip(self.cpu_s, self.wall_s, strict=True)]

    @property
    def sent_fraction(self) -> float | None:
        """Open loop: the share of the scheduled requests sent by the window's end."""
        if self.scheduled is None or self.sent_by_end is None or self.scheduled == 0:
            return None
        return self.sent_by_end / self.scheduled

    @property
    def replica_shares(self) -> dict[str, float]:
        """Each replica's share of the successful requests that named their replica."""
        total = sum(self.replicas.values())
        return {name: n / total for name, n in sorted(self.replicas.items())} if total else {}

    def generator_warnings(self) -> list[str]:
        """Why the generator, not the server, may have limited this phase (empty if it kept up)."""
        warnings = []
        fraction = self.sent_fraction
        if fraction is not None and fraction < SENT_FRACTION_WARNING:
            warnings.append(
                f"sent only {self.sent_by_end} of {self.scheduled} scheduled requests "
                f"({100.0 * fraction:.0f}%) by the end of the window"
            )
        busy = [i for i, c in enumerate(self.cpu_per_process) if c >= BUSY_PROCESS_CORES]
        if busy:
            warnings.append(
                f"generator process(es) {', '.join(map(str, busy))} used "
                f">= {BUSY_PROCESS_CORES:g} core each (try --processes)"
            )
        return warnings

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": "closed" if self.phase.concurrency is not None else "open",
            "concurrency": self.phase.concurrency,
            "rate": self.phase.rate,
            "duration_s": round(self.duration_s, 6),
            "requests_ok": self.ok,
            "completed_ok": self.completed,
            "errors": self.errors,
            "requests_per_s": round(self.requests_per_s, 3),
            "images_per_s": round(self.images_per_s, 3),
            "latency_ms": {
                "p50": rounded_ms(self.percentile_s(50)),
                "p90": rounded_ms(self.percentile_s(90)),
                "p99": rounded_ms(self.percentile_s(99)),
                "max": rounded_ms(self.max_s),
            },
            "generator_cpu_cores": round(self.cpu_cores, 4),
            "generator_cpu_per_process": [
                round(c / w, 4) if w > 0 else None
                for c, w in zip(self.cpu_s, self.wall_s, strict=True)
            ],
            "scheduled": self.scheduled,
            "sent_by_end": self.sent_by_end,
            "generator_warnings": self.generator_warnings(),
            "replica_requests": dict(sorted(self.replicas.items())),
            "replica_shares": {k: round(v, 4) for k, v in self.replica_shares.items()},
        }


def _pool(
    phase: Phase,
    duration_s: float,
    images_per_request: int,
    parts: Sequence[WorkerResult] | Sequence[PhaseResult],
    cpu_s: list[float],
    wall_s: list[float],
) -> PhaseResult:
    """Samples and counts of `parts` pooled (no averaging of percentiles)."""
    codes: Counter[str] = Counter()
    replicas: Counter[str] = Counter()
    for part in parts:
        codes.update(part.codes)
        replicas.update(part.replicas)
    latencies = [p.latencies_s for p in parts if p.latencies_s.size]
    open_loop = all(p.scheduled is not None for p in parts)
    return PhaseResult(
        phase=phase,
        duration_s=duration_s,
        images_per_request=images_per_request,
        latencies_s=np.sort(np.concatenate(latencies)) if latencies else np.zeros(0),
        codes=dict(codes),
        completed=sum(p.completed for p in parts),
        cpu_s=cpu_s,
        wall_s=wall_s,
        replicas=dict(replicas),
        scheduled=sum(p.scheduled or 0 for p in parts) if open_loop else None,
        sent_by_end=sum(p.sent_by_end or 0 for p in parts) if open_loop else None,
    )


def merge(
    phase: Phase, duration_s: float, images_per_request: int, parts: Sequence[WorkerResult]
) -> PhaseResult:
    """One window: every process's share of it, with CPU and wall time per process."""
    return _pool(
        phase,
        duration_s,
        images_per_request,
        parts,
        cpu_s=[p.cpu_s for p in parts],
        wall_s=[p.wall_s for p in parts],
    )


def combine(results: Sequence[PhaseResult]) -> PhaseResult:
    """Several windows of one phase as one: samples pooled, times added up per process."""
    if not results:
        raise ValueError("combine needs at least one result")
    first = results[0]
    return _pool(
        first.phase,
        sum(r.duration_s for r in results),
        first.images_per_request,
        results,
        cpu_s=[sum(cs) for cs in zip(*(r.cpu_s for r in results), strict=True)],
        wall_s=[sum(ws) for ws in zip(*(r.wall_s for r in results), strict=True)],
    )
