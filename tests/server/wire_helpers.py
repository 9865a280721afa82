"""Shared pieces of the server wire tests: a stand-in runtime, settings, servers, polling.

`StubRuntime` has the real `Runtime`'s interface with a fixed, cheap model
(a digit is the pixel sum mod 10) and the real `ops` for convolution and
kernel fitting, so the wire layer (converters, servicer, interceptors, app
lifecycle) can be tested without a trained model. Tests of the whole server
use the real runtime with the shared trained model instead.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from convserve.server import errors, ops, types

LISTENING = re.compile(r"convserve-server listening on (\S+):(\d+) metrics on :(\d+)")


def stand_in_check_images(images: np.ndarray, field: str, max_images: int) -> np.ndarray:
    """The digit checks of the real runtime, in short, for stand-in runtimes."""
    if images.dtype not in (np.uint8, np.float32):
        raise errors.InvalidArgument(field, f"uint8 or float32 expected, got {images.dtype}")
    if images.shape[1:] not in ((28, 28, 1), (28, 28), (784,)):
        raise errors.InvalidArgument(
            field, f"[N,28,28], [N,28,28,1] or [N,784] expected, got {list(images.shape)}"
        )
    if len(images) > max_images:
        raise errors.InvalidArgument(
            field, f"at most {max_images} images expected, got {len(images)}"
        )
    if images.dtype == np.float32 and not (
        np.all(np.isfinite(images)) and images.min() >= 0 and images.max() <= 1
    ):
        raise errors.InvalidArgument(field, "finite values in [0, 1] expected")
    return images.reshape(-1, 28, 28, 1)


def stand_in_version(ref: types.ModelRef, model_name: str, versions: tuple[int, ...]) -> int:
    """The version a stand-in runtime serves `ref` with; NotFound as the real one says it."""
    if ref.name not in (None, model_name):
        raise errors.NotFound(f"model_spec.name: unknown model {errors.shown(ref.name)}")
    if ref.version is None:
        return max(versions)
    if ref.version not in versions:
        raise errors.NotFound(f"model_spec.version: version {ref.version} is not loaded")
    return ref.version


def stub_probabilities(images: np.ndarray) -> np.ndarray:
    """One-hot on (sum of pixels on the 0..255 scale) mod 10, per image."""
    scaled = images.astype(np.float64) * (255.0 if images.dtype == np.float32 else 1.0)
    digits = np.rint(scaled.reshape(len(images), -1).sum(axis=1)).astype(np.int64) % 10
    return np.eye(10, dtype=np.float32)[digits]


@dataclass
class StubRuntime:
    """The `Runtime` interface over a fixed model; `gate` (when set) holds predictions."""

    model_name: str = "mnist"
    versions: tuple[int, ...] = (1, 2)
    max_images: int = 64
    device: str = "/CPU:0"
    ready: bool = False
    fail_start: bool = False
    start_gate: asyncio.Event | None = None
    gate: asyncio.Event | None = None
    started_predictions: int = 0
    stopped_with: float | None = None
    events: list[str] = field(default_factory=list)

    async def start(self) -> None:
        self.events.append("runtime.start")
        if self.start_gate is not None:
            await self.start_gate.wait()
        if self.fail_start:
            raise errors.Unavailable("no loadable model version under the base path")
        self.ready = True

    async def stop(self, grace_s: float) -> None:
        self.events.append("runtime.stop")
        self.ready = False
        self.stopped_with = grace_s

    def check_images(self, images: np.ndarray, field: str = "images") -> np.ndarray:
        return stand_in_check_images(images, field, self.max_images)

    def _version(self, ref: types.ModelRef) -> int:
        return stand_in_version(ref, self.model_name, self.versions)

    async def predict(
        self, value: types.PredictInput, *, deadline: float | None, protocol: str = "convserve"
    ) -> types.PredictOutput:
        if not self.ready:
            raise errors.Unavailable("the model is not ready")
        version = self._version(value.model)
        self.started_predictions += 1
        if self.gate is not None:
            await self.gate.wait()
        return types.PredictOutput(self.model_name, version, stub_probabilities(value.images))

    async def convolve(
        self, value: types.ConvolveInput, *, deadline: float | None
    ) -> types.ConvolveOutput:
        return ops.convolve(value)

    async def fit_kernel(
        self, value: types.FitKernelInput, *, deadline: float | None
    ) -> types.FitKernelOutput:
        return ops.fit_kernel(value, max_steps=2000, time_budget_s=60.0)

    async def feature_maps(
        self, value: types.FeatureMapsInput, *, deadline: float | None
    ) -> types.FeatureMapsOutput:
        version = self._version(value.model)
        image = value.image[0].astype(np.float32)
        available = {"conv1": image, "conv2": image[::2, ::2] * 2}
        names = value.layers or tuple(available)
        for name in names:
            if name not in available:
                raise errors.InvalidArgument("layers", f"one of conv1, conv2 expected, got {name}")
        return types.FeatureMapsOutput(
            self.model_name, version, [(name, available[name]) for name in names]
        )

    def metadata(self, ref: types.ModelRef) -> types.ModelMetadata:
        version = self._version(ref)
        return types.ModelMetadata(
            model_name=self.model_name,
            loaded_versions=self.versions,
            serving_version=version,
            inputs=(types.TensorSpecInfo("images", ("uint8", "float32"), (-1, 28, 28, 1)),),
            outputs=(types.TensorSpecInfo("probabilities", ("float32",), (-1, 10)),),
            layers=(types.LayerRow("conv1", "Conv2D", (26, 26, 8), 80),),
            training={"dataset": "sample", "test_accuracy": 0.5},
            device=self.device,
        )


class StubMetrics:
    """Records request accounting calls; exposes a registry like the real `Metrics`."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "convserve_requests",
            "Requests by protocol, RPC and status code.",
            ["protocol", "rpc", "code"],
            registry=self.registry,
        )
        self.started: list[tuple[str, str]] = []
        self.finished: list[tuple[str, str, str]] = []

    def request_started(self, protocol: str, rpc: str) -> None:
        self.started.append((protocol, rpc))

    def request_finished(self, protocol: str, rpc: str, code: str, seconds: float) -> None:
        assert seconds >= 0
        self.finished.append((protocol, rpc, code))
        self.requests.labels(protocol, rpc, code).inc()


