"""The metrics: names, fixed labels, units and values as a scraper sees them."""

from __future__ import annotations

import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from convserve.server import device
from convserve.server.metrics import Metrics
from tests.conftest import require_tool


def samples(metrics: Metrics) -> list[Sample]:
    text = generate_latest(metrics.registry).decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels` (a label left out, such
    as `model` with one model served, may take any value; exactly one must match)."""
    found = [
        s.value
        for s in samples(metrics)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def test_requests_are_counted_timed_and_tracked_in_flight() -> None:
    metrics = Metrics()
    metrics.request_started("convserve", "Predict")
    metrics.request_started("oip", "ModelInfer")
    assert value(metrics, "convserve_inflight_requests", protocol="convserve", rpc="Predict") == 1
    metrics.request_finished("convserve", "Predict", "OK", 0.003)
    metrics.request_finished("oip", "ModelInfer", "INVALID_ARGUMENT", 0.2)
    assert value(metrics, "convserve_inflight_requests", protocol="convserve", rpc="Predict") == 0
    assert value(metrics, "convserve_inflight_requests", protocol="oip", rpc="ModelInfer") == 0
    assert (
        value(metrics, "convserve_requests_total", protocol="convserve", rpc="Predict", code="OK")
        == 1
    )
    assert (
        value(
            metrics,
            "convserve_requests_total",
            protocol="oip",
            rpc="ModelInfer",
            code="INVALID_ARGUMENT",
        )
        == 1
    )
    duration = "convserve_request_duration_seconds"
    assert value(metrics, f"{duration}_count", protocol="convserve", rpc="Predict") == 1
    assert value(metrics, f"{duration}_sum", protocol="oip", rpc="ModelInfer") == pytest.approx(0.2)
    # 3 ms falls in the 5 ms bucket, not in the 2.5 ms one.
    bucket = f"{duration}_bucket"
    assert value(metrics, bucket, protocol="convserve", rpc="Predict", le="0.0025") == 0
    assert value(metrics, bucket, protocol="convserve", rpc="Predict", le="0.005") == 1


def test_batch_observer_records_queue_batches_and_images() -> None:
    metrics = Metrics()
    observer = metrics.batch_observer("Predict")
    observer.on_queue_depth(12)
    assert value(metrics, "convserve_queued_images", rpc="Predict") == 12
    observer.on_batch(5, 8, [0.001, 0.002], 0.01)
    observer.on_batch(3, 4, [0.0], 0.02)
    observer.on_queue_depth(0)
    assert value(metrics, "convserve_queued_images", rpc="Predict") == 0
    assert value(metrics, "convserve_images_processed_total", rpc="Predict") == 8
    assert value(metrics, "convserve_batch_size_count", rpc="Predict") == 2
    assert value(metrics, "convserve_batch_size_sum", rpc="Predict") == 8
    assert value(metrics, "convserve_batch_size_bucket", rpc="Predict", le="4.0") == 1
    assert value(metrics, "convserve_queue_wait_seconds_count", rpc="Predict") == 3
    assert value(metrics, "convserve_queue_wait_seconds_sum", rpc="Predict") == pytest.approx(0.003)
    assert value(metrics, "convserve_model_execution_seconds_sum", rpc="Predict") == pytest.approx(
        0.03
    )


def test_model_loads_and_the_serving_version() -> None:
    metrics = Metrics()
    metrics.model_loaded("mnist", 1, ok=True)
    metrics.model_loaded("mnist", 2, ok=False)
    metrics.model_loaded("mnist", 3, ok=True)
    assert value(metrics, "convserve_model_loads_total", model="mnist", result="success") == 2
    assert value(metrics, "convserve_model_loads_total", model="mnist", result="failure") == 1
    metrics.serving("mnist", 1, "/CPU:0", "litert", loaded_versions=1)
    metrics.serving("mnist", 3, "/CPU:0", "tensorflow", loaded_versions=2)
    info = [s for s in samples(metrics) if s.name == "convserve_model_info"]
    # Only the serving version is reported.
    assert [(s.labels, s.value) for s in info] == [
        ({"model": "mnist", "version": "3", "device": "/CPU:0", "engine": "tensorflow"}, 1.0)
    ]
    assert value(metrics, "convserve_model_versions_loaded", model="mnist") == 2


def test_device_memory_is_reported_where_tensorflow_knows_it() -> None:
    metrics = Metrics()
    metrics.update_device_memory("/CPU:0")
    reported = device.memory_info(device.choose_device("cpu"))
    memory = [s for s in samples(metrics) if s.name == "convserve_device_memory_bytes"]
    if reported is None:
        assert memory == []
    else:
        assert {s.labels["kind"] for s in memory} == {"current", "peak"}


def test_registries_are_independent() -> None:
    first, second = Metrics(), Metrics()
    first.request_started("convserve", "Convolve")
    assert value(first, "convserve_inflight_requests", protocol="convserve", rpc="Convolve") == 1
    assert not [s for s in samples(second) if s.name == "convserve_inflight_requests"]


def test_promtool_accepts_every_metric() -> None:
    promtool = require_tool("promtool")
    metrics = Metrics()
    metrics.request_started("tfserving", "Predict")
    metrics.request_finished("tfserving", "Predict", "OK", 0.01)
    metrics.batch_observer("Predict").on_batch(2, 2, [0.0, 0.0], 0.001)
    metrics.batch_observer("Predict").on_queue_depth(0)
    metrics.model_loaded("mnist", 1, ok=True)
    metrics.serving("mnist", 1, "/CPU:0", "litert", loaded_versions=1)
    metrics.device_memory.labels(device="/GPU:0", kind="current").set(1024)
    text = generate_latest(metrics.registry)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    names = {family.name for family in text_string_to_metric_families(text.decode())}
    assert {
        "convserve_requests",
        "convserve_request_duration_seconds",
        "convserve_queue_wait_seconds",
        "convserve_model_execution_seconds",
        "convserve_batch_size",
        "convserve_images_processed",
        "convserve_queued_images",
        "convserve_inflight_requests",
        "convserve_model_loads",
        "convserve_model_info",
        "convserve_device_memory_bytes",
        "convserve_model_versions_loaded",
    } <= names
