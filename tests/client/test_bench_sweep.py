"""Sweeps, the knee, compare mode, --input, outputs and replica shares against fake servers.

The fakes (`tests.client.fakes`) answer with a latency that is a known
function of the load (requests in flight, or a single-file queue), so that
which level crosses the threshold is decided by the server's rule and not by
the speed of the machine: every threshold sits far from the latencies
measured on either side of it.
"""

from __future__ import annotations

import csv
import http.server
import itertools
import json
import math
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from convserve.client import bench_metrics, bench_plot, bench_requests, bench_sweep
from convserve.client.bench_config import BenchConfig, Phase
from convserve.client.bench_results import PhaseResult
from convserve.client.cli import main
from convserve.client.errors import InputError

from .fakes import Behaviour, FakeOip, serve_fake


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--warmup-s", "0.2", "--window-s", "0.3", "--no-progress"]


def steep(in_flight: int) -> float:
    return 0.05 * 4 ** (in_flight - 1)


# --- Ranges, windows, metrics parsing: no server ------------------------------------------


def test_ranges_expand_to_their_levels() -> None:
    assert bench_sweep.parse_range("1:4", "--concurrency-range", int) == [1, 2, 3, 4]
    assert bench_sweep.parse_range("2:11:4", "--concurrency-range", int) == [2, 6, 10]
    assert bench_sweep.parse_range("0.5:1.5:0.5", "--rate-range", float) == [0.5, 1.0, 1.5]
    assert bench_sweep.parse_range("10:100:30", "--rate-range", float) == [10, 40, 70, 100]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4", "expected START:END[:STEP]"),
        ("1:2:3:4", "expected START:END[:STEP]"),
        ("a:4", "must be integers"),
        ("1.5:4", "must be integers"),
        ("0:4", "START must be > 0"),
        ("4:1", "END must be >= START"),
        ("1:4:0", "STEP must be > 0"),
        ("1:5000", "too many"),
    ],
)
def test_bad_ranges_are_refused_with_the_flag_named(text: str, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)) as caught:
        bench_sweep.parse_range(text, "--concurrency-range", int)
    assert str(caught.value).startswith("--concurrency-range:")


def window(rate: float, p99_s: float) -> PhaseResult:
    """A one-second window with `rate` requests, each taking `p99_s`."""
    n = int(rate)
    return PhaseResult(
        phase=Phase(concurrency=1),
        duration_s=1.0,
        images_per_request=1,
        latencies_s=np.full(n, p99_s),
        codes={"OK": n},
        completed=n,
        cpu_s=[0.1],
        wall_s=[1.0],
    )


