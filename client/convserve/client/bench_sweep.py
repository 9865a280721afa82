"""Sweeps: many load levels, stable measurement windows, a latency threshold, two targets.

* Levels come from a list (``--concurrency 1,4,16``) or a range
  (``--concurrency-range 1:32:4``, ``--rate-range 50:500:50``).
* With `Windows`, a level is measured in windows of `window_s` seconds until
  the last `stable_windows` windows agree (each window's throughput and p99
  within `stability_percent` of their mean, as Triton's perf_analyzer does), or
  `max_windows` have run and the level is marked unstable. The level's result
  pools the samples of those last windows. The warm-up runs once per level,
  before the first window, and is not measured.
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
from dataclasses import dataclass, replace
from typing import Any

from convserve.client import bench_metrics
from convserve.client.bench import BenchConfig, Phase, PhaseResult, combine, run_phase
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
        if not self.window_s > 0:
            raise InputError(f"--window-s: expected seconds > 0, got {self.window_s}")
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
    result: PhaseResult
    windows: int  # windows measured (1 without Windows)
    stable: bool | None  # None: not measured in windows
    server: bench_metrics.ServerFigures | None = None
    ratio: float | None = None  # compare mode, on the second target's rows: B/A req/s

    @property
    def p99_ms(self) -> float:
        return self.result.percentile_s(99) * 1000.0

    def as_dict(self) -> dict[str, Any]:
        data = self.result.as_dict()
        data["target_index"] = self.target
        data["windows"] = self.windows
        data["stable"] = self.stable
        data["server"] = self.server.as_dict() if self.server is not None else None
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

    def of(self, target: int) -> list[LevelResult]:
        return [level for level in self.levels if level.target == target]


def measure_level(
    config: BenchConfig,
    phase: Phase,
    windows: Windows | None,
    *,
    metrics_url: str | None = None,
    show_progress: bool = False,
) -> tuple[PhaseResult, int, bool | None, bench_metrics.ServerFigures | None]:
    """One level on one target: (result, windows run, stable or None, server figures).

    Server figures cover the measured time: the whole phase without windows
    (its warm-up included), else every window of the level.
    """
    if windows is None:
        before = bench_metrics.scrape(metrics_url) if metrics_url else None
        result = run_phase(config, phase, show_progress=show_progress)
        server = None
        if metrics_url and before is not None:
            server = bench_metrics.server_figures(
                before, bench_metrics.scrape(metrics_url), config.model_name
            )
        return result, 1, None, server
    if config.warmup_s > 0:
        warm = replace(config, duration_s=config.warmup_s, warmup_s=0.0)
        run_phase(warm, phase, show_progress=show_progress)
    window_config = replace(config, duration_s=windows.window_s, warmup_s=0.0)
    before = bench_metrics.scrape(metrics_url) if metrics_url else None
    measured: list[PhaseResult] = []
    while len(measured) < windows.max_windows:
        measured.append(run_phase(window_config, phase, show_progress=show_progress))
        if is_stable(measured, windows):
            break
    server = None
    if metrics_url and before is not None:
        server = bench_metrics.server_figures(
            before, bench_metrics.scrape(metrics_url), config.model_name
        )
    stable = is_stable(measured, windows)
    return combine(measured[-windows.stable_windows :]), len(measured), stable, server


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

    `metrics_urls[i]` (None or missing: none) is scraped around target i's levels.
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
        at_this_level: dict[int, LevelResult] = {}
        for index, config in enumerate(targets):
            if stopped[index]:
                continue
            result, count, stable, server = measure_level(
                config, phase, windows, metrics_url=urls[index], show_progress=show_progress
            )
            level = LevelResult(index, result, count, stable, server)
            if index > 0 and 0 in at_this_level:
                first = at_this_level[0].result.requests_per_s
                level.ratio = result.requests_per_s / first if first > 0 else None
            at_this_level[index] = level
            levels.append(level)
            if threshold_ms is not None:
                p99 = level.p99_ms
                if math.isnan(p99) or p99 > threshold_ms:
                    stopped[index] = True
                else:
                    knees[index] = level
        if all(stopped):
            break
    return SweepResult(list(targets), levels, threshold_ms, stopped, knees)
