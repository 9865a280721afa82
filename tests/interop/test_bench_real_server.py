"""``convserve bench`` against the real server: convserve.v1 against its own OIP adapter."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from convserve.client import bench_metrics
from convserve.client.cli import main
from tests.client.test_e2e import ServerThread, start_server_thread

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(model_base_path: Path) -> Iterator[ServerThread]:
    running = start_server_thread(model_base_path=str(model_base_path))
    yield running
    running.stop()


def requests_by_protocol(url: str) -> dict[str, float]:
    """Successful requests per protocol label, from the server's own counter."""
    with urllib.request.urlopen(url, timeout=10) as response:
        samples = bench_metrics.parse_text(response.read().decode())
    counts: dict[str, float] = {}
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name == "convserve_requests_total" and label.get("code") == "OK":
            counts[label["protocol"]] = counts.get(label["protocol"], 0.0) + value
    return counts


def test_compare_sweep_with_server_figures(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    before = requests_by_protocol(url)
    code = main(
        [
            "--target", server.target, "--json", "bench",
            "--compare", f"oip@{server.target}", "--model", "mnist",
            "--concurrency-range", "1:5:4", "--window-s", "0.3", "--max-windows", "3",
            "--warmup-s", "0.2", "--metrics-url", url, "--no-progress",
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    after = requests_by_protocol(url)
    data = json.loads(out)
    phases = data["phases"]
    assert [(p["target_index"], p["concurrency"]) for p in phases] == [
        (0, 1), (1, 1), (0, 5), (1, 5),
    ]  # fmt: skip
    # The server counted at least the requests the client measured, per protocol
    # (it also saw the warm-ups, the setup calls and the windows not kept).
    for index, protocol in ((0, "convserve"), (1, "oip")):
        measured = sum(p["requests_ok"] for p in phases if p["target_index"] == index)
        assert after.get(protocol, 0.0) - before.get(protocol, 0.0) >= measured > 0
    for p in phases:
        server_side = p["server"]
        assert server_side["model_calls"] > 0
        assert server_side["mean_batch_size"] >= 1.0
        assert server_side["model_time_ms"]["p50"] > 0
        assert server_side["queue_wait_ms"]["p99"] >= server_side["queue_wait_ms"]["p50"] >= 0
        # The real server names no replica yet unless it sends the metadata.
        assert sum(p["replica_requests"].values()) in (0, p["requests_ok"])
    for a, b in (phases[0:2], phases[2:4]):
        expected = b["requests_per_s"] / a["requests_per_s"]
        assert b["ratio_to_first_target"] == pytest.approx(expected, rel=1e-3)
