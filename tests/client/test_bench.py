"""The load generator against fake servers with known behaviour."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from convserve.client import bench, bench_requests, bench_results
from convserve.client.bench_config import BenchConfig, Phase
from convserve.client.bench_results import WorkerResult
from convserve.client.errors import (
    InputError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from convserve.client.images import resize_batch
from convserve.v1 import convserve_pb2 as pb

from .fakes import Behaviour, nothing_listens, serve_fake

IMAGES, LABELS = bench_requests.synthetic_digits(32)


def config(target: str, **kwargs: object) -> BenchConfig:
    defaults: dict[str, object] = {"duration_s": 2.0, "warmup_s": 0.3}
    defaults.update(kwargs)
    return BenchConfig(target=target, images=IMAGES, **defaults)  # type: ignore[arg-type]


def test_closed_loop_latency_and_rate_follow_a_fixed_server_delay() -> None:
    delay_s = 0.050
    with serve_fake(Behaviour(delay_s=delay_s)) as fake:
        (result,) = bench.run(config(fake.target), [Phase(concurrency=2)])
    assert result.errors == {}
    # The server sleeps at least delay_s, so no honest sample can be shorter.
    assert float(result.latencies_s.min()) >= delay_s
    # Scheduling noise on a shared machine adds a few milliseconds; a generator
    # that timed the wrong interval (a unit, a queue, a whole phase) would be off
    # by a multiple of the delay, which this bound still catches.
    assert result.percentile_s(50) <= delay_s * 1.5
    # Little's law, from the run's own samples: two users, each waiting out one
    # request at a time, complete 2 / mean latency requests a second.
    assert result.requests_per_s == pytest.approx(2 / result.latencies_s.mean(), rel=0.15)
    assert result.percentile_s(50) <= result.percentile_s(90) <= result.percentile_s(99)
    assert result.percentile_s(99) <= result.max_s
    assert 0.0 < result.cpu_cores < 2.5


def test_open_loop_charges_a_stall_to_every_request_scheduled_during_it() -> None:
    # One second into the run the server stops answering for one second.
    with serve_fake(Behaviour(stall_after_s=1.5, stall_s=1.0)) as fake:
        (result,) = bench.run(config(fake.target, duration_s=3.0, warmup_s=0.5), [Phase(rate=50)])
    assert result.ok == 150  # exactly the scheduled requests in the 3 s window
    assert result.percentile_s(99) >= 0.9
    assert result.max_s >= 0.99
    # About fifty requests were scheduled during the stall, so more than a
    # tenth of all of them waited at least a quarter of a second.
    assert result.percentile_s(85) >= 0.25


def test_closed_loop_would_hide_the_same_stall() -> None:
    # For contrast: one user waits out the stall in a single request, so only
    # one sample shows it (coordinated omission) and p99 stays small.
    with serve_fake(Behaviour(stall_after_s=1.5, stall_s=1.0)) as fake:
        (result,) = bench.run(config(fake.target, duration_s=3.0), [Phase(concurrency=1)])
    assert result.max_s >= 0.99
    assert result.percentile_s(99) < 0.1


def test_several_processes_are_merged() -> None:
    with serve_fake(Behaviour(delay_s=0.02)) as fake:
        cfg = config(fake.target, processes=2, duration_s=1.5)
        closed, open_ = bench.run(cfg, [Phase(concurrency=4), Phase(rate=80)])
    assert len(closed.cpu_s) == 2
    assert all(c > 0 for c in closed.cpu_s)
    # Four users over two processes, each waiting out one request at a time.
    assert float(closed.latencies_s.min()) >= 0.02
    assert closed.requests_per_s == pytest.approx(4 / closed.latencies_s.mean(), rel=0.15)
    assert closed.errors == {}
    assert open_.ok == 120  # 80/s for 1.5 s, split over two processes, none lost
    assert abs(open_.percentile_s(50) - 0.02) < 0.01
    served = sum(fake.behaviour.images)
    assert served >= closed.ok + open_.ok


def test_merge_pools_raw_samples() -> None:
    parts = [
        WorkerResult(np.array([0.001, 0.002, 0.003]), {"OK": 3, "UNAVAILABLE": 1}, 4, 0.5, 2.0),
        WorkerResult(np.array([0.010] * 7), {"OK": 7}, 6, 0.25, 2.0),
    ]
    result = bench_results.merge(Phase(concurrency=2), 2.0, 4, parts)
    pooled = np.concatenate([p.latencies_s for p in parts])
    for q in (50, 90, 99):
        assert result.percentile_s(q) == np.percentile(pooled, q, method="inverted_cdf")
    # An average of the two parts' medians (0.002, 0.010) would be 0.006.
    assert result.percentile_s(50) == 0.010
    assert result.codes == {"OK": 10, "UNAVAILABLE": 1}
    assert result.errors == {"UNAVAILABLE": 1}
    # Throughput counts the answers received in the window (4 + 6), not those sent.
    assert (result.requests_per_s, result.images_per_s) == (5.0, 20.0)
    assert result.cpu_cores == pytest.approx(0.375)
    row = result.as_dict()
    assert row["latency_ms"]["p50"] == 10.0
    assert (row["requests_ok"], row["completed_ok"]) == (10, 10)
    assert row["generator_cpu_per_process"] == [0.25, 0.125]
    # Two such windows: samples pooled, times added up per process.
    both = bench_results.combine(
        [result, bench_results.merge(Phase(concurrency=2), 2.0, 4, parts[::-1])]
    )
    assert both.duration_s == 4.0
    assert both.ok == 20
    assert both.requests_per_s == 5.0
    assert both.cpu_s == [0.75, 0.75]
    assert both.wall_s == [4.0, 4.0]


def test_every_answer_is_a_request_of_its_own() -> None:
    # The server cancels five calls after the first, as a draining server does. The
    # client's channel would retry those; the load generator's must not, or five
    # answers would be hidden inside other requests' times.
    behaviour = Behaviour(
        fail_after=1, fail_first=5, fail_code=grpc.StatusCode.CANCELLED,
        fail_methods=frozenset({"Predict"}),
    )  # fmt: skip
    with serve_fake(behaviour) as fake:
        (result,) = bench.run(config(fake.target, warmup_s=0.0, duration_s=0.5), [Phase(rate=40)])
    assert result.errors == {"CANCELLED": 5}
    assert result.ok == 15
    # The first request, then exactly the 20 scheduled ones: nothing was sent again.
    assert behaviour.calls["Predict"] == 21


def test_open_inference_protocol() -> None:
    with serve_fake(Behaviour(delay_s=0.005), oip=True) as fake:
        cfg = config(
            fake.target, protocol="oip", model_name="mnist", images_per_request=4, duration_s=1.0
        )
        (result,) = bench.run(cfg, [Phase(concurrency=2)])
        assert result.errors == {}
        assert result.ok > 20
        assert result.images_per_s == 4 * result.requests_per_s
        assert set(fake.behaviour.images) == {4}
        assert fake.behaviour.calls["ModelInfer"] >= result.ok
        failed = r"ModelMetadata for model 'other' failed: NOT_FOUND: .*unknown model 'other'"
        with pytest.raises(NotFoundError, match=failed):
            bench.run(config(fake.target, protocol="oip", model_name="other"), [Phase(rate=1)])


def test_oip_request_follows_the_model_metadata() -> None:
    spec = bench_requests.OipInput("x", "FP32", (-1, 784))
    method, requests = bench_requests.oip_requests("m", spec, IMAGES, 3)
    assert method == "/inference.GRPCInferenceService/ModelInfer"
    service_pb2, _ = bench_requests.import_oip()
    request = service_pb2.ModelInferRequest.FromString(requests[0])
    assert list(request.inputs[0].shape) == [3, 784]
    assert request.inputs[0].datatype == "FP32"
    values = np.frombuffer(request.raw_input_contents[0], "<f4").reshape(3, 28, 28)
    np.testing.assert_allclose(values, IMAGES[:3] / 255.0, rtol=1e-6)
    for bad, message in [
        (bench_requests.OipInput("x", "BYTES", (-1, 784)), "datatype BYTES"),
        (bench_requests.OipInput("x", "UINT8", (28, 28)), "leading batch dimension"),
        (bench_requests.OipInput("x", "UINT8", (-1, 500)), "does not hold images of 28x28x1"),
        (bench_requests.OipInput("x", "UINT8", (-1, 8, -1)), "variable dimension"),
    ]:
        with pytest.raises(InputError, match=message):
            bench_requests.oip_requests("m", bad, IMAGES, 1)


def test_oip_request_resizes_the_pool_to_a_declared_image_shape() -> None:
    spec = bench_requests.OipInput("x", "UINT8", (-1, 8, 8, 3))
    _, requests = bench_requests.oip_requests("m", spec, np.full((2, 28, 28), 200, np.uint8), 2)
    service_pb2, _ = bench_requests.import_oip()
    request = service_pb2.ModelInferRequest.FromString(requests[0])
    assert list(request.inputs[0].shape) == [2, 8, 8, 3]
    values = np.frombuffer(request.raw_input_contents[0], np.uint8)
    assert values.size == 2 * 8 * 8 * 3
    assert set(values.tolist()) == {200}  # area averaging keeps a flat image flat


def test_predict_requests_follow_the_model_input_shape() -> None:
    with serve_fake() as fake:
        cfg = config(fake.target, model_name="digits8", images_per_request=2, duration_s=0.3)
        (result,) = bench.run(cfg, [Phase(rate=10)])
        assert result.errors == {}
        assert set(fake.behaviour.shapes) == {(2, 8, 8, 1)}
        assert fake.behaviour.models[0] == ("GetModelMetadata", "digits8")
        assert {name for _, name in fake.behaviour.models} == {"digits8"}
        with pytest.raises(NotFoundError, match="GetModelMetadata for model 'nope' failed"):
            bench.run(config(fake.target, model_name="nope"), [Phase(rate=1)])


def test_oip_model_name_selects_the_model_and_its_shape() -> None:
    with serve_fake(oip=True) as fake:
        cfg = config(
            fake.target, protocol="oip", model_name="digits8", images_per_request=3,
            duration_s=0.3,
        )  # fmt: skip
        (result,) = bench.run(cfg, [Phase(rate=10)])
    assert result.errors == {}
    assert set(fake.behaviour.shapes) == {(3, 8, 8, 1)}
    assert {name for _, name in fake.behaviour.models} == {"digits8"}


def test_resize_batch() -> None:
    images = np.zeros((1, 4, 4), np.uint8)
    images[0, :2, :2] = 255  # the top-left quarter is ink
    np.testing.assert_array_equal(resize_batch(images, (2, 2, 1))[0, :, :, 0], [[255, 0], [0, 0]])
    # Three pixels onto two: each output pixel averages one and a half input pixels.
    row = np.array([[[0, 90, 180]]], np.uint8)
    np.testing.assert_array_equal(resize_batch(row, (1, 2, 1)).reshape(-1), [30, 150])
    colour = resize_batch(np.full((1, 2, 2, 3), (30, 60, 90), np.uint8), (2, 2, 1))
    assert colour.reshape(-1).tolist() == [60, 60, 60, 60]
    np.testing.assert_array_equal(resize_batch(IMAGES[:3], (28, 28, 1))[..., 0], IMAGES[:3])


def test_streams_carry_the_requests_with_the_same_timing() -> None:
    delay_s = 0.050
    with serve_fake(Behaviour(delay_s=delay_s)) as fake:
        # The fake answers a stream's messages one after another, so one user per
        # stream sees the server's delay, as with unary calls.
        (result,) = bench.run(config(fake.target, streams=2), [Phase(concurrency=2)])
    assert result.errors == {}
    assert float(result.latencies_s.min()) >= delay_s
    assert result.percentile_s(50) <= delay_s * 1.5
    assert result.requests_per_s == pytest.approx(2 / result.latencies_s.mean(), rel=0.15)
    # The first request goes unary (it checks the server takes it); every other one streams.
    assert fake.behaviour.calls["Predict"] == 1
    assert fake.behaviour.calls["PredictStream"] >= result.ok


def test_stream_error_answers_are_counted_by_code() -> None:
    behaviour = Behaviour(fail_first=5, fail_code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    with serve_fake(behaviour) as fake:
        # fail_first counts per method: the model's metadata and the unary first
        # request would fail too, so skip them.
        behaviour.calls["GetModelMetadata"] = 5
        behaviour.calls["Predict"] = 5
        cfg = config(fake.target, streams=1, warmup_s=0.0, duration_s=0.5)
        (result,) = bench.run(cfg, [Phase(rate=40)])
    assert result.errors == {"RESOURCE_EXHAUSTED": 5}
    assert result.ok == 20 - 5


def test_stream_mode_is_for_convserve_predict_only() -> None:
    with pytest.raises(InputError, match="--streams needs --protocol convserve"):
        config("x:1", streams=2, rpc="convolve")
    with pytest.raises(InputError, match="streams must be >= 0"):
        config("x:1", streams=-1)
    requests = bench_requests.stream_requests([pb.PredictRequest().SerializeToString()])
    message = pb.PredictStreamRequest.FromString(
        pb.PredictStreamRequest(id=7).SerializeToString() + requests[0]
    )
    assert message.id == 7
    assert message.HasField("request")


def test_convolve_rpc() -> None:
    with serve_fake() as fake:
        (result,) = bench.run(config(fake.target, rpc="convolve", duration_s=0.5), [Phase(rate=20)])
    assert result.ok == 10
    assert fake.behaviour.calls["Convolve"] >= 10


def test_a_server_that_cannot_be_reached_fails_the_run_at_once() -> None:
    with nothing_listens() as unreachable:
        with pytest.raises(UnavailableError, match="GetModelMetadata for model '' failed"):
            bench.run(config(unreachable), [Phase(concurrency=1)])
        with pytest.raises(UnavailableError, match="the first request failed"):
            bench.run(config(unreachable, rpc="convolve"), [Phase(concurrency=1)])


def test_a_first_request_the_server_refuses_fails_the_run() -> None:
    behaviour = Behaviour(fail_first=1, fail_code=grpc.StatusCode.INVALID_ARGUMENT)
    with serve_fake(behaviour) as fake:
        behaviour.calls["GetModelMetadata"] = 1
        with pytest.raises(InvalidArgumentError, match="the first request failed"):
            bench.run(config(fake.target), [Phase(concurrency=1)])


def test_config_and_phase_validation() -> None:
    with pytest.raises(InputError, match="needs --model"):
        config("x:1", protocol="oip")
    with pytest.raises(InputError, match="either a concurrency or a rate"):
        Phase()
    with pytest.raises(InputError, match="rate must be > 0"):
        Phase(rate=0)
    assert Phase(concurrency=3).label == "closed c=3"
    assert Phase(rate=2.5).label == "open 2.5/s"


def test_input_images(tmp_path: Path) -> None:
    again, labels = bench_requests.synthetic_digits(32)
    np.testing.assert_array_equal(again, IMAGES)  # deterministic
    assert labels.tolist() == [i % 10 for i in range(32)]
    assert IMAGES.dtype == np.uint8
    assert (IMAGES > 0).sum(axis=(1, 2)).min() > 20
    path = tmp_path / "digits.npz"
    np.savez(path, images=IMAGES[:5] / 255.0, labels=labels[:5])
    np.testing.assert_array_equal(bench_requests.load_images(path), IMAGES[:5, :, :, np.newaxis])
    colour = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.save(tmp_path / "colour.npy", colour)
    np.testing.assert_array_equal(bench_requests.load_images(tmp_path / "colour.npy"), colour)
    np.savez(tmp_path / "other.npz", pixels=IMAGES)
    with pytest.raises(InputError, match="no 'images' array"):
        bench_requests.load_images(tmp_path / "other.npz")
    np.save(tmp_path / "flat.npy", IMAGES.reshape(32, 784))
    with pytest.raises(InputError, match=r"flat.npy: images must be \[N,H,W\] or \[N,H,W,C\]"):
        bench_requests.load_images(tmp_path / "flat.npy")


def test_progress_line(capsys: pytest.CaptureFixture[str]) -> None:
    bench.Progress(False, 10.0, "closed c=1").show(5, 0)
    assert capsys.readouterr().err == ""
    line = bench.Progress(True, 10.0, "closed c=1")
    line.show(120, 3)
    line.finish()
    err = capsys.readouterr().err
    assert err.startswith("\rclosed c=1       [")
    assert "120 requests, 3 failed" in err
    assert err.endswith("\r")