def test_a_level_is_stable_when_its_last_windows_agree() -> None:
    settings = bench_sweep.Windows(window_s=1.0, stability_percent=10.0)
    agreeing = [window(100, 0.010), window(104, 0.0105), window(97, 0.0098)]
    assert bench_sweep.is_stable(agreeing, settings)
    assert not bench_sweep.is_stable(agreeing[:2], settings)  # too few windows
    # Throughput drifting by more than 10% of the mean.
    assert not bench_sweep.is_stable(
        [window(80, 0.01), window(100, 0.01), window(120, 0.01)], settings
    )
    # Same throughput, but p99 growing (a queue building up).
    assert not bench_sweep.is_stable(
        [window(100, 0.01), window(100, 0.02), window(100, 0.03)], settings
    )
    # Only the last three count.
    assert bench_sweep.is_stable([window(10, 1.0), *agreeing], settings)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window_s": 0.0}, "--window-s: expected seconds > 0"),
        ({"window_s": 1.0, "stability_percent": 0.0}, "--stability-percent"),
        ({"window_s": 1.0, "max_windows": 2}, "--max-windows: expected at least 3"),
    ],
)
def test_window_settings_are_checked(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(InputError, match=message):
        bench_sweep.Windows(**kwargs)  # type: ignore[arg-type]


def test_generator_bottleneck_warnings() -> None:
    kept_up = PhaseResult(
        Phase(rate=100), 1.0, 1, np.full(100, 0.01), {"OK": 100}, 100, [0.3], [1.0],
        scheduled=100, sent_by_end=100,
    )  # fmt: skip
    assert kept_up.sent_fraction == 1.0
    assert kept_up.generator_warnings() == []
    behind = PhaseResult(
        Phase(rate=100), 1.0, 1, np.full(90, 0.01), {"OK": 90}, 90, [0.2, 0.97], [1.0, 1.0],
        scheduled=100, sent_by_end=90,
    )  # fmt: skip
    warnings = behind.generator_warnings()
    assert len(warnings) == 2
    assert "sent only 90 of 100 scheduled requests (90%)" in warnings[0]
    assert "process(es) 1 used" in warnings[1]


def test_metrics_deltas_from_the_servers_own_exposition() -> None:
    from prometheus_client import generate_latest

    from convserve.server.metrics import Metrics

    metrics = Metrics()
    metrics.batch_size.labels("Predict", "mnist").observe(99)  # before the level: not counted
    before = bench_metrics.parse_text(generate_latest(metrics.registry).decode())
    for size in (1, 3, 4, 8):
        metrics.batch_size.labels("Predict", "mnist").observe(size)
    for wait in (0.0004, 0.0004, 0.0004, 0.02):
        metrics.queue_wait.labels("Predict", "mnist").observe(wait)
    metrics.model_execution.labels("Predict", "mnist").observe(0.003)
    metrics.batch_size.labels("Predict", "other").observe(512)  # another model
    for protocol, code in (("convserve", "OK"), ("convserve", "OK"), ("oip", "OK")):
        metrics.requests.labels(protocol=protocol, rpc="Predict", model="mnist", code=code).inc()
    metrics.requests.labels(protocol="oip", rpc="Predict", model="mnist", code="INTERNAL").inc()
    metrics.requests.labels(protocol="oip", rpc="Predict", model="other", code="OK").inc()
    after = bench_metrics.parse_text(generate_latest(metrics.registry).decode())

    figures = bench_metrics.server_figures(before, after, "mnist")
    assert figures.requests_ok == {"convserve": 2, "oip": 1}
    assert figures.model_calls == 4
    assert figures.mean_batch_size == pytest.approx(4.0)
    # Three of four waits in the (0.00025, 0.0005] bucket: the median interpolates inside it.
    assert 0.00025 < figures.queue_wait_p50_s <= 0.0005
    assert figures.queue_wait_p99_s > 0.01
    assert 0.0025 < figures.model_time_p50_s <= 0.005
    every_model = bench_metrics.server_figures(before, after)
    assert every_model.requests_ok == {"convserve": 2, "oip": 2}
    assert every_model.model_calls == 5
    assert every_model.mean_batch_size == pytest.approx((1 + 3 + 4 + 8 + 512) / 5)


def test_metrics_parser_reads_labels_escapes_and_refuses_garbage() -> None:
    samples = bench_metrics.parse_text(
        "# HELP x a metric\n"
        "# TYPE x counter\n"
        'x_total{model="a\\"b",rpc="Predict"} 3\n'
        "y 1.5e3 1700000000\n"
    )
    assert samples[("x_total", (("model", 'a"b'), ("rpc", "Predict")))] == 3.0
    assert samples[("y", ())] == 1500.0
    with pytest.raises(bench_metrics.MetricsError, match="cannot parse"):
        bench_metrics.parse_text("not a metric line at all\n")


def test_scraped_label_values_come_back_exactly_as_prometheus_client_escaped_them() -> None:
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()
    requests = Counter("convserve_requests", "Requests.", ["model", "code"], registry=registry)
    # A quote, a backslash, a newline, and a backslash before an n (which is no newline).
    tricky = 'say "hi"\\ to\nC:\\new'
    requests.labels(model=tricky, code="OK").inc(3)
    requests.labels(model="plain", code="OK").inc()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        samples = bench_metrics.scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert samples[("convserve_requests_total", (("code", "OK"), ("model", tricky)))] == 3.0
    assert samples[("convserve_requests_total", (("code", "OK"), ("model", "plain")))] == 1.0


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    h = bench_metrics.Histogram(((1.0, 10.0), (2.0, 30.0), (math.inf, 40.0)), 50.0, 40.0)
    assert h.quantile(0.5) == pytest.approx(1.5)  # rank 20: halfway through (1, 2]
    assert h.quantile(0.25) == pytest.approx(1.0)  # rank 10: the top of the first bucket
    assert h.quantile(0.99) == 2.0  # beyond the last finite bound: that bound
    assert h.mean == pytest.approx(1.25)


# --- Against fake servers -------------------------------------------------------------------


def agree(values: list[float], percent: float) -> bool:
    """Every value within `percent` of their mean (what a stable window set means)."""
    mean = sum(values) / len(values)
    return all(abs(v - mean) <= mean * percent / 100.0 for v in values)


def test_concurrency_sweep_finds_the_knee_and_writes_json_csv_and_plot(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # 50 ms x 4^(in flight - 1): 50, 200, 800 ms at concurrency 1-3; the
    # threshold is hundreds of milliseconds from each, so a loaded machine's
    # scheduling delays cannot move the knee.
    csv_path, png_path = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    with serve_fake(Behaviour(latency=steep)) as fake:
        code, out, err = run(
            capsys, "--target", fake.target, "--json", "bench",
            "--concurrency-range", "1:4", *FAST, "--max-windows", "4",
            "--latency-threshold-ms", "400", "--csv", str(csv_path), "--plot", str(png_path),
        )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert data["windows"] == {
        "window_s": 0.3, "stability_percent": 10.0, "stable_windows": 3, "max_windows": 4,
    }  # fmt: skip
    assert data["duration_s"] is None  # levels last as many windows as they need
    phases = data["phases"]
    # Concurrency 3 crossed the threshold, so 4 never ran.
    assert [p["concurrency"] for p in phases] == [1, 2, 3]
    p99 = [p["latency_ms"]["p99"] for p in phases]
    assert p99[0] < p99[1] < 400 < p99[2]
    (target,) = data["targets"]
    assert target["stopped_at_threshold"] is True
    assert target["knee"]["concurrency"] == 2
    assert target["knee"]["p99_ms"] == p99[1]
    assert data["latency_threshold_ms"] == 400
    for p in phases:
        windows = p["window_results"]
        assert len(windows) == p["windows"]
        last = windows[-3:]
        # The verdict is the agreement of the last three windows, and a level
        # ends before the cap only once they agree.
        agreeing = all(w["p99_ms"] is not None for w in last) and (
            agree([w["requests_per_s"] for w in last], 10.0)
            and agree([w["p99_ms"] for w in last], 10.0)
        )
        assert p["stable"] is agreeing
        assert p["windows"] == 4 or p["stable"]
        # The level's figures pool the last three windows.
        assert p["duration_s"] == pytest.approx(0.9)
        assert p["requests_ok"] == sum(w["requests_ok"] for w in last)
        assert p["scheduled"] is None  # closed loop
        assert p["replica_shares"] == {}  # this server names no replica
    # Each level is one load: one setup (metadata, first request) per level.
    assert fake.behaviour.calls["GetModelMetadata"] == 3
    assert fake.behaviour.calls["Predict"] >= sum(p["requests_ok"] for p in phases) + 3

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["concurrency"]) for r in rows] == [1, 2, 3]
    assert [float(r["p99_ms"]) for r in rows] == p99
    assert [float(r["requests_per_s"]) for r in rows] == [p["requests_per_s"] for p in phases]

    assert png_path.read_bytes().startswith(bench_plot.PNG_SIGNATURE)
    series = bench_plot.read_series(png_path)
    assert series["threshold_ms"] == 400
    (line,) = series["targets"]
    assert line["loads"] == ["closed c=1", "closed c=2", "closed c=3"]
    assert line["p99_ms"] == pytest.approx(p99, abs=1e-3)
    assert line["requests_per_s"] == pytest.approx([p["requests_per_s"] for p in phases], abs=1e-3)
    assert line["p50_ms"] == pytest.approx([p["latency_ms"]["p50"] for p in phases], abs=1e-3)
    assert line["p90_ms"] == pytest.approx([p["latency_ms"]["p90"] for p in phases], abs=1e-3)
    assert line["knee"]["load"] == "closed c=2"


