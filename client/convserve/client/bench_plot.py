"""``convserve bench --plot FILE.png``: latency percentiles against achieved throughput.

One colour per target, one line style per percentile (p50, p90, p99), the
latency threshold as a horizontal line and each target's knee circled.
matplotlib is imported only here, and only when a plot is asked for (the
``plot`` extra), so the bare client stays thin. The data drawn is returned,
and also stored in the PNG as a ``tEXt`` chunk (key `SERIES_KEY`, JSON), so
that the numbers behind a picture can be read back (`read_series`).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

from convserve.client.bench_report import TARGET_LETTERS, target_name
from convserve.client.bench_sweep import SweepResult
from convserve.client.errors import InputError

SERIES_KEY = "convserve-bench-series"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PERCENTILES = (("p50", 50, ":"), ("p90", 90, "--"), ("p99", 99, "-"))


def _import_pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'convserve[plot]'") from exc
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def check_available() -> None:
    """ImportError naming the plot extra unless matplotlib loads: checked before a run,
    so that a missing extra does not cost a whole sweep."""
    _import_pyplot()


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def plot_series(sweep: SweepResult) -> dict[str, Any]:
    """The data a plot of `sweep` shows: per target, throughput and latency percentiles."""
    targets = []
    for index, config in enumerate(sweep.targets):
        levels = sweep.of(index)
        knee = sweep.knees[index]
        series: dict[str, Any] = {
            "name": f"{TARGET_LETTERS[index]}: {target_name(config)}",
            "label": f"{TARGET_LETTERS[index]} {config.protocol}",
            "loads": [level.result.phase.label for level in levels],
            "requests_per_s": [round(level.result.requests_per_s, 4) for level in levels],
        }
        for key, q, _ in _PERCENTILES:
            series[f"{key}_ms"] = [
                _number(level.result.percentile_s(q) * 1000.0) for level in levels
            ]
        series["knee"] = (
            None
            if knee is None
            else {
                "load": knee.result.phase.label,
                "requests_per_s": round(knee.result.requests_per_s, 4),
                "p99_ms": _number(knee.p99_ms),
            }
        )
        targets.append(series)
    return {"threshold_ms": sweep.threshold_ms, "targets": targets}


def plot(sweep: SweepResult, path: str | Path, title: str | None = None) -> dict[str, Any]:
    """Draw `sweep` into the PNG file `path`; returns the series drawn (see `plot_series`)."""
    plt = _import_pyplot()
    series = plot_series(sweep)
    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, target in enumerate(series["targets"]):
        colour = colours[index % len(colours)]
        x = target["requests_per_s"]
        for key, _, style in _PERCENTILES:
            y = [math.nan if v is None else v for v in target[f"{key}_ms"]]
            axes.plot(
                x, y, style, marker="o", markersize=3, color=colour,
                label=f"{target['label']} {key}",
            )  # fmt: skip
        # Each point names its load: throughput can fall as load rises, so the
        # line does not always run left to right.
        for load, px, py in zip(target["loads"], x, target["p99_ms"], strict=True):
            if py is not None:
                axes.annotate(
                    load.split(" ", 1)[-1], (px, py), textcoords="offset points",
                    xytext=(4, 4), fontsize="x-small", color=colour,
                )  # fmt: skip
        knee = target["knee"]
        if knee is not None and knee["p99_ms"] is not None:
            axes.plot(
                [knee["requests_per_s"]], [knee["p99_ms"]], "o", markersize=12,
                markerfacecolor="none", markeredgecolor=colour, markeredgewidth=2,
                label=f"{TARGET_LETTERS[index]} knee: {knee['load']}",
            )  # fmt: skip
    if series["threshold_ms"] is not None:
        axes.axhline(
            series["threshold_ms"], color="red", linewidth=1, linestyle="-.",
            label=f"p99 threshold {series['threshold_ms']:g} ms",
        )  # fmt: skip
    axes.set_xlabel("achieved throughput (successful requests/s)")
    # Latencies span milliseconds to seconds once a server saturates.
    axes.set_yscale("log")
    axes.set_ylabel("latency (ms, log scale)")
    if title is None:
        title = "; ".join(t["name"] for t in series["targets"])
    axes.set_title(title, fontsize="medium")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    try:
        figure.savefig(path, format="png", metadata={SERIES_KEY: json.dumps(series)})
    except OSError as exc:
        raise InputError(f"--plot {path}: cannot write it ({exc.strerror})") from None
    finally:
        plt.close(figure)
    return series


def read_series(path: str | Path) -> dict[str, Any]:
    """The series stored in a PNG written by `plot` (ValueError if it is not one)."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file")
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"{path}: corrupt {kind!r} chunk")
        if kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            if key.decode("latin-1") == SERIES_KEY:
                return dict(json.loads(text.decode("latin-1")))
        if kind == b"IEND":
            break
        position += 12 + length
    raise ValueError(f"{path}: no {SERIES_KEY} chunk")
