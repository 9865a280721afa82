"""Sweeps: many load levels, stable measurement windows, a latency threshold, two targets.

* Levels come from a list (``--concurrency 1,4,16``) or a range
  (``--concurrency-range 1:32:4``, ``--rate-range 50:500:50``).
* Each level is one continuous load on one channel: a warm-up, then
  consecutive windows cut out of it (see `bench.run_windows`). With
  `Windows`, windows of `window_s` seconds follow one another until the last
  `stable_windows` agree (each window's throughput and p99 within
  `stability_percent` of their mean, as Triton's perf_analyzer does), or
  `max_windows` have run and the level is marked unstable. Since the load
  never pauses, an overloaded level's queue keeps growing from window to
  window and its p99 drifts: it does not look stable. The level's result
  pools the samples of those last windows; without `Windows` a level is one
  window of the configuration's `duration_s`.
* With a metrics URL, the server's ``/metrics`` is scraped at every window
  boundary, and the server's figures cover the same windows as the client's.
  A scrape that fails leaves that level without server figures (and says
  why); the sweep goes on.
* With a latency threshold, a target's sweep stops after the first level
  whose p99 exceeds it; the knee is the last level before that (the highest
  load that stayed under the threshold).
* With two targets the phases alternate level by level (A1 B1 A2 B2 ...), so
  that both see the same machine conditions, and each level gets the ratio
  B/A of the successful requests per second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from convserve.client import bench_metrics
from convserve.client.bench import run_windows
from convserve.client.bench_config import BenchConfig, Phase, WindowPlan, check_windows
from convserve.client.bench_results import PhaseResult, combine, rounded_ms
from convserve.client.errors import InputError

MAX_LEVELS = 1000


def parse_range(text: str, name: str, kind: type[int] | type[float]) -> list[Any]:
    """``START:END[:STEP]`` as the levels START, START+STEP, ... <= END (STEP default 1)."""
    parts = text.split(":")
    kind_name = "integers" if kind is int else "numbers"
    if len(parts) not in (2, 3):
        raise InputError(f"{name}: expected START:END[:STEP], got {text!r}")
    try:
        values = [kind(p) for p in parts]
    except ValueError:
        raise InputError(
            f"{name}: START, END and STEP must be {kind_name} (START:END[:STEP]), got {text!r}"
        ) from None
    if any(math.isnan(v) or math.isinf(v) for v in values):
        raise InputError(f"{name}: expected finite numbers, got {text!r}")
    start, end = values[0], values[1]
    step = values[2] if len(values) == 3 else 1
    if not start > 0:
        raise InputError(f"{name}: START must be > 0, got {text!r}")
    if end < start:
        raise InputError(f"{name}: END must be >= START, got {text!r}")
    if not step > 0:
        raise InputError(f"{name}: STEP must be > 0, got {text!r}")
    count = math.floor((end - start) / step + 1e-9) + 1
    if count > MAX_LEVELS:
        raise InputError(f"{name}: {count} levels is too many (at most {MAX_LEVELS}), got {text!r}")
    if kind is int:
        return [int(start + i * step) for i in range(count)]
    # Rounded so that 0.1 steps give 0.3, not 0.30000000000000004.
    return [round(start + i * step, 9) for i in range(count)]


@dataclass(frozen=True)
class Windows:
    """How a level is measured: windows until the last few agree, or a cap is reached."""

    window_s: float
    stability_percent: float = 10.0
    max_windows: int = 10
    stable_windows: int = 3

    def __post_init__(self) -> None:
        check_windows(self.window_s, self.max_windows, "--window-s", "--max-windows")
        if not 0 < self.stability_percent < 100:
            raise InputError(
                f"--stability-percent: expected a percentage in (0, 100), "
                f"got {self.stability_percent}"
            )
        if self.stable_windows < 1:
            raise InputError(f"stable windows must be >= 1, got {self.stable_windows}")
        if self.max_windows < self.stable_windows:
            raise InputError(
                f"--max-windows: expected at least {self.stable_windows} (the windows that "
                f"must agree), got {self.max_windows}"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s,
            "stability_percent": self.stability_percent,
            "stable_windows": self.stable_windows,
            "max_windows": self.max_windows,
        }


def _within(values: Sequence[float], percent: float) -> bool:
    if any(math.isnan(v) for v in values):
        return False
    mean = sum(values) / len(values)
    if mean == 0:
        return all(v == 0 for v in values)
    return all(abs(v - mean) <= mean * percent / 100.0 for v in values)


def is_stable(windows: Sequence[PhaseResult], settings: Windows) -> bool:
    """Whether the last `stable_windows` windows agree on throughput and p99."""
    if len(windows) < settings.stable_windows:
        return False
    last = windows[-settings.stable_windows :]
    return _within([w.requests_per_s for w in last], settings.stability_percent) and _within(
        [w.percentile_s(99) for w in last], settings.stability_percent
    )


@dataclass
class LevelResult:
    """One target at one level."""

    target: int  # index into the sweep's targets
    result: PhaseResult  # the windows kept (all of them without Windows), pooled
    windows: list[PhaseResult]  # every window measured, in order
    stable: bool | None  # None: not measured in stable windows
    server: bench_metrics.ServerFigures | None = None
    server_error: str | None = None  # why there are no server figures, when asked for
    ratio: float | None = None  # compare mode, on the second target's rows: B/A req/s

    @property
    def p99_ms(self) -> float:
        return self.result.percentile_s(99) * 1000.0

    def as_dict(self) -> dict[str, Any]:
        data = self.result.as_dict()
        data["target_index"] = self.target
        data["windows"] = len(self.windows)
        data["stable"] = self.stable
        if self.stable is not None:
            data["window_results"] = [
                {
                    "requests_per_s": round(w.requests_per_s, 3),
                    "p99_ms": rounded_ms(w.percentile_s(99)),
                    "requests_ok": w.ok,
                }
                for w in self.windows
            ]
        data["server"] = self.server.as_dict() if self.server is not None else None
        if self.server_error is not None:
            data["server_error"] = self.server_error
        if self.ratio is not None:
            data["ratio_to_first_target"] = round(self.ratio, 4)
        return data


@dataclass
class SweepResult:
    targets: list[BenchConfig]
    levels: list[LevelResult]  # in the order they ran
    threshold_ms: float | None
    stopped: list[bool]  # per target: the threshold ended its sweep early
    knees: list[LevelResult | None]  # per target: the last level under the threshold
    windows: Windows | None = None  # how levels were measured (None: one duration_s window)

    def of(self, target: int) -> list[LevelResult]:
        return [level for level in self.levels if level.target == target]


def measure_level(
    target: int,
    config: BenchConfig,
    phase: Phase,
    windows: Windows | None,
    *,
    metrics_url: str | None = None,
    show_progress: bool = False,
) -> LevelResult:
    """One level on one target (index `target`): one continuous load, measured in windows.

    The server's figures, when `metrics_url` is given, cover the windows kept.
    """
    if windows is None:
        plan = WindowPlan(config.duration_s, 1)
    else:
        plan = WindowPlan(windows.window_s, windows.max_windows)
    settings = windows

    def enough(measured: Sequence[PhaseResult]) -> bool:
        return settings is not None and is_stable(measured, settings)

    scraper = bench_metrics.WindowScraper(metrics_url) if metrics_url else None
    server, server_error = None, None
    try:
        measured = run_windows(
            config,
            phase,
            plan,
            enough,
            on_start=None if scraper is None else lambda at: scraper.start(at, plan.window_s),
            show_progress=show_progress,
        )
        kept = measured if windows is None else measured[-windows.stable_windows :]
        if scraper is not None:
            try:
                first_kept = len(measured) - len(kept)
                server = scraper.figures(first_kept, len(measured), config.model_name)
            except bench_metrics.MetricsError as exc:
                server_error = str(exc)
    finally:
        if scraper is not None:
            scraper.close()
    stable = None if windows is None else is_stable(measured, windows)
    return LevelResult(target, combine(kept), measured, stable, server, server_error)


def sweep(
    targets: Sequence[BenchConfig],
    phases: Sequence[Phase],
    *,
    windows: Windows | None = None,
    threshold_ms: float | None = None,
    metrics_urls: Sequence[str | None] = (),
    show_progress: bool = False,
) -> SweepResult:
    """Run `phases` in order on every target, alternating targets level by level.

    `metrics_urls[i]` (None or missing: none) is scraped during target i's levels.
    """
    if not targets:
        raise InputError("a sweep needs at least one target")
    if threshold_ms is not None and not threshold_ms > 0:
        raise InputError(f"--latency-threshold-ms: expected milliseconds > 0, got {threshold_ms}")
    urls = list(metrics_urls) + [None] * (len(targets) - len(metrics_urls))
    levels: list[LevelResult] = []
    stopped = [False] * len(targets)
    knees: list[LevelResult | None] = [None] * len(targets)
    for phase in phases:
        first: LevelResult | None = None
        for index, config in enumerate(targets):
            if stopped[index]:
                continue
            level = measure_level(
                index, config, phase, windows, metrics_url=urls[index], show_progress=show_progress
            )
            if index == 0:
                first = level
            elif first is not None and first.result.requests_per_s > 0:
                level.ratio = level.result.requests_per_s / first.result.requests_per_s
            levels.append(level)
            if threshold_ms is not None:
                p99 = level.p99_ms
                if math.isnan(p99) or p99 > threshold_ms:
                    stopped[index] = True
                else:
                    knees[index] = level
        if all(stopped):
            break
    return SweepResult(list(targets), levels, threshold_ms, stopped, knees, windows)