def test_the_table_names_the_knee_and_the_windows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with serve_fake(Behaviour(latency=steep)) as fake:
        code, out, err = run(
            capsys, "--target", fake.target, "bench", "--concurrency", "1,3", *FAST,
            "--max-windows", "3", "--latency-threshold-ms", "400",
        )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert "consecutive windows of 0.3 s of one load" in lines[0]
    assert lines[1].split()[:2] == ["load", "requests"]
    assert "windows" in lines[1]
    assert lines[3].startswith("closed c=1")
    assert lines[4].startswith("closed c=3")
    assert "knee: closed c=1," in out
    assert "threshold 400 ms; stopped above it" in out


def test_rate_sweep_stops_at_the_threshold_and_reports_the_achieved_rate() -> None:
    # One request at a time, 100 ms each: 10 requests/s at most. At 5/s every
    # request takes 100 ms. At 30/s the queue grows by two requests every
    # 0.1 s for as long as the load lasts, far above the 300 ms threshold.
    behaviour = Behaviour(capacity=1, delay_s=0.1)
    with serve_fake(behaviour) as fake:
        # Windows [0.15, 0.55), [0.55, 0.95), ... s after the start: at 5/s two
        # requests are scheduled in each, none on a boundary.
        config = BenchConfig(
            target=fake.target, images=bench_requests.synthetic_digits(8)[0], warmup_s=0.15
        )
        phases = [Phase(rate=r) for r in bench_sweep.parse_range("5:35:25", "--rate-range", float)]
        result = bench_sweep.sweep(
            [config],
            phases,
            windows=bench_sweep.Windows(window_s=0.4, max_windows=3),
            threshold_ms=300.0,
        )
    assert [level.result.phase.rate for level in result.levels] == [5, 30]
    slow, overloaded = result.levels
    assert slow.p99_ms < 300.0 < overloaded.p99_ms
    assert result.stopped == [True]
    assert result.knees == [slow]
    # One schedule runs through the windows: two requests scheduled in each of
    # the three, all sent on time.
    assert len(slow.windows) == 3
    assert [w.scheduled for w in slow.windows] == [2, 2, 2]
    assert slow.result.scheduled == slow.result.sent_by_end == 6
    # Offered 30/s, achieved what the server can do: answers received per second
    # of the windows, not requests sent.
    assert overloaded.result.scheduled == 36
    assert overloaded.result.requests_per_s <= 11.0
    # The load never pauses, so the queue keeps growing from window to window:
    # the level drifts and is not stable.
    p99s = [w.percentile_s(99) for w in overloaded.windows]
    assert p99s == sorted(p99s)
    assert p99s[-1] > p99s[0] + 0.5
    assert overloaded.stable is False


