"""Draw deploy/grafana/dashboards/convserve.json as a PNG from a live Prometheus.

A stand-in for a Grafana screenshot where no Grafana runs: every panel's PromQL
is evaluated through Prometheus' HTTP API over the chosen range and plotted with
matplotlib at the panel's grid position (stat panels show their last value,
table panels their merged instant rows).

    python deploy/grafana/render_dashboard.py --prometheus http://localhost:9090 \
        --minutes 15 --output deploy/grafana/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib

# Render to a file; no display is needed.
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "convserve.json"
# Grafana's variables, with what Grafana would pick for a short range.
VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$model": ".*", "$protocol": ".*"}
UNITS = {"s": "seconds", "reqps": "requests/s", "bytes": "bytes", "percentunit": "ratio"}


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    return expr


def api(prometheus: str, endpoint: str, **params: float | str) -> Any:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{prometheus}/api/v1/{endpoint}?{query}", timeout=30) as reply:
        body = json.load(reply)
    if body["status"] != "success":
        raise RuntimeError(f"{params}: {body}")
    return body["data"]["result"]


def series_of(prometheus: str, target: dict[str, Any], start: float, end: float) -> Any:
    """[(legend, [(time, value), ...]), ...] for one panel query, as Grafana would ask it."""
    expr = substitute(target["expr"])
    if target.get("instant"):
        result = api(prometheus, "query", query=expr, time=end)
        rows = [(s["metric"], [s["value"]]) for s in result]
    else:
        step_s = max((end - start) / 240, 1.0)
        result = api(prometheus, "query_range", query=expr, start=start, end=end, step=step_s)
        rows = [(s["metric"], s["values"]) for s in result]
    return [
        (legend(target["legendFormat"], labels), [(float(t), float(v)) for t, v in values])
        for labels, values in rows
    ]


def stacked(series: list[tuple[str, list[tuple[float, float]]]]) -> Any:
    """Cumulative sums per timestamp, as Grafana's "normal" stacking draws them."""
    totals: dict[float, float] = {}
    result = []
    for name, values in series:
        points = []
        for t, v in values:
            totals[t] = totals.get(t, 0.0) + v
            points.append((t, totals[t]))
        result.append((name, points))
    return result


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    # As Grafana does, a label the series lacks (Prometheus drops empty ones, such as
    # Convolve's model) shows as nothing.
    return re.sub(r"\{\{\s*\w+\s*\}\}", "", text).strip()


def table_rows(prometheus: str, panel: dict[str, Any], end: float) -> list[list[str]]:
    """A table panel as Grafana shows it: header, then one row per merged series.

    Each query's instant series gives its labels and a "Value #<refId>" cell; the
    merge transformation joins series whose shared labels agree; the organize
    transformation hides, orders and renames the columns; value mappings turn
    numbers into text.
    """
    merged: list[dict[str, str]] = []
    for target in panel["targets"]:
        for series in api(prometheus, "query", query=substitute(target["expr"]), time=end):
            cells = dict(series["metric"])
            cells[f"Value #{target['refId']}"] = f"{float(series['value'][1]):.3g}"
            for row in merged:
                shared = (set(row) & set(cells)) - {k for k in cells if k.startswith("Value #")}
                if shared and all(row[k] == cells[k] for k in shared):
                    row.update(cells)
                    break
            else:
                merged.append(cells)
    organize: dict[str, Any] = {}
    for step in panel.get("transformations", []):
        if step["id"] == "organize":
            organize = step["options"]
    order = organize.get("indexByName", {})
    hidden = organize.get("excludeByName", {})
    names = sorted(
        {k for row in merged for k in row if not hidden.get(k)},
        key=lambda k: (order.get(k, len(order)), k),
    )
    renamed = [organize.get("renameByName", {}).get(k, k) for k in names]
    mappings: dict[str, dict[str, Any]] = {}
    for override in panel["fieldConfig"].get("overrides", []):
        for prop in override["properties"]:
            if prop["id"] == "mappings":
                for mapping in prop["value"]:
                    mappings.setdefault(override["matcher"]["options"], {}).update(
                        mapping["options"]
                    )

    def shown(column: str, value: str) -> str:
        mapped = mappings.get(column, {}).get(value)
        return str(mapped["text"]) if mapped else value

    rows = [
        [shown(c, row.get(k, "")) for k, c in zip(names, renamed, strict=True)] for row in merged
    ]
    return [renamed, *sorted(rows)]


