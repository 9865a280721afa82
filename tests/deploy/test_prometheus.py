"""Prometheus: promtool on deploy/'s config and rules; a real Prometheus scraping a real server."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_tool
from tests.deploy.common import ALERT_RULES, DASHBOARD, PROMETHEUS_CONFIG, run
from tests.deploy.promql import dashboard_queries, rule_queries, substitute_grafana_variables

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local_config(metrics_port: int, web_port: int, directory: Path) -> Path:
    """deploy/'s config with only the targets changed: the live server and this Prometheus."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    convserve = jobs["convserve"]
    assert [sd["port"] for sd in convserve.pop("dns_sd_configs")] == [8502]
    convserve["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{web_port}"]}]
    for rule_file in config["rule_files"]:
        shutil.copy(PROMETHEUS_CONFIG.parent / rule_file, directory / rule_file)
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _api(web_port: int, endpoint: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    url = f"http://127.0.0.1:{web_port}/api/v1/{endpoint}" + (f"?{query}" if query else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def _poll(check: Any, what: str, deadline_s: float, process: subprocess.Popen[bytes]) -> Any:
    """Call `check` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        assert process.poll() is None, f"prometheus exited with {process.returncode}"
        try:
            result = check()
        except OSError as error:  # not listening yet
            last_error = error
            result = None
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error})")


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
    web_port = _free_port()
    config = _local_config(metrics_port, web_port, directory)
    log_path = directory / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _check_prometheus(web_port, process)
        except AssertionError as failure:
            raise AssertionError(
                f"{failure}\nprometheus log:\n{log_path.read_text()[-3000:]}"
            ) from failure
        finally:
            process.terminate()
            process.wait(30)


def _check_prometheus(web_port: int, process: subprocess.Popen[bytes]) -> None:
    # The metric comes back through the HTTP API, with the job label of deploy/'s config.
    series = _poll(
        lambda: _api(
            web_port,
            "query",
            query='convserve_requests_total{job="convserve", rpc="Predict", code="OK"}',
        )["result"],
        "convserve_requests_total to be scraped",
        60,
        process,
    )
    assert float(series[0]["value"][1]) >= 1
    assert series[0]["metric"]["protocol"] == "convserve"
    up = _api(web_port, "query", query='up{job="convserve"}')["result"]
    assert [float(s["value"][1]) for s in up] == [1.0]

    # deploy/'s alert rules load into a real Prometheus.
    groups = _api(web_port, "rules")["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == {q.where.split("'")[1] for q in rule_queries(ALERT_RULES)}

    # Every dashboard query is valid PromQL to a real engine; the serving model shows up.
    for query in dashboard_queries(DASHBOARD):
        _api(web_port, "query", query=substitute_grafana_variables(query.expr))
    model = _api(web_port, "query", query="convserve_model_info")["result"]
    assert [s["metric"]["version"] for s in model] == ["1"]
    # Two scrapes make a rate: the "Requests/s by RPC and code" panel has data.
    rate = next(q for q in dashboard_queries(DASHBOARD) if "Requests/s by RPC and code" in q.where)
    series = _poll(
        lambda: _api(web_port, "query", query=substitute_grafana_variables(rate.expr))["result"],
        "a request rate (two scrapes)",
        60,
        process,
    )
    assert {(s["metric"]["rpc"], s["metric"]["code"]) for s in series} >= {("Predict", "OK")}
