"""The Grafana dashboard: valid JSON, the promised panels, only metrics the server exports."""

from __future__ import annotations

import json
import re
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
# The matcher every selector of a model-labelled metric carries.
MODEL_FILTER = 'model=~"$model"'
# A metric selector with its matchers; strings may hold any character but a quote.
_SELECTOR = re.compile(r'([a-zA-Z_:][\w:]*)\s*\{((?:"(?:[^"\\]|\\.)*"|[^}"])*)\}')


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
    metrics.request_started("convserve", "Predict", "mnist")
    metrics.request_finished("convserve", "Predict", "OK", 0.01, "mnist")
    metrics.request_started("convserve", "Convolve")
    metrics.request_finished("convserve", "Convolve", "OK", 0.01)
    for observer in (
        metrics.batch_observer("Predict", "mnist"),
        metrics.batch_observer("Convolve"),
    ):
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
        assert panel["type"] in {"timeseries", "stat", "table"}, panel["type"]
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
        ("Requests/s by RPC and code", "sum by (model, rpc, code) (rate(convserve_requests_total"),
        (
            "latency p50 / p99",
            "histogram_quantile(0.5, sum by (le, model, rpc) (rate(convserve_request_",
        ),
        (
            "latency p50 / p99",
            "histogram_quantile(0.99, sum by (le, model, rpc) (rate(convserve_request_",
        ),
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


def _model_labelled() -> set[str]:
    """The series the server exports with a `model` label."""
    return {name for name, labels in exported().items() if labels and "model" in labels}


def _unfiltered(expr: str, model_labelled: set[str]) -> list[str]:
    """The uses of model-labelled metrics in `expr` that do not filter on $model:
    selectors without the matcher, then bare metric names."""
    found = []

    def drop(match: re.Match[str]) -> str:
        if match.group(1) in model_labelled and MODEL_FILTER not in match.group(2):
            found.append(match.group(0))
        return " "

    rest = _SELECTOR.sub(drop, expr)
    return found + sorted(usage(rest).metrics & model_labelled)


def test_the_model_variable_selects_models_and_all_keeps_the_model_less_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names.index("model") == names.index("instance") + 1, names
    model = dashboard["templating"]["list"][names.index("model")]
    assert model["type"] == "query"
    assert model["definition"] == "label_values(convserve_model_info, model)"
    assert model["query"]["query"] == model["definition"]
    assert model["multi"] is True
    assert model["includeAll"] is True
    assert model["current"]["value"] == "$__all"
    # Grafana's default All is the listed names joined, which would hide the series
    # with model="" (Convolve, FitKernel) and model="_unknown": All must be a regex
    # that matches them.
    all_value = re.compile(model["allValue"])
    for value in ("mnist", "", "_unknown"):
        assert all_value.fullmatch(value), value


def test_the_protocol_variable_lists_every_protocol_the_server_labels_requests_with() -> None:
    from typing import get_args

    from convserve.server.types import Protocol

    dashboard = json.loads(DASHBOARD.read_text())
    (protocol,) = [v for v in dashboard["templating"]["list"] if v["name"] == "protocol"]
    assert protocol["type"] == "custom"
    listed = protocol["query"].split(",")
    assert sorted(listed) == sorted(get_args(Protocol))
    assert "tfserving-rest" in listed
    # One choice selects its own protocol only: "oip" is not "oip-http".
    for value in listed:
        assert [other for other in listed if re.fullmatch(value, other)] == [value]
        assert re.fullmatch(protocol["allValue"], value)