def render(prometheus: str, minutes: float, output: Path, end: float | None = None) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    end = time.time() if end is None else end
    start = end - minutes * 60
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    figure = plt.figure(figsize=(18, rows * 0.42), facecolor="#111217")
    unit_w, unit_h = 1 / 24, 1 / rows
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        left = grid["x"] * unit_w + 0.004
        bottom = 1 - (grid["y"] + grid["h"]) * unit_h + 0.004
        width, height = grid["w"] * unit_w - 0.008, grid["h"] * unit_h - 0.008
        if panel["type"] == "row":
            figure.text(
                left,
                bottom + height / 2,
                panel["title"],
                color="#d8d9da",
                fontsize=12,
                weight="bold",
                va="center",
            )
            continue
        # Panel background, title, then the plot inset by room for its tick labels.
        figure.patches.append(
            Rectangle(
                (left, bottom),
                width,
                height,
                transform=figure.transFigure,
                facecolor="#181b1f",
                edgecolor="#2c3235",
                zorder=-1,
            )
        )
        figure.text(
            left + 0.004,
            bottom + height - 0.012,
            panel["title"],
            color="#d8d9da",
            fontsize=9,
            weight="bold",
            va="top",
        )
        if panel["type"] == "table":
            rows = table_rows(prometheus, panel, end)
            widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
            lines = [
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                for row in rows
            ]
            figure.text(
                left + 0.006,
                bottom + height - 0.035,
                "\n".join(lines) if len(rows) > 1 else "no data",
                color="#d8d9da",
                family="monospace",
                fontsize=8,
                va="top",
            )
            continue
        series = [s for t in panel["targets"] for s in series_of(prometheus, t, start, end)]
        unit = panel["fieldConfig"]["defaults"].get("unit", "none")
        if panel["type"] == "stat":
            if not series:
                text = "no data"
            elif panel["options"].get("textMode") == "name":
                text = "\n".join(name for name, _ in series)
            else:
                value = series[0][1][-1][1]
                text = f"{value:.1%}" if unit == "percentunit" else f"{value:.3g}"
            figure.text(
                left + width / 2,
                bottom + height * 0.42,
                text,
                color="#73bf69",
                fontsize=16,
                ha="center",
                va="center",
            )
            continue
        axes = figure.add_axes(
            (left + 0.032, bottom + height * 0.13, width - 0.04, height * 0.72),
            facecolor="#181b1f",
        )
        for spine in axes.spines.values():
            spine.set_color("#2c3235")
        axes.tick_params(colors="#8e8e8e", labelsize=7)
        custom = panel["fieldConfig"]["defaults"].get("custom", {})
        if custom.get("stacking", {}).get("mode") == "normal":
            series = stacked(series)
        for name, values in series:
            axes.plot(
                [(t - end) / 60 for t, _ in values],
                [v for _, v in values],
                linewidth=1.2,
                label=name,
            )
        if series:
            axes.legend(
                fontsize=6,
                loc="upper left",
                facecolor="#181b1f",
                labelcolor="#d8d9da",
                edgecolor="#2c3235",
                ncol=2,
            )
        else:
            axes.text(
                0.5,
                0.5,
                "no data",
                color="#8e8e8e",
                ha="center",
                va="center",
                transform=axes.transAxes,
            )
        axes.set_xlim(-minutes, 0)
        axes.set_xlabel("minutes before the end", color="#8e8e8e", fontsize=7, labelpad=1)
        axes.set_ylabel(UNITS.get(unit, ""), color="#8e8e8e", fontsize=7)
        axes.grid(color="#2c3235", linewidth=0.5)
    figure.savefig(output, dpi=80, facecolor=figure.get_facecolor())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://localhost:9090")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--output", type=Path, default=Path("dashboard.png"))
    parser.add_argument("--end", type=float, help="end of the range, Unix time (default: now)")
    args = parser.parse_args(argv)
    render(args.prometheus.rstrip("/"), args.minutes, args.output, args.end)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
