"""Prometheus: promtool on deploy/'s config and rules; a real Prometheus scraping a real server."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_tool
from tests.deploy.common import ALERT_RULES, DASHBOARD, PROMETHEUS_CONFIG, run
from tests.deploy.promql import dashboard_queries, rule_queries, substitute_grafana_variables
from tests.polling import wait_for
from tests.server.wire_helpers import PrometheusProcess, prometheus_process

ALERTS_TEST = PROMETHEUS_CONFIG.parent / "alerts_test.yml"


def test_promtool_accepts_the_config_and_finds_the_rules() -> None:
    report = run([require_tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)])
    assert "SUCCESS: 1 rule files found" in report


def test_promtool_accepts_the_alert_rules() -> None:
    report = run([require_tool("promtool"), "check", "rules", str(ALERT_RULES)])
    assert f"SUCCESS: {len(list(rule_queries(ALERT_RULES)))} rules found" in report


def test_alerts_fire_as_their_unit_tests_expect() -> None:
    report = run([require_tool("promtool"), "test", "rules", str(ALERTS_TEST)])
    assert "SUCCESS" in report


def test_promtool_rejects_a_broken_rule(tmp_path) -> None:
    """The rule check can fail: a PromQL syntax error is caught."""
    rules = yaml.safe_load(ALERT_RULES.read_text())
    rules["groups"][0]["rules"][0]["expr"] = "sum by (rpc (convserve_requests_total)"
    broken = tmp_path / "alerts.yml"
    broken.write_text(yaml.safe_dump(rules))
    with pytest.raises(AssertionError, match="parse error"):
        run([require_tool("promtool"), "check", "rules", str(broken)])


# --- a live server scraped by Prometheus ---------------------------------------------------


def _local_config(metrics_port: int, web_address: str | None, directory: Path) -> Path:
    """deploy/'s config with only the targets changed: the live server and, once its
    address is known (`web_address`), this Prometheus."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    convserve = jobs["convserve"]
    assert [sd["port"] for sd in convserve.pop("dns_sd_configs")] == [8502]
    convserve["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    if web_address is not None:
        jobs["prometheus"]["static_configs"] = [{"targets": [web_address]}]
    for rule_file in config["rule_files"]:
        shutil.copy(PROMETHEUS_CONFIG.parent / rule_file, directory / rule_file)
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
async def test_prometheus_scrapes_a_live_server_with_deploys_config(
    trained_model_dir: Path, sample_digits: tuple, tmp_path: Path
) -> None:
    prometheus = require_tool("prometheus")
    from convserve.client import AsyncConvServeClient
    from convserve.server.app import start_server
    from convserve.server.settings import Settings

    images, _ = sample_digits
    server = await start_server(
        Settings.model_validate(
            {
                "model_base_path": trained_model_dir,
                "host": "127.0.0.1",
                "port": 0,
                "metrics_port": 0,
            }
        )
    )
    try:
        async with AsyncConvServeClient(f"127.0.0.1:{server.port}") as client:
            result = await client.predict(images[:8])
        assert len(result.digits) == 8

        # In a thread: the server answers scrapes from this event loop meanwhile.
        await asyncio.to_thread(_run_prometheus, prometheus, server.metrics_port, tmp_path)
    finally:
        await server.stop(0)


def _run_prometheus(prometheus: str, metrics_port: int, directory: Path) -> None:
    config = _local_config(metrics_port, None, directory)
    with prometheus_process(prometheus, config, directory) as live:
        # Its own address is known once it listens: point its self-scrape job there
        # and reload (SIGHUP), as an edited config is applied in production.
        _local_config(metrics_port, live.address, directory)
        live.process.send_signal(signal.SIGHUP)
        wait_for(
            lambda: _self_scrape_targets(live) == [live.address],
            what="prometheus to reload its config",
            retry_on=(OSError,),
        )
        _check_prometheus(live)


def _self_scrape_targets(prometheus: PrometheusProcess) -> list[str]:
    """The targets of the `prometheus` job in the config Prometheus has loaded."""
    loaded = yaml.safe_load(prometheus.api("status/config")["yaml"])
    [job] = [job for job in loaded["scrape_configs"] if job["job_name"] == "prometheus"]
    return [target for static in job["static_configs"] for target in static["targets"]]


def _check_prometheus(prometheus: PrometheusProcess) -> None:
    # The metric comes back through the HTTP API, with the job label of deploy/'s config.
    series = wait_for(
        lambda: prometheus.api(
            "query", query='convserve_requests_total{job="convserve", rpc="Predict", code="OK"}'
        )["result"],
        what="convserve_requests_total to be scraped",
        retry_on=(OSError,),
    )
    assert float(series[0]["value"][1]) >= 1
    assert series[0]["metric"]["protocol"] == "convserve"
    up = prometheus.api("query", query='up{job="convserve"}')["result"]
    assert [float(s["value"][1]) for s in up] == [1.0]

    # deploy/'s alert rules load into a real Prometheus.
    groups = prometheus.api("rules")["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == {q.where.split("'")[1] for q in rule_queries(ALERT_RULES)}

    # Every dashboard query is valid PromQL to a real engine; the serving model shows up.
    for query in dashboard_queries(DASHBOARD):
        prometheus.api("query", query=substitute_grafana_variables(query.expr))
    model = prometheus.api("query", query="convserve_model_info")["result"]
    assert [s["metric"]["version"] for s in model] == ["1"]
    # Two scrapes make a rate: the "Requests/s by RPC and code" panel has data.
    rate = next(q for q in dashboard_queries(DASHBOARD) if "Requests/s by RPC and code" in q.where)
    series = wait_for(
        lambda: prometheus.api("query", query=substitute_grafana_variables(rate.expr))["result"],
        what="a request rate (two scrapes)",
        retry_on=(OSError,),
    )
    assert {(s["metric"]["rpc"], s["metric"]["code"]) for s in series} >= {("Predict", "OK")}
