"""The server's Prometheus metrics: one `Metrics` object per server, one registry.

Every metric has a fixed label set and base units (seconds, bytes). The
batching metrics are labelled by the runtime operation (``rpc``: Predict,
Convolve, FitKernel, GetFeatureMaps) and the model (``model``: a configured
model's name; empty for Convolve and FitKernel, which use no model), whichever
protocol sent the request, so batches merged across protocols show up in one
histogram. Request metrics carry the model the request named too: a
configured name, or ``_unknown`` for any other (so that clients cannot grow
the label set).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from convserve.server import device as device_mod
from convserve.server.batcher import BatchObserver

log = logging.getLogger(__name__)

# Request latencies from sub-millisecond cached calls to slow kernel fits.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The operations that run a model (their batching series carry its name).
MODEL_RPCS = ("Predict", "GetFeatureMaps")
# Measured / estimated seconds of an operation: under 1 where the cost model errs high.
COST_RATIO_BUCKETS = (0.01, 0.03, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 10.0)


class _Observer:
    """Feeds one operation's batching figures into the metrics."""

    def __init__(self, metrics: Metrics, rpc: str, model: str) -> None:
        labels = {"rpc": rpc, "model": model}
        self._queued = metrics.queued_images.labels(**labels)
        self._wait = metrics.queue_wait.labels(**labels)
        self._execution = metrics.model_execution.labels(**labels)
        self._batch_size = metrics.batch_size.labels(**labels)
        self._images = metrics.images_processed.labels(**labels)

    def on_queue_depth(self, items: int) -> None:
        self._queued.set(items)

    def on_batch(
        self, size: int, padded_size: int, queue_waits_s: Sequence[float], run_s: float
    ) -> None:
        for wait in queue_waits_s:
            self._wait.observe(max(0.0, wait))
        self._execution.observe(max(0.0, run_s))
        self._batch_size.observe(size)
        self._images.inc(size)