def test_a_steady_level_is_stable_after_three_windows(capsys: pytest.CaptureFixture[str]) -> None:
    # Four users, 100 ms a request: about 40 requests/s and p99 of about 100 ms in
    # every window; 50% leaves room for a loaded machine's scheduling delays.
    with serve_fake(Behaviour(delay_s=0.1)) as fake:
        code, out, err = run(
            capsys, "--target", fake.target, "--json", "bench", "--concurrency", "4",
            "--warmup-s", "0.2", "--window-s", "0.5", "--stability-percent", "50",
            "--max-windows", "6", "--no-progress",
        )  # fmt: skip
    assert code == 0, err
    (phase,) = json.loads(out)["phases"]
    assert phase["stable"] is True
    assert 3 <= phase["windows"] <= 6
    last = phase["window_results"][-3:]
    assert agree([w["requests_per_s"] for w in last], 50.0)
    assert agree([w["p99_ms"] for w in last], 50.0)
    # Little's law: four users waiting out 100 ms each.
    assert 20.0 < phase["requests_per_s"] <= 40.0 * 1.05


def test_compare_alternates_targets_and_the_ratio_is_the_ratio_of_rates(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with (
        serve_fake(Behaviour(delay_s=0.020)) as a,
        serve_fake(Behaviour(delay_s=0.060), oip=True) as b,
    ):
        code, out, err = run(
            capsys, "--target", a.target, "--json", "bench", "--compare", f"oip@{b.target}",
            "--compare-model", "mnist", "--concurrency", "1,2", *FAST, "--max-windows", "3",
        )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert [(t["name"], t["protocol"], t["model"]) for t in data["targets"]] == [
        ("A", "convserve", ""),
        ("B", "oip", "mnist"),
    ]
    phases = data["phases"]
    assert [(p["target_index"], p["concurrency"]) for p in phases] == [
        (0, 1), (1, 1), (0, 2), (1, 2),
    ]  # fmt: skip
    # Server side: every call of one phase arrived before any call of the next,
    # alternating between the servers A B A B.
    calls = sorted(
        [(t, "A", m) for t, m in a.behaviour.arrivals]
        + [(t, "B", m) for t, m in b.behaviour.arrivals]
    )
    runs = [
        (server, len(list(group))) for server, group in itertools.groupby(calls, lambda c: c[1])
    ]
    assert [server for server, _ in runs] == ["A", "B", "A", "B"]
    # Each server's share of a phase is at least what the client counted in it.
    for (_, served), phase in zip(runs, phases, strict=True):
        assert served >= phase["requests_ok"] > 0
    assert {m for _, s, m in calls if s == "B"} == {"ModelInfer"}
    for a_phase, b_phase in (phases[0:2], phases[2:4]):
        assert "ratio_to_first_target" not in a_phase
        expected = b_phase["requests_per_s"] / a_phase["requests_per_s"]
        assert b_phase["ratio_to_first_target"] == pytest.approx(expected, rel=1e-3)
        # B answers in three times A's time, one request per user at a time.
        assert 0.2 < b_phase["ratio_to_first_target"] < 0.9


def test_compare_table_has_a_target_and_a_ratio_column(capsys: pytest.CaptureFixture[str]) -> None:
    with serve_fake(Behaviour(delay_s=0.005), oip=True) as fake:
        code, out, err = run(
            capsys, "--target", f"convserve@{fake.target}", "bench", "--compare", fake.target,
            "--compare-protocol", "oip", "--compare-model", "mnist", "--concurrency", "1",
            *FAST, "--max-windows", "3",
        )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"A: predict -> convserve@{fake.target}"
    assert lines[1] == f"B: predict -> oip@{fake.target} model mnist"
    header = lines[3].split()
    assert header[0] == "target"
    assert header[-2:] == ["B/A", "req/s"]
    row_a, row_b = lines[5], lines[6]
    assert row_a.split()[0] == "A"
    assert row_a.split()[-1] == "-"
    ratio = float(row_b.split()[-1])
    rates = [float(row.split()[4]) for row in (row_a, row_b)]
    assert ratio == pytest.approx(rates[1] / rates[0], rel=0.01)


def test_input_drives_an_oip_server_whose_metadata_is_empty(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with serve_fake(oip=True) as fake:
        base = [
            "--target", fake.target, "--json", "bench", "--protocol", "oip",
            "--model", FakeOip.UNDECLARED, "--concurrency", "1", "--duration-s", "0.3",
            "--warmup-s", "0.1", "--no-progress",
        ]  # fmt: skip
        code, _, err = run(capsys, *base)
        assert code == 2
        assert "declares no inputs" in err
        assert "--input NAME:DTYPE:SHAPE" in err
        code, out, err = run(capsys, *base, "--input", "pixels:FP32:-1,28,28,1")
        assert code == 0, err
        assert json.loads(out)["phases"][0]["requests_ok"] > 0
        inputs = fake.behaviour.oip_inputs
        assert set(inputs) == {("pixels", "FP32", (1, 28, 28, 1), 4 * 28 * 28)}
        inputs.clear()
        # A flat input of the right size, and an image size the pool is resized to.
        code, _, err = run(capsys, *base, "--input", "x:UINT8:-1,784")
        assert code == 0, err
        code, _, err = run(capsys, *base, "--input", "x:INT32:-1,8,8")
        assert code == 0, err
        assert set(inputs) == {("x", "UINT8", (1, 784), 784), ("x", "INT32", (1, 8, 8), 4 * 64)}
        # The same input given for a compare target drives it the same way.
        inputs.clear()
        code, _, err = run(
            capsys, *base, "--input", "x:UINT8:-1,784", "--compare", f"oip@{fake.target}",
            "--compare-input", "y:FP16:-1,28,28",
        )  # fmt: skip
        assert code == 0, err
        assert set(inputs) == {("x", "UINT8", (1, 784), 784), ("y", "FP16", (1, 28, 28), 2 * 784)}


def test_replica_shares_count_unary_calls_and_streams(capsys: pytest.CaptureFixture[str]) -> None:
    with serve_fake(Behaviour(delay_s=0.002, replicas=("r1", "r2"))) as fake:
        config = BenchConfig(
            target=fake.target, images=bench_requests.synthetic_digits(8)[0],
            duration_s=0.5, warmup_s=0.1,
        )  # fmt: skip
        (unary,) = bench_sweep.sweep([config], [Phase(concurrency=1)]).levels
        streams = BenchConfig(
            target=fake.target, images=config.images, duration_s=0.5, warmup_s=0.1, streams=2,
        )  # fmt: skip
        (streamed,) = bench_sweep.sweep([streams], [Phase(concurrency=4)]).levels
        code, out, err = run(
            capsys, "--target", fake.target, "bench", "--concurrency", "1",
            "--duration-s", "0.3", "--warmup-s", "0.1", "--no-progress",
        )  # fmt: skip
    # One user, the server naming r1 and r2 in turn: each answered half.
    counts = unary.result.replicas
    assert set(counts) == {"r1", "r2"}
    assert sum(counts.values()) == unary.result.ok
    assert abs(counts["r1"] - counts["r2"]) <= 1
    assert unary.result.replica_shares["r1"] == pytest.approx(0.5, abs=0.05)
    # Two streams, each named at its end: every message counted.
    assert set(streamed.result.replicas) <= {"r1", "r2"}
    assert sum(streamed.result.replicas.values()) == streamed.result.ok > 0
    assert code == 0, err
    header = out.splitlines()[1]
    assert header.split()[-1] == "replicas"
    assert "r1 " in out.splitlines()[3]
    assert "r2 " in out.splitlines()[3]


# The flags that make the first target an OIP one (for the --input checks).
OIP = ["--protocol", "oip", "--model", "m"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency-range", "5:1"], "--concurrency-range: END must be >= START"),
        (["--rate-range", "x:2"], "--rate-range: START, END and STEP must be numbers"),
        (["--latency-threshold-ms", "0"], "--latency-threshold-ms: expected milliseconds > 0"),
        (["--window-s", "-1"], "--window-s: expected seconds > 0"),
        (["--max-windows", "5"], "--max-windows needs --window-s"),
        (["--window-s", "1", "--duration-s", "2"], "exclude each other"),
        (["--window-s", "1", "--max-windows", "1"], "--max-windows: expected at least 3"),
        (["--compare-model", "m"], "--compare-model needs --compare TARGET"),
        (["--metrics-url", "localhost:8502"], "--metrics-url: expected http://HOST:PORT"),
        (
            ["--metrics-url", "http://a/metrics"] * 3 + ["--compare", "127.0.0.1:1"],
            "one per target (2), got 3",
        ),
        (["--plot", "out.svg"], "--plot: expected a FILE.png"),
        (["--csv", "/no/such/dir/out.csv"], "--csv /no/such/dir/out.csv: directory"),
        (
            ["--input", "x:UINT8:-1,28,28"],
            "--input applies only to an oip or oip-http target: give --target oip@HOST:PORT "
            "(or --protocol oip)",
        ),
        (["--compare", "oip@"], "--compare: expected [PROTOCOL@]HOST:PORT"),
        (
            ["--target", "127.0.0.1:2"],
            "--target given more than once (127.0.0.1:1, 127.0.0.1:2); to compare two targets "
            "give the second with --compare, e.g. --target 127.0.0.1:1 bench --compare "
            "127.0.0.1:2",
        ),
        # With an OIP target: --input and --compare-input name the flag they came from.
        (
            [*OIP, "--input", "x:BYTES:-1,28,28"],
            "--input x:BYTES:-1,28,28: datatype BYTES cannot hold",
        ),
        (
            [*OIP, "--input", "x:UINT8:-1,100"],
            "--input x:UINT8:-1,100: shape [-1, 100] does not hold",
        ),
        ([*OIP, "--input", "x:UINT8:28,28"], "--input x:UINT8:28,28: expected a leading batch"),
        ([*OIP, "--input", "x:UINT8"], "--input: expected NAME:DTYPE:SHAPE"),
        ([*OIP, "--input", "x:UINT8:-1,a"], "--input: SHAPE must be comma-separated integers"),
        (
            [*OIP, "--compare", "oip@127.0.0.1:2", "--compare-input", "x:BYTES:-1,28,28"],
            "--compare-input x:BYTES:-1,28,28: datatype BYTES cannot hold",
        ),
        (
            [*OIP, "--compare", "oip@127.0.0.1:2", "--compare-input", "x:UINT8"],
            "--compare-input: expected NAME:DTYPE:SHAPE",
        ),
        (
            [*OIP, "--compare", "convserve@127.0.0.1:2", "--compare-input", "x:UINT8:-1,784"],
            "--compare-input applies only to an oip or oip-http target: give --compare "
            "oip@HOST:PORT (or --compare-protocol oip)",
        ),
        # The HTTP protocols.
        (["--protocol", "soap"], "argument --protocol: invalid choice: 'soap'"),
        (["--protocol", "rest"], "--protocol rest needs --model NAME"),
        (["--compare", "oip-http@127.0.0.1:2"], "--protocol oip-http needs --model NAME"),
        (
            ["--protocol", "oip-http", "--model", "m", "--streams", "2"],
            "--streams needs --protocol convserve",
        ),
        (
            ["--protocol", "rest", "--model", "m", "--rpc", "convolve"],
            "--protocol rest supports only --rpc predict",
        ),
        (
            ["--protocol", "rest", "--model", "m", "--input", "x:UINT8:-1,784"],
            "--input applies only to an oip or oip-http target",
        ),
        (
            ["--compare", "http://127.0.0.1:2"],
            "--compare: 'http://127.0.0.1:2' is an HTTP URL, and convserve runs over gRPC: "
            "give rest@http://127.0.0.1:2 or oip-http@http://127.0.0.1:2",
        ),
        (
            ["--compare", "rest@dns:///x:2"],
            "--compare: expected HOST:PORT or an http:// or https:// URL, got 'dns:///x:2'",
        ),
        (["--compare", "oip-http@localhost"], "--compare: expected HOST:PORT or an http://"),
        (["--compare", "rest@127.0.0.1:99999"], "--compare: expected HOST:PORT or an http://"),
        (
            ["--tls", "--model", "m", "--compare", "rest@http://127.0.0.1:2"],
            "--compare: TLS settings given for the http:// URL 'http://127.0.0.1:2'; use https://",
        ),
    ],
)
def test_bench_flags_are_checked_before_any_load(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    # An address nothing listens on: every error here comes before connecting.
    code, _, err = run(capsys, "--target", "127.0.0.1:1", "bench", "--no-progress", *flags)
    assert code == 2, err
    assert message in err


def test_the_same_target_twice_is_one_target(capsys: pytest.CaptureFixture[str]) -> None:
    with serve_fake() as fake:
        code, out, err = run(
            capsys, "--target", fake.target, "--json", "bench", "--target", fake.target,
            "--duration-s", "0.2", "--warmup-s", "0", "--no-progress",
        )  # fmt: skip
    assert code == 0, err
    assert [t["target"] for t in json.loads(out)["targets"]] == [fake.target]


def test_plot_without_matplotlib_fails_before_the_run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a missing package looks like
    with serve_fake() as fake:
        code, _, err = run(
            capsys, "--target", fake.target, "bench", "--duration-s", "0.2", "--warmup-s", "0",
            "--no-progress", "--plot", str(tmp_path / "out.png"),
        )  # fmt: skip
        assert code == 1
        assert "pip install 'convserve[plot]'" in err
        assert fake.behaviour.calls == {}  # the server never saw a call


@contextmanager
def metrics_endpoint(behaviour: Behaviour, fail_from_level: int) -> Iterator[str]:
    """A /metrics URL counting `behaviour`'s Predict calls as the server's successful
    requests; it answers 500 once level `fail_from_level` (1-based) has begun its setup."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if behaviour.calls["GetModelMetadata"] >= fail_from_level:
                self.send_error(500, "scrape failing on purpose")
                return
            n = behaviour.calls["Predict"]
            labels = 'rpc="Predict",model="fake"'
            body = (
                f'convserve_requests_total{{protocol="convserve",{labels},code="OK"}} {n}\n'
                f'convserve_batch_size_bucket{{{labels},le="1.0"}} {n}\n'
                f'convserve_batch_size_bucket{{{labels},le="+Inf"}} {n}\n'
                f"convserve_batch_size_sum{{{labels}}} {n}\n"
                f"convserve_batch_size_count{{{labels}}} {n}\n"
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_server_figures_cover_the_client_windows_and_a_failed_scrape_costs_one_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    behaviour = Behaviour(delay_s=0.02)
    with serve_fake(behaviour) as fake, metrics_endpoint(behaviour, fail_from_level=2) as url:
        code, out, err = run(
            capsys, "--target", fake.target, "--json", "bench", "--concurrency", "2,1",
            "--duration-s", "0.6", "--warmup-s", "0.3", "--metrics-url", url, "--no-progress",
        )  # fmt: skip
    assert code == 0, err
    first, second = json.loads(out)["phases"]
    # Scraped at the window's start and end: the server's count of the window is
    # the client's, give or take a request on each edge (the warm-up excluded).
    served = first["server"]["requests_ok"]["convserve"]
    assert served == pytest.approx(first["completed_ok"], abs=3 + 0.1 * served)
    assert first["server"]["model_calls"] == served
    assert first["server"]["mean_batch_size"] == 1.0
    assert "server_error" not in first
    # The second level's scrapes failed: its server figures are missing, its
    # client figures are not, and the run still succeeds.
    assert second["server"] is None
    assert "cannot read it" in second["server_error"]
    assert second["requests_ok"] > 0


def test_server_figures_missing_are_a_warning_in_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    behaviour = Behaviour()
    with serve_fake(behaviour) as fake, metrics_endpoint(behaviour, fail_from_level=1) as url:
        code, out, err = run(
            capsys, "--target", fake.target, "bench", "--concurrency", "1",
            "--duration-s", "0.2", "--warmup-s", "0", "--metrics-url", url, "--no-progress",
        )  # fmt: skip
    assert code == 0, err
    assert f"warning: closed c=1: no server figures: --metrics-url {url}: cannot read it" in out


def test_metrics_url_that_cannot_be_read_fails_the_run_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with serve_fake() as fake:
        code, _, err = run(
            capsys, "--target", fake.target, "bench", "--concurrency", "1",
            "--duration-s", "0.2", "--warmup-s", "0", "--no-progress",
            "--metrics-url", "http://127.0.0.1:1/metrics",
        )  # fmt: skip
        assert fake.behaviour.calls == {}
    assert code == 1
    assert "--metrics-url http://127.0.0.1:1/metrics: cannot read it" in err


def test_the_bench_imports_no_plotting_metrics_or_http_library() -> None:
    code = (
        "import sys\n"
        "import convserve.client.cli, convserve.client.bench_plot, convserve.client.bench_metrics\n"
        "print(sorted(m for m in ('matplotlib', 'prometheus_client', 'tensorflow', 'aiohttp', "
        "'orjson') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a missing package looks like
    sweep = bench_sweep.SweepResult([], [], None, [], [])
    with pytest.raises(ImportError, match=re.escape("pip install 'convserve[plot]'")):
        bench_plot.plot(sweep, "unused.png")
