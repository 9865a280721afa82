"""End to end through Docker: build the images, run the Compose stack, predict, read a metric.

Needs a Docker engine with the Compose v2 plugin; without an engine the test is
skipped with that reason. Everything it checks is also covered by tests that
run without Docker: the images' Dockerfile (test_images), the Compose file
(test_compose), Prometheus with deploy/'s config against a live server
(test_prometheus) and the dashboard (test_dashboard).
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import socket
import subprocess
import tarfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT
from tests.deploy.common import COMPOSE, DOCKERFILE

pytestmark = [pytest.mark.docker, pytest.mark.slow]

BUILD_TIMEOUT_S = 1800
STACK_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def docker_client() -> Any:
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as error:  # docker raises DockerException, requests errors, ...
        pytest.skip(f"no Docker engine answers here ({type(error).__name__}: {error})")
    compose = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    if compose.returncode != 0:
        pytest.fail(f"a Docker engine answers but `docker compose` does not: {compose.stderr}")
    return client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(check: Callable[[], Any], what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as error:  # nothing listening yet
            last = error
        else:
            if last:
                return last
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def _http_json(url: str, auth: tuple[str, str] | None = None) -> Any:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def stack(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tag = f"e2e-{secrets.token_hex(4)}"
    project = f"convserve-{tag}"
    for target in ("server", "trainer"):
        docker_client.images.build(
            path=str(REPO_ROOT),
            dockerfile=str(DOCKERFILE.relative_to(REPO_ROOT)),
            target=target,
            tag=f"convserve-{target}:{tag}",
            rm=True,
            timeout=BUILD_TIMEOUT_S,
        )
    ports = {
        "CONVSERVE_GRPC_HOST_PORT": _free_port(),
        "CONVSERVE_METRICS_HOST_PORT": _free_port(),
        "PROMETHEUS_HOST_PORT": _free_port(),
        "GRAFANA_HOST_PORT": _free_port(),
    }
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "CONVSERVE_TAG": tag,
        "COMPOSE_PROFILES": "cpu",
    }
    # The one change to the stack: train on the bundled sample digits (no download).
    override = tmp_path_factory.mktemp("compose") / "override.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "trainer": {
                        "command": [
                            "--model-base-path", "/models/mnist",
                            "--save-samples", "/models/samples.npz",
                            "--dataset", "sample", "--seed", "0", "--quiet",
                        ]
                    }
                }
            }
        )
    )  # fmt: skip
    compose = ["docker", "compose", "-p", project, "-f", str(COMPOSE), "-f", str(override)]
    subprocess.run([*compose, "up", "-d", "--no-build"], env=env, check=True, timeout=600)
    try:
        yield {"client": docker_client, "project": project, "ports": ports, "env": env}
    finally:
        logs = subprocess.run(
            [*compose, "logs", "--no-color"], env=env, capture_output=True, text=True, check=False
        )
        print(logs.stdout[-5000:])
        subprocess.run([*compose, "down", "-v", "--remove-orphans"], env=env, check=False)
        for target in ("server", "trainer"):
            docker_client.images.remove(f"convserve-{target}:{tag}", force=True)


def _container(stack: dict, service: str) -> Any:
    (container,) = stack["client"].containers.list(
        all=True,
        filters={
            "label": [
                f"com.docker.compose.project={stack['project']}",
                f"com.docker.compose.service={service}",
            ]
        },
    )
    return container


def _server_healthy(stack: dict) -> bool:
    server = _container(stack, "server")
    server.reload()
    assert server.status != "exited", server.logs()[-3000:]
    return server.attrs["State"].get("Health", {}).get("Status") == "healthy"


def test_compose_stack_trains_serves_predicts_and_exports_metrics(stack: dict) -> None:
    from convserve.client import ConvServeClient

    # The trainer ran once and exited 0; then the server came up healthy (gRPC health).
    _wait(lambda: _server_healthy(stack), "the server's HEALTHCHECK to pass", STACK_TIMEOUT_S)
    trainer = _container(stack, "trainer")
    trainer.reload()
    assert trainer.attrs["State"]["ExitCode"] == 0
    server = _container(stack, "server")
    assert server.attrs["Config"]["User"] == "10001:10001"

    # Real held-out digits, as the trainer saved them into the volume.
    archive, _ = trainer.get_archive("/models/samples.npz")
    with tarfile.open(fileobj=io.BytesIO(b"".join(archive))) as tar:
        member = tar.extractfile("samples.npz")
        assert member is not None
        with np.load(io.BytesIO(member.read())) as samples:
            images, labels = samples["images"], samples["labels"]

    grpc_port = stack["ports"]["CONVSERVE_GRPC_HOST_PORT"]
    with ConvServeClient(f"127.0.0.1:{grpc_port}") as client:
        result = client.predict(images)
    accuracy = float(np.mean(np.asarray(result.digits) == labels))
    assert accuracy >= 0.6, f"accuracy {accuracy:.2f} on held-out digits"

    # The metric through the server's own endpoint, then through Prometheus.
    metrics_port = stack["ports"]["CONVSERVE_METRICS_HOST_PORT"]
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    predicted = {"protocol": "convserve", "rpc": "Predict", "model": "mnist", "code": "OK"}
    counted = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "convserve_requests_total" and sample.labels == predicted
    ]
    assert len(counted) == 1, counted
    assert counted[0] >= 1

    prometheus = f"http://127.0.0.1:{stack['ports']['PROMETHEUS_HOST_PORT']}"
    query = 'convserve_requests_total{job="convserve",rpc="Predict",code="OK"}'
    result_series = _wait(
        lambda: _http_json(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': query})}")[
            "data"
        ]["result"],
        "Prometheus to scrape the server",
        120,
    )
    assert float(result_series[0]["value"][1]) >= 1

    # Grafana provisioned the data source and the dashboard.
    grafana = f"http://127.0.0.1:{stack['ports']['GRAFANA_HOST_PORT']}"
    auth = ("admin", "admin")
    _wait(lambda: _http_json(f"{grafana}/api/health")["database"] == "ok", "Grafana", 120)
    dashboard = _http_json(f"{grafana}/api/dashboards/uid/convserve", auth)["dashboard"]
    assert dashboard["title"] == "convserve"
    datasource = _http_json(f"{grafana}/api/datasources/uid/prometheus/health", auth)
    assert datasource["status"] == "OK", datasource
