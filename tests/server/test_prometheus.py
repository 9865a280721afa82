"""/metrics of a real server: scraped, parsed, checked by promtool and by a Prometheus server."""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from convserve.v1.tensor_codec import to_tensor
from tests.conftest import require_tool
from tests.interop.loop_thread import serving
from tests.polling import wait_for
from tests.server.wire_helpers import prometheus_process, sample_value, scrape, settings_for

pytestmark = pytest.mark.slow

# Every family COMMON.md promises, as exposed in the text format.
EXPECTED_FAMILIES = [
    "convserve_requests_total",
    "convserve_request_duration_seconds_bucket",
    "convserve_queue_wait_seconds_bucket",
    "convserve_model_execution_seconds_bucket",
    "convserve_batch_size_bucket",
    "convserve_images_processed_total",
    "convserve_queued_images",
    "convserve_inflight_requests",
    "convserve_model_loads_total",
    "convserve_model_worker_exits_total",
    "convserve_model_info",
    "convserve_model_versions_loaded",
]


@pytest.fixture(scope="module")
def server(model_base_path: Path) -> Iterator[Any]:
    with serving(settings_for(model_base_path)) as running_server:
        yield running_server


def _predict(target: str, count: int, images_each: int) -> None:
    images = np.zeros((images_each, 28, 28), np.uint8)
    with grpc.insecure_channel(target) as channel:
        stub = convserve_pb2_grpc.ConvServeStub(channel)
        for _ in range(count):
            stub.Predict(convserve_pb2.PredictRequest(images=to_tensor(images)), timeout=60)
        with pytest.raises(grpc.RpcError):
            stub.Predict(convserve_pb2.PredictRequest(), timeout=60)


def test_metrics_are_exposed_and_move(server: Any) -> None:
    before = scrape(server.metrics_port)
    _predict(server.target, 3, 4)
    after = scrape(server.metrics_port)
    names = {name for name, _ in after}
    for family in EXPECTED_FAMILIES:
        assert family in names, family

    def delta(name: str, **labels: str) -> float:
        return sample_value(after, name, **labels) - sample_value(before, name, **labels)

    ok = {"protocol": "convserve", "rpc": "Predict", "code": "OK"}
    assert delta("convserve_requests_total", **ok) == 3
    bad = {"protocol": "convserve", "rpc": "Predict", "code": "INVALID_ARGUMENT"}
    assert delta("convserve_requests_total", **bad) == 1
    assert delta("convserve_images_processed_total", rpc="Predict") == 12
    assert (
        delta("convserve_request_duration_seconds_count", protocol="convserve", rpc="Predict") == 4
    )
    assert delta("convserve_batch_size_sum", rpc="Predict") == 12
    assert delta("convserve_model_execution_seconds_count", rpc="Predict") >= 1
    assert sample_value(after, "convserve_inflight_requests", protocol="convserve") == 0
    assert sample_value(after, "convserve_model_loads_total", model="mnist", result="success") >= 1
    assert sample_value(after, "convserve_model_info", model="mnist", version="1") == 1
    assert sample_value(after, "convserve_model_versions_loaded", model="mnist") == 1


def test_promtool_accepts_the_exposition(server: Any) -> None:
    promtool = require_tool("promtool")
    _predict(server.target, 1, 1)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as reply:
        text = reply.read()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_a_prometheus_server_scrapes_the_metrics(server: Any, tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    _predict(server.target, 2, 1)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: convserve\n"
        "    scrape_interval: 1s\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_port}']\n"
    )
    with prometheus_process(prometheus, config, tmp_path) as scraper:

        def query(expression: str) -> list[dict[str, Any]]:
            return list(scraper.api("query", query=expression)["result"])

        requests_ok = 'convserve_requests_total{protocol="convserve",rpc="Predict",code="OK"}'
        result = wait_for(
            lambda: query(requests_ok),
            what="a scraped sample",
            timeout_s=120,
            retry_on=(OSError,),
        )
        assert result[0]["metric"]["job"] == "convserve"
        first = float(result[0]["value"][1])
        assert first >= 2
        _predict(server.target, 3, 1)
        wait_for(
            lambda: any(float(s["value"][1]) >= first + 3 for s in query(requests_ok)),
            what="the scraped counter to move",
            retry_on=(OSError,),
        )
        up = wait_for(lambda: query('up{job="convserve"}'), what="up", retry_on=(OSError,))
        assert up[0]["value"][1] == "1"
