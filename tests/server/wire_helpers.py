"""Shared pieces of the wire tests: settings, servers in child processes, scrapes.

The stand-ins are `tests.fake_runtime.FakeRuntime` and
`tests.fake_metrics.FakeMetrics`. Tests of the whole server use the real
runtime with the shared trained model instead. Every server here, convserve's
and Prometheus, binds port 0 and reports the port it got.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.polling import wait_for

LISTENING = re.compile(r"convserve-server listening on (\S+):(\d+) metrics on :(\d+)")
# What Prometheus logs once its web server has bound, e.g. address=127.0.0.1:40731.
PROMETHEUS_LISTENING = re.compile(r'msg="Listening on" address=(\S+)')


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


@dataclass
class PrometheusProcess:
    """A Prometheus child process, the address its web server bound and its log file."""

    process: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def api(self, endpoint: str, **params: str) -> Any:
        """GET /api/v1/`endpoint`?`params`; the reply's `data` (its status must be success)."""
        assert self.process.poll() is None, f"prometheus exited with {self.process.returncode}"
        query = urllib.parse.urlencode(params)
        url = f"http://{self.address}/api/v1/{endpoint}" + (f"?{query}" if query else "")
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]


@contextmanager
def prometheus_process(
    prometheus: str, config: Path, directory: Path
) -> Iterator[PrometheusProcess]:
    """Run the `prometheus` binary on `config`, its data and log in `directory`; stop it after.

    Its web server listens on 127.0.0.1:0 and the bound address is read back
    from its log. A failed assertion in the block gets the log's tail appended.
    """
    log_path = directory / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                "--web.listen-address=127.0.0.1:0",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def listening() -> str | None:
        assert process.poll() is None, f"prometheus exited with {process.returncode}"
        match = PROMETHEUS_LISTENING.search(log_path.read_text())
        return match.group(1) if match else None

    try:
        address = wait_for(listening, what="prometheus to report its address")
        yield PrometheusProcess(process, address, log_path)
    except AssertionError as failure:
        raise AssertionError(
            f"{failure}\nprometheus log:\n{log_path.read_text()[-3000:]}"
        ) from failure
    finally:
        process.terminate()
        process.wait(30)
