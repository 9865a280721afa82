"""Shared pieces of the server wire tests: stand-in metrics, settings, servers, polling.

The stand-in runtime is `tests.fake_runtime.FakeRuntime`. Tests of the whole
server use the real runtime with the shared trained model instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

LISTENING = re.compile(r"convserve-server listening on (\S+):(\d+) metrics on :(\d+)")


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
        # (protocol, rpc, model label, code) of each finished request.
        self.labelled: list[tuple[str, str, str, str]] = []

    def request_started(self, protocol: str, rpc: str, model: str = "") -> None:
        self.started.append((protocol, rpc))

    def request_finished(
        self, protocol: str, rpc: str, code: str, seconds: float, model: str = ""
    ) -> None:
        assert seconds >= 0
        self.finished.append((protocol, rpc, code))
        self.labelled.append((protocol, rpc, model, code))
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


def server_env() -> dict[str, str]:
    """The environment of a server subprocess: this one's without convserve's settings,
    but with the HTTP server off (as tests/conftest.py sets it): its fixed default port
    8501 may be taken by another server on the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    env["CONVSERVE_REST_PORT"] = "0"
    return env


def start_server_process(
    args: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 240.0
) -> ServerProcess:
    """Start the server as a child process and wait for its listening line.

    stderr is read on a thread into `lines` (kept for the test's assertions).
    """
    import threading

    full_env = server_env()
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