def test_every_query_of_a_model_labelled_metric_filters_on_the_model() -> None:
    model_labelled = _model_labelled()
    # The request, batching and per-model metrics all carry the label.
    assert {
        "convserve_requests_total",
        "convserve_request_duration_seconds_bucket",
        "convserve_inflight_requests",
        "convserve_queue_wait_seconds_bucket",
        "convserve_model_execution_seconds_bucket",
        "convserve_batch_size_sum",
        "convserve_images_processed_total",
        "convserve_queued_images",
        "convserve_model_info",
        "convserve_model_versions_loaded",
        "convserve_model_loads_total",
        "convserve_model_worker_exits_total",
    } <= model_labelled
    checked = set()
    problems = []
    for query in dashboard_queries(DASHBOARD):
        if query.where.startswith("variable"):
            continue  # the variables list the models; they cannot filter on one
        if usage(query.expr).metrics & model_labelled:
            checked.add(query.where)
        problems += [f"{query.where}: {s}" for s in _unfiltered(query.expr, model_labelled)]
    assert not problems, "\n".join(problems)
    # Panels of every kind were looked at, and the model-load annotation.
    assert {
        "panel 'Serving model version'",
        "panel 'Requests/s'",
        "panel 'Request latency p50 / p99'",
        "panel 'Batch size'",
        "annotation 'Model loads'",
    } <= checked


def test_model_filter_check_notices_an_unfiltered_selector() -> None:
    """The check above can fail: a selector without the filter and a bare name are
    reported; a filtered selector and a metric without the label are not."""
    expr = (
        'sum(rate(convserve_requests_total{model=~"$model", code!="OK"}[1m]))'
        ' / sum(rate(convserve_requests_total{code=~"O}K"}[1m]))'
        ' + max(convserve_device_memory_bytes{instance=~"$instance"})'
        " + count(convserve_model_info)"
    )
    labelled = {"convserve_requests_total", "convserve_model_info"}
    assert _unfiltered(expr, labelled) == [
        'convserve_requests_total{code=~"O}K"}',
        "convserve_model_info",
    ]


@pytest.mark.parametrize(
    "title",
    [
        "Requests/s by RPC and code",
        "Errors/s by RPC and code",
        "Request latency p50 / p99",
        "Queue wait p50 / p99",
        "Batch size",
        "Queue depth",
        "Images/s",
        "Model execution p50 / p99",
    ],
)
def test_per_rpc_panels_draw_one_line_per_model(title: str) -> None:
    queries = [q for q in dashboard_queries(DASHBOARD) if q.where == f"panel {title!r}"]
    assert queries, f"no panel titled {title!r}"
    for query in queries:
        assert {"model", "rpc"} <= usage(query.expr).grouping_labels, query.expr
        assert query.legend.startswith("{{model}} {{rpc}}"), query.legend


def test_the_model_table_shows_version_and_state_per_model() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (table,) = [p for p in dashboard["panels"] if p["type"] == "table"]
    assert table["title"] == "Serving model version"
    # Instant queries as tables, merged into one row per server and model.
    for target in table["targets"]:
        assert (target["format"], target["instant"]) == ("table", True), target["refId"]
        assert {"instance", "model"} <= usage(target["expr"]).grouping_labels, target["expr"]
    assert [t["id"] for t in table["transformations"]] == ["merge", "organize"]
    columns = table["transformations"][1]["options"]["renameByName"]
    info = next(t for t in table["targets"] if "convserve_model_info" in t["expr"])
    assert {"version", "engine", "device"} <= usage(info["expr"]).grouping_labels
    assert columns["version"] == "Version"
    # model_info's value is always 1: hidden; the state is convserve_model_ready.
    assert table["transformations"][1]["options"]["excludeByName"][f"Value #{info['refId']}"]
    ready = next(t for t in table["targets"] if "convserve_model_ready" in t["expr"])
    assert columns[f"Value #{ready['refId']}"] == "State"
    (state,) = [o for o in table["fieldConfig"]["overrides"] if o["matcher"]["options"] == "State"]
    (mapping,) = [p["value"] for p in state["properties"] if p["id"] == "mappings"]
    assert mapping[0]["options"]["1"]["text"] == "ready"
    assert mapping[0]["options"]["0"]["text"] == "not ready"
