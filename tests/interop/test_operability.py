"""Operability against real server processes: what an operator's mistakes and a
model repository's hazards must not do to a replica.

- one model that cannot load never takes the replica out of service (liveness and,
  by default, readiness stay SERVING; the others serve on without a failed call;
  the error shows in ``convserve models --json`` and ``/metrics``);
- a config file read while it is empty or half-written unloads nothing;
- a version is loaded whole (its assets arriving last) and class names that no
  protocol can send refuse the version;
- a model whose input would not fit the memory budget is refused;
- SIGTERM always ends the process: during start-up, and while a read of the
  model config file is blocked (a FIFO nobody writes, as a hung network file
  system behaves).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from tests.interop.three_protocols import Images, convserve_predict
from tests.polling import wait_for
from tests.server.wire_helpers import (
    ServerProcess,
    kill_process,
    sample_value,
    scrape,
    server_env,
    start_server_process,
)

pytestmark = pytest.mark.slow

GRACE_S = 1.0
# What shutdown may take beyond the grace period (convserve.server.__main__.STOP_MARGIN_S),
# plus the time a loaded process takes to wind down on a shared 2-core machine.
STOP_BOUND_S = GRACE_S + 5.0 + 5.0
DIGIT_NAMES = [str(digit) for digit in range(10)]
# `convserve` (the client's command line) in this interpreter.
CLI = "import sys; from convserve.client.cli import main; sys.exit(main())"


def config_text(*models: tuple[str, Path]) -> str:
    entries = "".join(f'  config {{ name: "{n}" base_path: "{p}" }}\n' for n, p in models)
    return "model_config_list {\n" + entries + "}\n"


def server_args(config: Path, *extra: str) -> list[str]:
    return [
        "--model-config-file", str(config),
        "--model-config-file-poll-wait-s", "0.2",
        "--poll-interval-s", "0.2",
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--device", "cpu", "--grace-period-s", str(GRACE_S),
        "--max-concurrent-batches", "1", "--engine-workers", "thread",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def mnist_base(tmp_path: Path, model_base_path: Path) -> Path:
    """A model base path of its own holding the trained MNIST export as version 1."""
    base = tmp_path / "mnist"
    shutil.copytree(model_base_path / "1", base / "1")
    return base


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        kill_process(server)


@pytest.fixture
def mnist_server(
    tmp_path: Path, mnist_base: Path, processes: list[ServerProcess]
) -> tuple[ServerProcess, Path]:
    """A server process for `mnist_base` from a model config file; the file's path."""
    config = tmp_path / "models.config"
    config.write_text(config_text(("mnist", mnist_base)))
    server = start_server_process(server_args(config))
    processes.append(server)
    return server, config


def health(channel: grpc.Channel, service: str) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def listing(channel: grpc.Channel) -> dict[str, convserve_pb2.ModelStatus]:
    reply = convserve_pb2_grpc.ConvServeStub(channel).ListModels(
        convserve_pb2.ListModelsRequest(), timeout=10
    )
    return {model.name: model for model in reply.models}


def metadata(channel: grpc.Channel, model: str) -> convserve_pb2.GetModelMetadataResponse:
    request = convserve_pb2.GetModelMetadataRequest()
    request.model_spec.name = model
    return convserve_pb2_grpc.ConvServeStub(channel).GetModelMetadata(request, timeout=10)


def serving_version(channel: grpc.Channel, model: str) -> int | None:
    status = listing(channel).get(model)
    if status is None:
        return None
    return next((v.version for v in status.versions if v.serving), None)


def stop(server: ServerProcess) -> tuple[int, float]:
    """SIGTERM; (exit code, seconds it took)."""
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout=STOP_BOUND_S + 30)
    return code, time.monotonic() - started


class Load:
    """Predict calls in a loop on each of `models` until stopped, counting outcomes."""

    def __init__(self, target: str, models: dict[str, tuple[int, ...]]) -> None:
        self._channel = grpc.insecure_channel(target)
        rng = np.random.default_rng(1)
        self._images = {
            name: Images.of(rng.integers(0, 256, (2, *shape), dtype=np.uint8), model=name)
            for name, shape in models.items()
        }
        self.ok = dict.fromkeys(models, 0)
        self.failed: dict[str, list[str]] = {name: [] for name in models}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(name,), daemon=True) for name in models
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self._channel.close()

    def _run(self, name: str) -> None:
        while not self._stop.is_set():
            code = convserve_predict(self._channel, self._images[name])
            if code == grpc.StatusCode.OK:
                self.ok[name] += 1
            else:
                self.failed[name].append(code.name)


