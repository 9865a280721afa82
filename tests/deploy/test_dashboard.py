"""The Grafana dashboard: valid JSON, the promised panels, only metrics the server exports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric

from tests.deploy.common import ALERT_RULES, DASHBOARD, DEPLOY
from tests.deploy.promql import Query, dashboard_queries, legend_labels, rule_queries, usage

# Labels Prometheus attaches to every scraped series, and the histogram bucket bound.
TARGET_LABELS = {"instance", "job"}
# Series Prometheus itself writes for each target.
PROMETHEUS_SERIES: dict[str, set[str]] = {"up": set(), "scrape_duration_seconds": set()}


def _queries() -> list[Query]:
    return [*dashboard_queries(DASHBOARD), *rule_queries(ALERT_RULES)]


def _series_names(family: Metric) -> set[str]:
    """The sample names a metric family is exposed as in the text format."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
    }.get(family.type, ("",))
    return {family.name + suffix for suffix in suffixes}


def _exercise(metrics: Any) -> None:
    """Record one of everything through the public Metrics API, so labelled series exist."""
    metrics.request_started("convserve", "Predict")
    metrics.request_finished("convserve", "Predict", "OK", 0.01)
    observer = metrics.batch_observer("Predict")
    observer.on_queue_depth(3)
    observer.on_batch(2, 2, [0.001, 0.002], 0.005)
    metrics.model_loaded("mnist", 1, True)
    metrics.serving("mnist", 1, "/device:CPU:0", "litert", 1)


def exported() -> dict[str, set[str] | None]:
    """Series name -> its label names (None: registered but no sample to read labels from).

    Read from the server's own registry, `convserve.server.metrics.Metrics`.
    """
    from convserve.server.metrics import Metrics

    metrics = Metrics()
    _exercise(metrics)
    names: dict[str, set[str] | None] = {}
    for family in metrics.registry.collect():
        for name in _series_names(family):
            names.setdefault(name, None)
        for sample in family.samples:
            labels = names.get(sample.name) or set()
            names[sample.name] = labels | set(sample.labels)
    return names


def _uses() -> Iterator[tuple[Query, str, set[str]]]:
    """(query, metric, labels the query needs that metric to have)."""
    for query in _queries():
        found = usage(query.expr)
        assert found.metrics, f"{query.where}: no metric in {query.expr!r}"
        for metric in found.metrics:
            yield query, metric, found.matched_labels[metric]


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "convserve"
    assert isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert 0 < grid["w"] <= 24 - grid["x"], panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']!r} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat"}, panel["type"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"{panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    provisioned = (
        DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
    ).read_text()
    assert f"uid: {variables['datasource']['current']['value']}" in provisioned


@pytest.mark.parametrize(
    ("title_word", "needle"),
    [
        ("Requests/s by RPC and code", "sum by (rpc, code) (rate(convserve_requests_total"),
        ("latency p50 / p99", "histogram_quantile(0.5, sum by (le, rpc) (rate(convserve_request_"),
        ("latency p50 / p99", "histogram_quantile(0.99, sum by (le, rpc) (rate(convserve_request_"),
        ("Queue wait", "convserve_queue_wait_seconds_bucket"),
        ("Batch size", "convserve_batch_size"),
        ("Queue depth", "convserve_queued_images"),
        ("Errors/s", 'code!="OK"'),
        ("Device memory", "convserve_device_memory_bytes"),
        ("model version", "convserve_model_info"),
    ],
)
def test_dashboard_has_the_promised_panel(title_word: str, needle: str) -> None:
    queries = [q for q in dashboard_queries(DASHBOARD) if title_word.lower() in q.where.lower()]
    assert queries, f"no panel titled like {title_word!r}"
    assert any(needle in q.expr for q in queries), [q.expr for q in queries]


def test_every_queried_metric_is_exported_by_the_server() -> None:
    names = exported()
    missing = {
        f"{query.where}: {metric}"
        for query, metric, _ in _uses()
        if metric not in names and metric not in PROMETHEUS_SERIES
    }
    assert not missing, f"queried but not exported: {sorted(missing)}"


def test_every_label_a_query_relies_on_exists() -> None:
    names = exported()
    problems = []
    for query in _queries():
        found = usage(query.expr)
        available = set(TARGET_LABELS)
        unknown = False
        for metric in found.metrics:
            labels = names.get(metric, PROMETHEUS_SERIES.get(metric))
            if labels is None:
                # Registered, but without a sample to read labels from (device
                # memory on a CPU-only machine): nothing to compare against.
                unknown = True
                continue
            available |= labels
            wrong = found.matched_labels[metric] - labels - TARGET_LABELS
            if wrong:
                problems.append(f"{query.where}: {metric} has no label {sorted(wrong)}")
        if any(m.endswith("_bucket") for m in found.metrics):
            available.add("le")
        for label in found.grouping_labels | legend_labels(query.legend):
            if label not in available and not unknown:
                problems.append(f"{query.where}: no metric in it has label {label!r}")
    assert not problems, "\n".join(problems)


def test_metric_check_notices_an_unknown_metric() -> None:
    """The comparison above can fail: a misspelt name is not in the export."""
    names = exported()
    assert "convserve_requests_total" in names
    misspelt = usage('sum(rate(convserve_request_total{code="OK"}[$__rate_interval]))')
    assert misspelt.metrics == {"convserve_request_total"}
    assert not misspelt.metrics <= set(names)
