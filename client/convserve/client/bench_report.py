"""``convserve bench`` output: the text table, the JSON report and the CSV file."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

from convserve.client.bench_config import BenchConfig
from convserve.client.bench_results import rounded_ms
from convserve.client.bench_sweep import LevelResult, SweepResult
from convserve.client.errors import InputError
from convserve.client.table import format_table

TARGET_LETTERS = "ABCDEFGH"


def target_name(config: BenchConfig) -> str:
    """How a target is shown: protocol@address (and the model when one is named)."""
    model = f" model {config.model_name}" if config.model_name else ""
    return f"{config.protocol}@{config.target}{model}"


def _ms(seconds: float) -> str:
    ms = rounded_ms(seconds)
    return "-" if ms is None else f"{ms:.2f}"


def _shares(level: LevelResult) -> str:
    shares = level.result.replica_shares
    return ", ".join(f"{name} {100.0 * s:.0f}%" for name, s in shares.items()) or "-"


def _windows(level: LevelResult) -> str:
    if level.stable is None:
        return "-"
    return f"{len(level.windows)} {'stable' if level.stable else 'UNSTABLE'}"


def summary_table(sweep: SweepResult) -> str:
    """One row per target and level, in the order they ran.

    Optional columns appear only when they say something: the target letter
    and B/A ratio with two targets, sent/scheduled in open loop, the windows
    with stable measurement, the replica shares when the server names its
    replicas.
    """
    levels = sweep.levels
    compare = len(sweep.targets) > 1
    open_loop = any(level.result.scheduled is not None for level in levels)
    windowed = any(level.stable is not None for level in levels)
    replicas = any(level.result.replicas for level in levels)
    headers = ["target"] if compare else []
    headers += [
        "load", "requests", "req/s", "images/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
        "errors", "gen CPU",
    ]  # fmt: skip
    headers += ["sent"] if open_loop else []
    headers += ["windows"] if windowed else []
    headers += ["B/A req/s"] if compare else []
    headers += ["replicas"] if replicas else []
    rows = []
    for level in levels:
        r = level.result
        row: list[object] = [TARGET_LETTERS[level.target]] if compare else []
        row += [
            r.phase.label,
            r.ok,
            f"{r.requests_per_s:.1f}",
            f"{r.images_per_s:.1f}",
            _ms(r.percentile_s(50)),
            _ms(r.percentile_s(90)),
            _ms(r.percentile_s(99)),
            _ms(r.max_s),
            ", ".join(f"{code} {n}" for code, n in r.errors.items()) or "-",
            f"{r.cpu_cores:.2f} cores",
        ]
        if open_loop:
            fraction = r.sent_fraction
            row.append("-" if fraction is None else f"{100.0 * fraction:.0f}%")
        if windowed:
            row.append(_windows(level))
        if compare:
            row.append("-" if level.ratio is None else f"{level.ratio:.3f}")
        if replicas:
            row.append(_shares(level))
        rows.append(row)
    first = 1 if compare else 0
    right = list(range(first + 1, first + 8))
    return format_table(headers, rows, right=right)


def server_table(sweep: SweepResult) -> str | None:
    """Server-side figures per level (None when no level scraped /metrics)."""
    levels = [level for level in sweep.levels if level.server is not None]
    if not levels:
        return None
    compare = len(sweep.targets) > 1
    headers = ["target"] if compare else []
    headers += [
        "load", "req/s", "model calls", "mean batch", "queue p50 ms", "queue p99 ms",
        "model p50 ms", "model p99 ms",
    ]  # fmt: skip
    rows = []
    for level in levels:
        s = level.server
        assert s is not None
        row: list[object] = [TARGET_LETTERS[level.target]] if compare else []
        row += [
            level.result.phase.label,
            f"{sum(s.requests_ok.values()) / level.result.duration_s:.1f}",
            f"{s.model_calls:.0f}",
            "-" if math.isnan(s.mean_batch_size) else f"{s.mean_batch_size:.2f}",
            _ms(s.queue_wait_p50_s),
            _ms(s.queue_wait_p99_s),
            _ms(s.model_time_p50_s),
            _ms(s.model_time_p99_s),
        ]
        rows.append(row)
    first = 1 if compare else 0
    return format_table(headers, rows, right=range(first + 1, first + 8))


def measurement_note(sweep: SweepResult) -> str:
    """How each level was measured, in words."""
    first, windows = sweep.targets[0], sweep.windows
    if windows is None:
        return f"{first.duration_s:g} s per phase after {first.warmup_s:g} s warm-up"
    return (
        f"consecutive windows of {windows.window_s:g} s of one load until "
        f"{windows.stable_windows} agree within {windows.stability_percent:g}% (at most "
        f"{windows.max_windows}) after {first.warmup_s:g} s warm-up"
    )


def report_text(sweep: SweepResult) -> str:
    """The whole text report: targets, the table(s), the knee, warnings."""
    first = sweep.targets[0]
    windows_note = measurement_note(sweep)
    settings = (
        f"{first.images_per_request} image(s)/request, {first.processes} process(es), "
        + (f"{first.streams} stream(s) per process, " if first.streams else "")
        + windows_note
    )
    if len(sweep.targets) == 1:
        lines = [f"{first.protocol} {first.rpc} -> {first.target}, {settings}"]
    else:
        lines = [
            f"{TARGET_LETTERS[i]}: {c.rpc} -> {target_name(c)}" for i, c in enumerate(sweep.targets)
        ]
        lines.append(settings)
    lines.append(summary_table(sweep))
    server = server_table(sweep)
    if server is not None:
        lines += [
            "",
            "server side (from /metrics, deltas over the same windows as the client's):",
            server,
        ]
    if sweep.threshold_ms is not None:
        for index, knee in enumerate(sweep.knees):
            prefix = f"{TARGET_LETTERS[index]}: " if len(sweep.targets) > 1 else ""
            if knee is None:
                lines.append(
                    f"{prefix}knee: none, p99 exceeded {sweep.threshold_ms:g} ms at the first level"
                )
            else:
                how = "stopped above it" if sweep.stopped[index] else "never exceeded it"
                lines.append(
                    f"{prefix}knee: {knee.result.phase.label}, "
                    f"{knee.result.requests_per_s:.1f} req/s at p99 {knee.p99_ms:.2f} ms "
                    f"(threshold {sweep.threshold_ms:g} ms; {how})"
                )
    cpus = os.cpu_count() or 1
    busiest = max(level.result.cpu_cores for level in sweep.levels)
    lines.append(
        f"generator CPU: up to {busiest:.2f} cores ({100.0 * busiest / cpus:.0f}% of "
        f"{cpus} CPUs); requests and latency percentiles (nearest-rank): the successful "
        "requests sent in the measured windows; req/s: successful answers received in them"
    )
    for level in sweep.levels:
        who = f"{TARGET_LETTERS[level.target]} " if len(sweep.targets) > 1 else ""
        for warning in level.result.generator_warnings():
            lines.append(
                f"warning: {who}{level.result.phase.label}: the generator may have been the "
                f"bottleneck: {warning}"
            )
        if level.server_error is not None:
            lines.append(
                f"warning: {who}{level.result.phase.label}: no server figures: {level.server_error}"
            )
    return "\n".join(lines)


def report_dict(sweep: SweepResult) -> dict[str, Any]:
    """The JSON report. ``phases`` lists every target's levels in the order they ran.

    ``duration_s`` is the measured time per level when each level is one
    window (None with ``windows``, whose settings are given instead); each
    phase's own ``duration_s`` is the time its figures cover.
    """
    first = sweep.targets[0]

    def knee(level: LevelResult | None) -> dict[str, Any] | None:
        if level is None:
            return None
        return {
            "concurrency": level.result.phase.concurrency,
            "rate": level.result.phase.rate,
            "requests_per_s": round(level.result.requests_per_s, 3),
            "p99_ms": round(level.p99_ms, 3),
        }

    return {
        "target": first.target,
        "protocol": first.protocol,
        "rpc": first.rpc,
        "model": first.model_name,
        "images_per_request": first.images_per_request,
        "processes": first.processes,
        "duration_s": first.duration_s if sweep.windows is None else None,
        "warmup_s": first.warmup_s,
        "windows": None if sweep.windows is None else sweep.windows.as_dict(),
        "machine_cpus": os.cpu_count(),
        "targets": [
            {
                "name": TARGET_LETTERS[i],
                "target": c.target,
                "protocol": c.protocol,
                "model": c.model_name,
                "stopped_at_threshold": sweep.stopped[i],
                "knee": knee(sweep.knees[i]),
            }
            for i, c in enumerate(sweep.targets)
        ],
        "latency_threshold_ms": sweep.threshold_ms,
        "phases": [level.as_dict() for level in sweep.levels],
    }


CSV_COLUMNS = [
    "target", "address", "protocol", "mode", "concurrency", "rate", "duration_s",
    "requests_ok", "completed_ok", "errors", "requests_per_s", "images_per_s", "p50_ms",
    "p90_ms", "p99_ms", "max_ms", "generator_cpu_cores", "scheduled", "sent_by_end", "windows",
    "stable", "ratio_to_first_target", "server_requests_ok", "server_mean_batch_size",
    "server_queue_wait_p50_ms", "server_queue_wait_p99_ms", "server_model_time_p50_ms",
    "server_model_time_p99_ms", "replica_shares",
]  # fmt: skip


def csv_rows(sweep: SweepResult) -> list[dict[str, Any]]:
    rows = []
    for level in sweep.levels:
        data = level.as_dict()
        config = sweep.targets[level.target]
        server = data["server"] or {}
        rows.append(
            {
                "target": TARGET_LETTERS[level.target],
                "address": config.target,
                "protocol": config.protocol,
                "mode": data["mode"],
                "concurrency": data["concurrency"],
                "rate": data["rate"],
                "duration_s": data["duration_s"],
                "requests_ok": data["requests_ok"],
                "completed_ok": data["completed_ok"],
                "errors": sum(data["errors"].values()),
                "requests_per_s": data["requests_per_s"],
                "images_per_s": data["images_per_s"],
                "p50_ms": data["latency_ms"]["p50"],
                "p90_ms": data["latency_ms"]["p90"],
                "p99_ms": data["latency_ms"]["p99"],
                "max_ms": data["latency_ms"]["max"],
                "generator_cpu_cores": data["generator_cpu_cores"],
                "scheduled": data["scheduled"],
                "sent_by_end": data["sent_by_end"],
                "windows": data["windows"],
                "stable": data["stable"],
                "ratio_to_first_target": data.get("ratio_to_first_target"),
                "server_requests_ok": sum(server["requests_ok"].values()) if server else None,
                "server_mean_batch_size": server.get("mean_batch_size"),
                "server_queue_wait_p50_ms": server.get("queue_wait_ms", {}).get("p50"),
                "server_queue_wait_p99_ms": server.get("queue_wait_ms", {}).get("p99"),
                "server_model_time_p50_ms": server.get("model_time_ms", {}).get("p50"),
                "server_model_time_p99_ms": server.get("model_time_ms", {}).get("p99"),
                "replica_shares": " ".join(
                    f"{name}={share}" for name, share in data["replica_shares"].items()
                ),
            }
        )
    return rows


def write_csv(sweep: SweepResult, path: str | Path) -> None:
    """One row per target and level; empty cells for what was not measured."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(sweep):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    try:
        Path(path).write_text(out.getvalue())
    except OSError as exc:
        raise InputError(f"--csv {path}: cannot write it ({exc.strerror})") from None


def check_writable(path: str | Path, flag: str) -> None:
    """Fail before the run, not after it, when an output file cannot be written."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{flag} {path}: directory {parent} is not writable")