def test_a_model_that_cannot_load_leaves_the_replica_serving_the_others(
    tmp_path: Path, mnist_base: Path, digits8_model_dir: Path, processes: list[ServerProcess]
) -> None:
    """Kubernetes-shaped: liveness and readiness probes, two models under load, a
    third with a mistyped base path added to the config file."""
    config = tmp_path / "models.config"
    config.write_text(config_text(("mnist", mnist_base), ("digits8", digits8_model_dir)))
    server = start_server_process(server_args(config))
    processes.append(server)
    with grpc.insecure_channel(server.target) as channel:
        wait_for(lambda: health(channel, "") == "SERVING", what="ready", timeout_s=120)
        with Load(server.target, {"mnist": (28, 28, 1), "digits8": (8, 8, 1)}) as load:
            wait_for(lambda: min(load.ok.values()) > 5, what="both models answering")
            config.write_text(
                config_text(
                    ("mnist", mnist_base),
                    ("digits8", digits8_model_dir),
                    ("typo", tmp_path / "no-such-dir"),
                )
            )
            wait_for(
                lambda: listing(channel).get("typo", convserve_pb2.ModelStatus()).error,
                what="the typo model's error",
            )
            # Probes: the process is alive, and ready while it serves models it could load.
            assert health(channel, "liveness") == "SERVING"
            assert health(channel, "readiness") == "SERVING"
            assert health(channel, "") == "SERVING"
            assert health(channel, "typo") == "NOT_SERVING"
            assert health(channel, "mnist") == "SERVING"
            before = dict(load.ok)
            wait_for(
                lambda: all(load.ok[m] > before[m] + 20 for m in before),
                what="both models answering after the edit",
            )
        assert load.failed == {"mnist": [], "digits8": []}, load.failed
        # The error, as `convserve models --json` shows it and /metrics reports it.
        shown = subprocess.run(
            [sys.executable, "-c", CLI, "--target", server.target, "--json", "models"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        models = {m["name"]: m for m in json.loads(shown.stdout)["models"]}
        assert models["typo"]["ready"] is False
        assert models["typo"]["error"] == "the base path does not exist"
        assert models["mnist"]["ready"] is True
        assert models["mnist"]["error"] == ""
        assert models["mnist"]["memory_bytes"] > 0
        samples = scrape(server.metrics_port)
        assert sample_value(samples, "convserve_model_ready", model="typo") == 0
        assert sample_value(samples, "convserve_model_ready", model="mnist") == 1
        assert sample_value(samples, "convserve_model_ready", model="digits8") == 1
        assert sample_value(samples, "convserve_model_memory_bytes", model="mnist") > 0
        # The missing directory appears: the background retry loads it.
        shutil.copytree(digits8_model_dir, tmp_path / "no-such-dir")
        wait_for(lambda: health(channel, "typo") == "SERVING", what="typo loaded", timeout_s=120)
    assert any("typo: the base path does not exist" in line for line in server.lines)
    code, _ = stop(server)
    assert code == 0


def test_strict_readiness_and_exit_on_load_error_keep_the_old_behaviour(
    tmp_path: Path, mnist_base: Path, processes: list[ServerProcess]
) -> None:
    config = tmp_path / "models.config"
    config.write_text(config_text(("mnist", mnist_base), ("typo", tmp_path / "no-such-dir")))
    # Default: start-up serves the model that loads.
    server = start_server_process(server_args(config, "--strict-readiness", "true"))
    processes.append(server)
    with grpc.insecure_channel(server.target) as channel:
        wait_for(lambda: health(channel, "mnist") == "SERVING", what="mnist", timeout_s=120)
        # Strict: not ready while a configured model is not, yet alive and serving mnist.
        assert health(channel, "readiness") == "NOT_SERVING"
        assert health(channel, "liveness") == "SERVING"
        images = Images.of(np.zeros((1, 28, 28, 1), np.uint8), model="mnist")
        assert convserve_predict(channel, images) == grpc.StatusCode.OK
    assert stop(server)[0] == 0
    failed = subprocess.run(
        [sys.executable, "-m", "convserve.server",
         *server_args(config, "--exit-on-load-error", "true")],
        capture_output=True, text=True, timeout=240,
        env=server_env(),
    )  # fmt: skip
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "no loadable version of model 'typo'" in failed.stderr
    assert "the base path does not exist" in failed.stderr


def test_an_empty_or_rewritten_config_file_unloads_nothing(
    tmp_path: Path, mnist_base: Path, processes: list[ServerProcess]
) -> None:
    config = tmp_path / "models.config"
    text = config_text(("mnist", mnist_base))
    config.write_text(text)
    server = start_server_process(server_args(config))
    processes.append(server)
    with grpc.insecure_channel(server.target) as channel:
        wait_for(lambda: health(channel, "") == "SERVING", what="ready", timeout_s=120)
        with Load(server.target, {"mnist": (28, 28, 1)}) as load:
            wait_for(lambda: load.ok["mnist"] > 5, what="answers")
            # Truncated, then written again a second later (five polls read it empty).
            config.write_text("")
            time.sleep(1.0)
            config.write_text(text)
            # The same content rewritten in place, over and over.
            for _ in range(40):
                with config.open("w") as file:
                    file.write(text[: len(text) // 2])
                    file.flush()
                    time.sleep(0.01)
                    file.write(text[len(text) // 2 :])
                time.sleep(0.03)
            before = load.ok["mnist"]
            wait_for(lambda: load.ok["mnist"] > before + 20, what="answers after the edits")
        assert load.failed == {"mnist": []}
        samples = scrape(server.metrics_port)
        loads = sample_value(samples, "convserve_model_loads_total", model="mnist")
        assert loads == 1  # never unloaded and loaded again
    assert any("lists no models; not applied" in line for line in server.lines)
    assert stop(server)[0] == 0


def test_a_version_whose_assets_arrive_last_serves_its_class_names(
    mnist_base: Path, mnist_server: tuple[ServerProcess, Path]
) -> None:
    server, _ = mnist_server
    source = mnist_base / "1"
    with grpc.insecure_channel(server.target) as channel:
        wait_for(lambda: serving_version(channel, "mnist") == 1, what="v1", timeout_s=120)
        # A copy that writes assets.extra/ a moment after everything else.
        shutil.copytree(source, mnist_base / "2", ignore=shutil.ignore_patterns("assets.extra"))
        time.sleep(0.4)
        shutil.copytree(source / "assets.extra", mnist_base / "2" / "assets.extra")
        wait_for(lambda: serving_version(channel, "mnist") == 2, what="v2", timeout_s=120)
        assert list(metadata(channel, "mnist").class_names) == DIGIT_NAMES
        # Assets that come long after the version loaded are picked up too.
        shutil.copytree(source, mnist_base / "3", ignore=shutil.ignore_patterns("assets.extra"))
        wait_for(lambda: serving_version(channel, "mnist") == 3, what="v3", timeout_s=120)
        assert list(metadata(channel, "mnist").class_names) == []
        shutil.copytree(source / "assets.extra", mnist_base / "3" / "assets.extra")
        wait_for(
            lambda: list(metadata(channel, "mnist").class_names) == DIGIT_NAMES,
            what="v3's class names",
        )
        assert metadata(channel, "mnist").training.dataset
    assert stop(server)[0] == 0


def test_class_names_no_protocol_can_send_refuse_the_version(
    tmp_path: Path, mnist_base: Path, mnist_server: tuple[ServerProcess, Path]
) -> None:
    server, _ = mnist_server
    bad = mnist_base / "2"
    shutil.copytree(mnist_base / "1", tmp_path / "staging")
    record_path = tmp_path / "staging" / "assets.extra" / "training_record.json"
    record = json.loads(record_path.read_text())
    record["class_names"][3] = "PLACEHOLDER"
    # JSON spells a lone surrogate, which no UTF-8 encoder (gRPC, protobuf) can send.
    record_path.write_text(json.dumps(record).replace("PLACEHOLDER", "\\ud800"))
    with grpc.insecure_channel(server.target) as channel:
        wait_for(lambda: serving_version(channel, "mnist") == 1, what="v1", timeout_s=120)
        (tmp_path / "staging").rename(bad)
        wait_for(
            lambda: any(v.state == "END" for v in listing(channel)["mnist"].versions),
            what="v2 refused",
            timeout_s=120,
        )
        (refused,) = [v for v in listing(channel)["mnist"].versions if v.version == 2]
        assert "class_names[3]: not valid Unicode text" in refused.error
        # Version 1 serves on, with its metadata and labels, whatever class wins.
        assert serving_version(channel, "mnist") == 1
        rng = np.random.default_rng(3)
        images = Images.of(rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8), model="mnist")
        assert convserve_predict(channel, images) == grpc.StatusCode.OK
        assert list(metadata(channel, "mnist").class_names) == DIGIT_NAMES
        assert health(channel, "readiness") == "SERVING"
    assert stop(server)[0] == 0


def _large_input_model(path: Path, side: int) -> None:
    """A SavedModel taking [N,side,side,3] images: one convolution, pooled, softmax."""
    import tensorflow as tf

    class Large(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = tf.Variable(tf.random.normal([3, 3, 3, 4], seed=1))
            self.dense = tf.Variable(tf.random.normal([4, 10], seed=2))

        @tf.function(input_signature=[tf.TensorSpec([None, side, side, 3], tf.float32)])
        def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
            features = tf.nn.conv2d(images, self.kernel, 1, "VALID")
            pooled = tf.reduce_mean(features, axis=[1, 2])
            return {"probabilities": tf.nn.softmax(pooled @ self.dense)}

    module = Large()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def test_a_model_whose_input_exceeds_the_memory_budget_is_refused(
    tmp_path: Path, mnist_base: Path, processes: list[ServerProcess]
) -> None:
    _large_input_model(tmp_path / "large" / "1", 2048)
    config = tmp_path / "models.config"
    config.write_text(config_text(("mnist", mnist_base), ("large", tmp_path / "large")))
    budget = 64 << 20
    server = start_server_process(
        server_args(config, "--max-model-memory-bytes", str(budget)), timeout_s=240
    )
    processes.append(server)
    with grpc.insecure_channel(server.target) as channel:
        wait_for(lambda: health(channel, "") == "SERVING", what="ready", timeout_s=120)
        large = listing(channel)["large"]
        assert not large.ready
        (refused,) = large.versions
        assert refused.state == "END"
        assert "input 2048x2048x3 needs" in refused.error
        assert f"over the memory budget of {budget:,} bytes" in refused.error
        mnist = listing(channel)["mnist"]
        assert 0 < mnist.memory_bytes <= budget
        images = Images.of(np.zeros((1, 28, 28, 1), np.uint8), model="mnist")
        assert convserve_predict(channel, images) == grpc.StatusCode.OK
    assert stop(server)[0] == 0


def test_sigterm_ends_the_server_while_a_config_read_is_blocked(
    mnist_server: tuple[ServerProcess, Path],
) -> None:
    server, config = mnist_server
    with grpc.insecure_channel(server.target) as channel:
        wait_for(lambda: health(channel, "") == "SERVING", what="ready", timeout_s=120)
    # The file becomes a FIFO nobody writes: the next read blocks for good.
    config.unlink()
    os.mkfifo(config)
    time.sleep(1.0)  # five polls: a read is blocked by now
    code, took = stop(server)
    assert code == 0, "".join(server.lines[-30:])
    assert took < STOP_BOUND_S, took
    assert any("convserve-server stopped" in line for line in server.lines)


@pytest.mark.parametrize("after_s", [0.3, 1.5])
def test_sigterm_during_start_up_exits_0(after_s: float, tmp_path: Path, mnist_base: Path) -> None:
    config = tmp_path / "models.config"
    config.write_text(config_text(("mnist", mnist_base)))
    process = subprocess.Popen(
        [sys.executable, "-m", "convserve.server", *server_args(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=server_env(),
    )
    try:
        time.sleep(after_s)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr[-2000:]