class Metrics:
    """All server metrics, registered in `registry` (a fresh one when None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "convserve_requests",
            "Finished requests by protocol, RPC, model and gRPC status code.",
            ["protocol", "rpc", "model", "code"],
            registry=reg,
        )
        self.request_duration = Histogram(
            "convserve_request_duration_seconds",
            "Time from receiving a request to its response, by protocol, RPC and model.",
            ["protocol", "rpc", "model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_wait = Histogram(
            "convserve_queue_wait_seconds",
            "Time a request part waited from enqueue to the start of its batch.",
            ["rpc", "model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.model_execution = Histogram(
            "convserve_model_execution_seconds",
            "Duration of one model or operation call.",
            ["rpc", "model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            "convserve_batch_size",
            "Images per model call, before padding.",
            ["rpc", "model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=reg,
        )
        self.images_processed = Counter(
            "convserve_images_processed",
            "Images (or convolution inputs) run through a model or operation.",
            ["rpc", "model"],
            registry=reg,
        )
        self.queued_images = Gauge(
            "convserve_queued_images",
            "Images queued for batching, not yet in a batch.",
            ["rpc", "model"],
            registry=reg,
        )
        self.inflight = Gauge(
            "convserve_inflight_requests",
            "Requests being handled now.",
            ["protocol", "rpc", "model"],
            registry=reg,
        )
        self.model_loads = Counter(
            "convserve_model_loads",
            "Model version loads (with warm-up) by result: success or failure.",
            ["model", "result"],
            registry=reg,
        )
        self.worker_exits = Counter(
            "convserve_model_worker_exits",
            "Model worker processes that stopped while serving (each is restarted).",
            ["model"],
            registry=reg,
        )
        self.model_info = Info(
            "convserve_model",
            "The serving model version, the device it computes on and the engine that computes.",
            ["model"],
            registry=reg,
        )
        self.model_ready = Gauge(
            "convserve_model_ready",
            "1 while the model has a serving version with a usable engine, else 0.",
            ["model"],
            registry=reg,
        )
        self.device_memory = Gauge(
            "convserve_device_memory_bytes",
            "Device memory TensorFlow reports in use (current) and its peak.",
            ["device", "kind"],
            registry=reg,
        )
        self.model_memory = Gauge(
            "convserve_model_memory_bytes",
            "Bytes the model's loaded versions' batch buffers are sized for (engine copies "
            "in the server and its worker processes, shared regions), within "
            "--max-model-memory-bytes per version.",
            ["model"],
            registry=reg,
        )
        self.versions_loaded = Gauge(
            "convserve_model_versions_loaded",
            "Model versions loaded in memory (serving or pinnable).",
            ["model"],
            registry=reg,
        )
        self.admitted_work = Gauge(
            "convserve_admitted_work_cpu_seconds",
            "Estimated CPU seconds of operations admitted and not yet stopped (waiting or "
            "computing, whether or not their callers still wait), by RPC.",
            ["rpc"],
            registry=reg,
        )
        self.work_stopped = Counter(
            "convserve_work_stopped",
            "Operations stopped before they finished, by RPC and reason (cancelled: the "
            "caller went away; deadline; overrun: far past the estimate; shutdown).",
            ["rpc", "reason"],
            registry=reg,
        )
        self.work_cost_ratio = Histogram(
            "convserve_work_cost_ratio",
            "Seconds an operation computed divided by its estimate (the cost model's accuracy).",
            ["rpc"],
            buckets=COST_RATIO_BUCKETS,
            registry=reg,
        )
        self._request_series: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._counts: dict[tuple[str, str, str, str], Any] = {}

    def request_started(self, protocol: str, rpc: str, model: str = "") -> None:
        self._series(protocol, rpc, model)[0].inc()

    def request_finished(
        self, protocol: str, rpc: str, code: str, seconds: float, model: str = ""
    ) -> None:
        """`code` is the gRPC status code name, e.g. "OK" or "INVALID_ARGUMENT"."""
        inflight, duration = self._series(protocol, rpc, model)
        inflight.dec()
        key = (protocol, rpc, model, code)
        counter = self._counts.get(key)
        if counter is None:
            counter = self.requests.labels(protocol=protocol, rpc=rpc, model=model, code=code)
            self._counts[key] = counter
        counter.inc()
        duration.observe(max(0.0, seconds))

    def _series(self, protocol: str, rpc: str, model: str) -> tuple[Any, Any]:
        # labels() validates and hashes its arguments under a lock on every call, a
        # sizeable part of a small request's cost; the label values come from fixed
        # sets, so their series are looked up once.
        key = (protocol, rpc, model)
        series = self._request_series.get(key)
        if series is None:
            series = (
                self.inflight.labels(protocol=protocol, rpc=rpc, model=model),
                self.request_duration.labels(protocol=protocol, rpc=rpc, model=model),
            )
            self._request_series[key] = series
        return series

    def on_admitted_seconds(self, rpc: str, seconds: float) -> None:
        self.admitted_work.labels(rpc=rpc).set(seconds)

    def on_work_stopped(self, rpc: str, reason: str) -> None:
        self.work_stopped.labels(rpc=rpc, reason=reason).inc()

    def on_work_finished(self, rpc: str, estimate_s: float, ran_s: float) -> None:
        if estimate_s > 0:
            self.work_cost_ratio.labels(rpc=rpc).observe(ran_s / estimate_s)

    def batch_observer(self, rpc: str, model: str = "") -> BatchObserver:
        """An observer for `DynamicBatcher` (or any operation call) of `rpc` on `model`."""
        return _Observer(self, rpc, model)

    def forget_model(self, model: str) -> None:
        """Drop every series of a model that is no longer configured, so that a
        configuration whose models come and go does not grow the exposition."""
        for key in [k for k in self._request_series if k[2] == model]:
            del self._request_series[key]
            series: tuple[Any, ...] = (self.inflight, self.request_duration)
            for metric in series:
                with contextlib.suppress(KeyError):
                    metric.remove(*key)
        for count in [k for k in self._counts if k[2] == model]:
            del self._counts[count]
            with contextlib.suppress(KeyError):
                self.requests.remove(*count)
        batching: tuple[Any, ...] = (
            self.queue_wait,
            self.model_execution,
            self.batch_size,
            self.images_processed,
            self.queued_images,
        )
        for metric in batching:
            for rpc in MODEL_RPCS:
                with contextlib.suppress(KeyError):
                    metric.remove(rpc, model)
        per_model: tuple[Any, ...] = (
            self.model_info,
            self.versions_loaded,
            self.worker_exits,
            self.model_ready,
            self.model_memory,
        )
        for metric in per_model:
            with contextlib.suppress(KeyError):
                metric.remove(model)
        for result in ("success", "failure"):
            with contextlib.suppress(KeyError):
                self.model_loads.remove(model, result)

    def worker_exited(self, model: str) -> None:
        self.worker_exits.labels(model=model).inc()

    def model_loaded(self, model: str, version: int, ok: bool) -> None:
        self.model_loads.labels(model=model, result="success" if ok else "failure").inc()

    def serving(
        self, model: str, version: int, device: str, engine: str, loaded_versions: int
    ) -> None:
        """Record the version now serving (replaces the previous one in the info metric)."""
        self.model_info.labels(model=model).info(
            {"version": str(version), "device": device, "engine": engine}
        )
        self.versions_loaded.labels(model=model).set(loaded_versions)
        self.worker_exits.labels(model=model)  # exported as 0 before the first exit

    def update_device_memory(self, device: str) -> None:
        """Refresh the memory gauges for `device` (e.g. "/GPU:0"); no-op where TF cannot tell."""
        name = device.lstrip("/")
        kind, _, index = name.partition(":")
        choice = device_mod.DeviceChoice(
            name=f"/{name}",
            kind="gpu" if kind.lower() == "gpu" else "cpu",
            index=int(index) if index.isdigit() else 0,
            reason="metrics",
        )
        try:
            info = device_mod.memory_info(choice)
        except Exception:  # a metrics refresh must never fail a request
            log.debug("device memory query failed for %s", device, exc_info=True)
            return
        if info is None:
            return
        for kind_name in ("current", "peak"):
            self.device_memory.labels(device=device, kind=kind_name).set(info[kind_name])
