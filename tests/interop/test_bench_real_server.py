"""``convserve bench`` against the real server: convserve.v1 against its own OIP adapter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from convserve.client.cli import main
from tests.client.test_e2e import ServerThread, start_server_thread
from tests.server.wire_helpers import sample_value, scrape

pytestmark = pytest.mark.slow

REPLICA = "bench-replica-1"


@pytest.fixture(scope="module")
def server(model_base_path: Path) -> Iterator[ServerThread]:
    running = start_server_thread(model_base_path=str(model_base_path), replica_name=REPLICA)
    yield running
    running.stop()


def requests_ok(server: ServerThread, protocol: str) -> float:
    """The server's own count of successful requests of `protocol`."""
    samples = scrape(server.metrics_port)
    return sample_value(samples, "convserve_requests_total", protocol=protocol, code="OK")


def test_compare_sweep_with_server_figures(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    before = {protocol: requests_ok(server, protocol) for protocol in ("convserve", "oip")}
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
    data = json.loads(out)
    phases = data["phases"]
    assert [(p["target_index"], p["concurrency"]) for p in phases] == [
        (0, 1), (1, 1), (0, 5), (1, 5),
    ]  # fmt: skip
    # The server counted at least the requests the client measured, per protocol
    # (it also saw the warm-ups, the setup calls and the windows not kept).
    for index, protocol in ((0, "convserve"), (1, "oip")):
        measured = sum(p["requests_ok"] for p in phases if p["target_index"] == index)
        assert requests_ok(server, protocol) - before[protocol] >= measured > 0
    for p in phases:
        server_side = p["server"]
        # The server's own counts over the level's kept windows: only the protocol
        # of that level's target was served (the targets alternate), and about as
        # many requests as the client received answers in the same windows.
        mine, other = ("convserve", "oip") if p["target_index"] == 0 else ("oip", "convserve")
        served = server_side["requests_ok"]
        assert served.get(other, 0) == 0
        assert served[mine] == pytest.approx(p["completed_ok"], abs=5 + 0.1 * served[mine])
        assert server_side["model_calls"] > 0
        assert server_side["mean_batch_size"] >= 1.0
        assert server_side["model_time_ms"]["p50"] > 0
        assert server_side["queue_wait_ms"]["p99"] >= server_side["queue_wait_ms"]["p50"] >= 0
        # The server names its replica on every answer of both protocols.
        assert p["replica_requests"] == {REPLICA: p["requests_ok"]}
        assert p["replica_shares"] == {REPLICA: 1.0}
    for a, b in (phases[0:2], phases[2:4]):
        expected = b["requests_per_s"] / a["requests_per_s"]
        assert b["ratio_to_first_target"] == pytest.approx(expected, rel=1e-3)