def settings_for(model_base_path: Path | str = "models/mnist", **overrides: Any) -> Any:
    """Settings for a local test server on free ports, unaffected by CONVSERVE_* variables."""
    from convserve.server.settings import Settings

    values: dict[str, Any] = {
        "model_base_path": Path(model_base_path),
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "grace_period_s": 5.0,
        "log_format": "text",
        "log_level": "INFO",
    }
    values.update(overrides)
    return Settings(**values)


def poll(check: Callable[[], Any], *, timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Call `check` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as exc:  # a server that is still starting refuses connections
            last_error = exc
        else:
            if value:
                return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {last_error!r}")


def scrape(metrics_port: int, host: str = "127.0.0.1") -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample_value(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


@dataclass
class ServerProcess:
    """A `python -m convserve.server` child process and the ports it reported."""

    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    lines: list[str]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_server_process(
    args: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 240.0
) -> ServerProcess:
    """Start the server as a child process and wait for its listening line.

    stderr is read on a thread into `lines` (kept for the test's assertions).
    """
    import threading

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    full_env.update(env or {})
    process = subprocess.Popen(
        [sys.executable, "-m", "convserve.server", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    lines: list[str] = []
    found: list[re.Match[str]] = []
    seen = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            match = LISTENING.search(line)
            if match and not found:
                found.append(match)
                seen.set()
        seen.set()

    threading.Thread(target=read, daemon=True).start()
    if not seen.wait(timeout_s) or not found:
        process.kill()
        process.wait()
        raise AssertionError("server did not report its port:\n" + "".join(lines[-40:]))
    match = found[0]
    return ServerProcess(process, int(match.group(2)), int(match.group(3)), lines)


def kill_process(server: ServerProcess) -> None:
    """Kill a child server that a failed test left running."""
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()
