"""Sweeps, the knee, compare mode, --input, outputs and replica shares against stand-in servers.

The stand-ins are grpc.aio servers whose latency is a known function of the
load (requests in flight, or a single-file queue), so that which level
crosses the threshold is decided by the server's rule and not by the speed
of the machine: every threshold sits far from the latencies measured on
either side of it.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from convserve.client import bench_metrics, bench_plot, bench_requests, bench_sweep
from convserve.client.bench import BenchConfig, Phase, PhaseResult
from convserve.client.cli import main
from convserve.client.errors import InputError
from convserve.v1 import convserve_pb2 as pb

SERVICE = "convserve.v1.ConvServe"
OIP_SERVICE = "inference.GRPCInferenceService"


@dataclass
class Call:
    method: str
    time: float  # time.monotonic() when it arrived


@dataclass
class StandIn:
    """A grpc.aio convserve.v1 + OIP server with a chosen latency rule.

    `latency(in_flight)` is the time a request takes given the requests in
    flight (itself included) when it arrives. With `capacity`, at most that
    many requests are served at once (the others queue), each taking
    `service_s`. `replicas`: names sent in turn as ``convserve-replica``
    trailing metadata (one per unary call or stream; none when empty).
    `declare_inputs=False` makes ModelMetadata declare no inputs, as MLServer does.
    """

    latency: Callable[[int], float] = lambda in_flight: 0.0
    capacity: int | None = None
    service_s: float = 0.0
    replicas: Sequence[str] = ()
    declare_inputs: bool = True
    calls: list[Call] = field(default_factory=list)
    oip_inputs: list[tuple[str, str, tuple[int, ...], int]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._in_flight = 0
        self._names = itertools.cycle(self.replicas) if self.replicas else None
        self._slots = asyncio.Semaphore(self.capacity or 1)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count(self, *methods: str) -> int:
        return sum(c.method in methods for c in self.calls)

    async def _work(self) -> None:
        self._in_flight += 1
        try:
            if self.capacity is not None:
                async with self._slots:
                    await asyncio.sleep(self.service_s)
            else:
                await asyncio.sleep(self.latency(self._in_flight))
        finally:
            self._in_flight -= 1

    def _name(self, context: Any) -> None:
        if self._names is not None:
            context.set_trailing_metadata((("convserve-replica", next(self._names)),))

    async def metadata(self, request: pb.GetModelMetadataRequest, context: Any) -> Any:
        self.calls.append(Call("GetModelMetadata", time.monotonic()))
        spec = pb.TensorSpec(name="images", shape=[-1, 28, 28, 1])
        return pb.GetModelMetadataResponse(model_name="standin", inputs=[spec])

    async def predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        self.calls.append(Call("Predict", time.monotonic()))
        await self._work()
        self._name(context)
        return pb.PredictResponse()

    async def predict_stream(
        self, requests: AsyncIterator[pb.PredictStreamRequest], context: Any
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        async for request in requests:
            self.calls.append(Call("PredictStream", time.monotonic()))
            await self._work()
            yield pb.PredictStreamResponse(id=request.id, response=pb.PredictResponse())
        self._name(context)

    async def oip_metadata(self, request: Any, context: Any) -> Any:
        from tritonclient.grpc import service_pb2

        self.calls.append(Call("ModelMetadata", time.monotonic()))
        response = service_pb2.ModelMetadataResponse(name=request.name, platform="standin")
        if self.declare_inputs:
            response.inputs.add(name="images", datatype="UINT8", shape=[-1, 28, 28, 1])
        return response

    async def oip_infer(self, request: Any, context: Any) -> Any:
        from tritonclient.grpc import service_pb2

        self.calls.append(Call("ModelInfer", time.monotonic()))
        tensor = request.inputs[0]
        self.oip_inputs.append(
            (
                tensor.name,
                tensor.datatype,
                tuple(tensor.shape),
                len(request.raw_input_contents[0]),
            )
        )
        await self._work()
        self._name(context)
        return service_pb2.ModelInferResponse(model_name=request.model_name)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        from tritonclient.grpc import service_pb2

        convserve = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
                    self.metadata,
                    request_deserializer=pb.GetModelMetadataRequest.FromString,
                    response_serializer=pb.GetModelMetadataResponse.SerializeToString,
                ),
                "Predict": grpc.unary_unary_rpc_method_handler(
                    self.predict,
                    request_deserializer=pb.PredictRequest.FromString,
                    response_serializer=pb.PredictResponse.SerializeToString,
                ),
                "PredictStream": grpc.stream_stream_rpc_method_handler(
                    self.predict_stream,
                    request_deserializer=pb.PredictStreamRequest.FromString,
                    response_serializer=pb.PredictStreamResponse.SerializeToString,
                ),
            },
        )
        oip = grpc.method_handlers_generic_handler(
            OIP_SERVICE,
            {
                "ModelMetadata": grpc.unary_unary_rpc_method_handler(
                    self.oip_metadata,
                    request_deserializer=service_pb2.ModelMetadataRequest.FromString,
                    response_serializer=service_pb2.ModelMetadataResponse.SerializeToString,
                ),
                "ModelInfer": grpc.unary_unary_rpc_method_handler(
                    self.oip_infer,
                    request_deserializer=service_pb2.ModelInferRequest.FromString,
                    response_serializer=service_pb2.ModelInferResponse.SerializeToString,
                ),
            },
        )
        return [convserve, oip]


@contextmanager
def serve(stand_in: StandIn) -> Iterator[StandIn]:
    """Run `stand_in` on a free port in a background thread's event loop."""
    started = threading.Event()
    box: dict[str, Any] = {}

    async def run() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(stand_in.handlers())
        stand_in.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        box["loop"] = asyncio.get_running_loop()
        box["stop"] = asyncio.Event()
        started.set()
        await box["stop"].wait()
        await server.stop(None)

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(30), "the stand-in server did not start"
    try:
        yield stand_in
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(timeout=30)


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
        Phase(rate=100), 1.0, 1, np.full(100, 0.01), {"OK": 100}, [0.3], [1.0],
        scheduled=100, sent_by_end=100,
    )  # fmt: skip
    assert kept_up.sent_fraction == 1.0
    assert kept_up.generator_warnings() == []
    behind = PhaseResult(
        Phase(rate=100), 1.0, 1, np.full(90, 0.01), {"OK": 90}, [0.2, 0.97], [1.0, 1.0],
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
    after = bench_metrics.parse_text(generate_latest(metrics.registry).decode())

    figures = bench_metrics.server_figures(before, after, "mnist")
    assert figures.model_calls == 4
    assert figures.mean_batch_size == pytest.approx(4.0)
    # Three of four waits in the (0.00025, 0.0005] bucket: the median interpolates inside it.
    assert 0.00025 < figures.queue_wait_p50_s <= 0.0005
    assert figures.queue_wait_p99_s > 0.01
    assert 0.0025 < figures.model_time_p50_s <= 0.005
    every_model = bench_metrics.server_figures(before, after)
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


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    h = bench_metrics.Histogram(((1.0, 10.0), (2.0, 30.0), (math.inf, 40.0)), 50.0, 40.0)
    assert h.quantile(0.5) == pytest.approx(1.5)  # rank 20: halfway through (1, 2]
    assert h.quantile(0.25) == pytest.approx(1.0)  # rank 10: the top of the first bucket
    assert h.quantile(0.99) == 2.0  # beyond the last finite bound: that bound
    assert h.mean == pytest.approx(1.25)


# --- Against stand-in servers ----------------------------------------------------------------


def test_concurrency_sweep_finds_the_knee_and_writes_json_csv_and_plot(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # 50 ms x 4^(in flight - 1): 50, 200, 800 ms at concurrency 1-3; the
    # threshold is hundreds of milliseconds from each, so a loaded machine's
    # scheduling delays cannot move the knee.
    stand_in = StandIn(latency=steep)
    csv_path, png_path = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    with serve(stand_in):
        code, out, err = run(
            capsys, "--target", stand_in.target, "--json", "bench",
            "--concurrency-range", "1:4", *FAST, "--max-windows", "3",
            "--latency-threshold-ms", "400", "--csv", str(csv_path), "--plot", str(png_path),
        )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
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
        assert p["windows"] == 3  # stable or not, three windows must agree
        assert p["stable"] in (True, False)
        assert p["scheduled"] is None  # closed loop
        assert p["replica_shares"] == {}  # this server names no replica
    # The generator's own view of the same requests as the server's count: the
    # server also saw the warm-up and the windows not kept, never fewer.
    assert stand_in.count("Predict") >= sum(p["requests_ok"] for p in phases)

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
    stand_in = StandIn(latency=steep)
    with serve(stand_in):
        code, out, err = run(
            capsys, "--target", stand_in.target, "bench", "--concurrency", "1,3", *FAST,
            "--max-windows", "3", "--latency-threshold-ms", "400",
        )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["load", "requests"]
    assert "windows" in lines[1]
    assert lines[3].startswith("closed c=1")
    assert lines[4].startswith("closed c=3")
    assert "knee: closed c=1," in out
    assert "threshold 400 ms; stopped above it" in out


def test_rate_sweep_stops_at_the_threshold() -> None:
    # One request at a time, 100 ms each: 10 requests/s at most. At 2/s every
    # request takes 100 ms; at 30/s a window's nine requests queue up and the
    # last waits about 600 ms, far above the 300 ms threshold.
    stand_in = StandIn(capacity=1, service_s=0.1)
    with serve(stand_in):
        config = BenchConfig(
            target=stand_in.target,
            images=bench_requests.synthetic_digits(8)[0],
            warmup_s=0.2,
        )
        phases = [Phase(rate=r) for r in bench_sweep.parse_range("2:58:28", "--rate-range", float)]
        result = bench_sweep.sweep(
            [config],
            phases,
            windows=bench_sweep.Windows(window_s=0.3, max_windows=3),
            threshold_ms=300.0,
        )
    assert [level.result.phase.rate for level in result.levels] == [2, 30]
    slow, overloaded = result.levels
    assert slow.p99_ms < 300.0 < overloaded.p99_ms
    assert result.stopped == [True]
    assert result.knees == [slow]
    # Open loop: at 2/s each 0.3 s window schedules one request, at its start,
    # and the generator sent it on time; three windows are kept.
    assert slow.windows == 3
    assert slow.result.scheduled == slow.result.sent_by_end == 3
    assert overloaded.result.scheduled is not None
    assert overloaded.result.scheduled > 0


def test_compare_alternates_targets_and_the_ratio_is_the_ratio_of_rates(
    capsys: pytest.CaptureFixture[str],
) -> None:
    a = StandIn(latency=lambda n: 0.020)
    b = StandIn(latency=lambda n: 0.060)
    with serve(a), serve(b):
        code, out, err = run(
            capsys, "--target", a.target, "--json", "bench", "--compare", f"oip@{b.target}",
            "--model", "mnist", "--concurrency", "1,2", *FAST, "--max-windows", "3",
        )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert [(t["name"], t["protocol"]) for t in data["targets"]] == [
        ("A", "convserve"),
        ("B", "oip"),
    ]
    phases = data["phases"]
    assert [(p["target_index"], p["concurrency"]) for p in phases] == [
        (0, 1), (1, 1), (0, 2), (1, 2),
    ]  # fmt: skip
    # Server side: every call of one phase arrived before any call of the next,
    # alternating between the servers A B A B.
    calls = sorted(
        [(c.time, "A", c.method) for c in a.calls] + [(c.time, "B", c.method) for c in b.calls]
    )
    runs = [
        (server, len(list(group))) for server, group in itertools.groupby(calls, lambda c: c[1])
    ]
    assert [server for server, _ in runs] == ["A", "B", "A", "B"]
    # Each server's share of a phase is at least what the client counted in it.
    for (_, served), phase in zip(runs, phases, strict=True):
        assert served >= phase["requests_ok"] > 0
    assert {m for _, s, m in calls if s == "B"} == {"ModelMetadata", "ModelInfer"}
    for a_phase, b_phase in (phases[0:2], phases[2:4]):
        assert "ratio_to_first_target" not in a_phase
        expected = b_phase["requests_per_s"] / a_phase["requests_per_s"]
        assert b_phase["ratio_to_first_target"] == pytest.approx(expected, rel=1e-3)
        # B answers in three times A's time, one request per user at a time.
        assert 0.2 < b_phase["ratio_to_first_target"] < 0.9


def test_compare_table_has_a_target_and_a_ratio_column(capsys: pytest.CaptureFixture[str]) -> None:
    a = StandIn(latency=lambda n: 0.005)
    with serve(a):
        code, out, err = run(
            capsys, "--target", f"convserve@{a.target}", "bench", "--compare", a.target,
            "--compare-protocol", "oip", "--compare-model", "m", "--concurrency", "1",
            *FAST, "--max-windows", "3",
        )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"A: predict -> convserve@{a.target}"
    assert lines[1] == f"B: predict -> oip@{a.target} model m"
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
    stand_in = StandIn(declare_inputs=False)
    base = [
        "--target", "", "--json", "bench", "--protocol", "oip", "--model", "m",
        "--concurrency", "1", "--duration-s", "0.3", "--warmup-s", "0.1", "--no-progress",
    ]  # fmt: skip
    with serve(stand_in):
        base[1] = stand_in.target
        code, _, err = run(capsys, *base)
        assert code == 2
        assert "declares no inputs" in err
        assert "--input NAME:DTYPE:SHAPE" in err
        code, out, err = run(capsys, *base, "--input", "pixels:FP32:-1,28,28,1")
        assert code == 0, err
        assert json.loads(out)["phases"][0]["requests_ok"] > 0
        assert set(stand_in.oip_inputs) == {("pixels", "FP32", (1, 28, 28, 1), 4 * 28 * 28)}
        stand_in.oip_inputs.clear()
        # A flat input of the right size, and an image size the pool is resized to.
        code, _, err = run(capsys, *base, "--input", "x:UINT8:-1,784")
        assert code == 0, err
        code, _, err = run(capsys, *base, "--input", "x:INT32:-1,8,8")
        assert code == 0, err
        assert set(stand_in.oip_inputs) == {
            ("x", "UINT8", (1, 784), 784),
            ("x", "INT32", (1, 8, 8), 4 * 64),
        }
        for spec, message in [
            ("x:BYTES:-1,28,28", "datatype BYTES cannot hold image pixels"),
            ("x:UINT8:-1,100", "does not hold images of 28x28x1 pixels"),
            ("x:UINT8:28,28", "expected a leading batch dimension of -1"),
            ("x:UINT8", "--input: expected NAME:DTYPE:SHAPE"),
            ("x:UINT8:-1,a", "--input: SHAPE must be comma-separated integers"),
        ]:
            code, _, err = run(capsys, *base, "--input", spec)
            assert code == 2, spec
            assert message in err, (spec, err)


def test_replica_shares_count_unary_calls_and_streams(capsys: pytest.CaptureFixture[str]) -> None:
    stand_in = StandIn(latency=lambda n: 0.002, replicas=("r1", "r2"))
    with serve(stand_in):
        config = BenchConfig(
            target=stand_in.target, images=bench_requests.synthetic_digits(8)[0],
            duration_s=0.5, warmup_s=0.1,
        )  # fmt: skip
        (unary,) = bench_sweep.sweep([config], [Phase(concurrency=1)]).levels
        streams = BenchConfig(
            target=stand_in.target, images=config.images, duration_s=0.5, warmup_s=0.1,
            streams=2,
        )  # fmt: skip
        (streamed,) = bench_sweep.sweep([streams], [Phase(concurrency=4)]).levels
        code, out, err = run(
            capsys, "--target", stand_in.target, "bench", "--concurrency", "1",
            "--duration-s", "0.3", "--warmup-s", "0.1", "--no-progress",
        )  # fmt: skip
    # One user, the server naming r1 and r2 in turn: each answered half.
    counts = unary.result.replicas
    assert set(counts) == {"r1", "r2"}
    assert sum(counts.values()) == unary.result.ok
    assert abs(counts["r1"] - counts["r2"]) <= 1
    assert unary.result.replica_shares["r1"] == pytest.approx(0.5, abs=0.05)
    # Two streams, one named r1 and the other r2 at their end: every message counted.
    assert set(streamed.result.replicas) <= {"r1", "r2"}
    assert sum(streamed.result.replicas.values()) == streamed.result.ok > 0
    assert code == 0, err
    header = out.splitlines()[1]
    assert header.split()[-1] == "replicas"
    assert "r1 " in out.splitlines()[3]
    assert "r2 " in out.splitlines()[3]


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
        (["--input", "x:UINT8:-1,28,28"], "--input applies only to --protocol oip"),
        (["--compare", "oip@"], "--compare: expected [PROTOCOL@]HOST:PORT"),
    ],
)
def test_bench_flags_are_checked_before_any_load(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    # An address nothing listens on: every error here comes before connecting.
    code, _, err = run(capsys, "--target", "127.0.0.1:1", "bench", "--no-progress", *flags)
    assert code == 2, err
    assert message in err


def test_metrics_url_that_cannot_be_read_fails_the_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stand_in = StandIn()
    with serve(stand_in):
        code, _, err = run(
            capsys, "--target", stand_in.target, "bench", "--concurrency", "1",
            "--duration-s", "0.2", "--warmup-s", "0", "--no-progress",
            "--metrics-url", "http://127.0.0.1:1/metrics",
        )  # fmt: skip
    assert code == 1
    assert "--metrics-url http://127.0.0.1:1/metrics: cannot read it" in err


def test_the_bench_imports_no_plotting_or_metrics_library() -> None:
    code = (
        "import sys\n"
        "import convserve.client.cli, convserve.client.bench_plot, convserve.client.bench_metrics\n"
        "print(sorted(m for m in ('matplotlib', 'prometheus_client', 'tensorflow') "
        "if m in sys.modules))\n"
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
