"""End to end through Docker: build the images, run the Compose stack, predict, stop it.

Needs a Docker engine with the Compose v2 plugin; `.ci/run` installs and starts
one, and in CI (CI=true) a missing engine fails the test instead of skipping
it. Docker Hub cannot be reached here, so the images are built on the Debian
bookworm base that `deploy/docker/local-base.sh` makes with debootstrap
(equivalent to, not the same as, python:3.11-slim-bookworm), and Prometheus
runs from `deploy/docker/prometheus.Dockerfile` (Debian's package on that base)
through PROMETHEUS_IMAGE. Grafana has no Debian package: its part is skipped
unless GRAFANA_IMAGE names an image the engine already has; the offline checks
of the dashboard (test_dashboard) and a live Prometheus (test_prometheus) cover
it otherwise.

Set CONVSERVE_E2E_BASE_IMAGE to build on another base (e.g. a pullable
python:3.11-slim-bookworm).
"""

from __future__ import annotations

import io
import os
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
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT, require_installed
from tests.deploy.common import COMPOSE, DEPLOY, DOCKERFILE
from tests.polling import wait_for

BUILD_TIMEOUT_S = 1800
STACK_TIMEOUT_S = 900

# The suite's 300 s per test does not cover building the images on a machine that has
# none cached yet (the module's first test sets them up): the builds have their own bounds.
pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.timeout(BUILD_TIMEOUT_S + STACK_TIMEOUT_S + 600),
]
# The server's grace period in the stack (CONVSERVE_GRACE_PERIOD_S) and the time
# `docker stop` gives it before SIGKILL (the stack's stop_grace_period).
GRACE_PERIOD_S = 10
STOP_TIMEOUT_S = 30
# Images are tagged once and stay cached: a second run only rebuilds what changed.
TAG = "e2e"
PROJECT = "convserve-e2e"
PROMETHEUS_IMAGE = f"convserve-prometheus:{TAG}"


@pytest.fixture(scope="module")
def docker_client() -> Any:
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as error:  # docker raises DockerException, requests errors, ...
        require_installed(False, f"a Docker engine ({type(error).__name__}: {error})")
    compose = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    if compose.returncode != 0:
        pytest.fail(f"a Docker engine answers but `docker compose` does not: {compose.stderr}")
    return client


def _build(
    client: Any, target: str | None, tag: str, base: str, dockerfile: str, path: str
) -> None:
    started = time.monotonic()
    client.images.build(
        path=path,
        dockerfile=dockerfile,
        target=target,
        tag=tag,
        buildargs={"BASE_IMAGE": base},
        rm=True,
        timeout=BUILD_TIMEOUT_S,
    )
    print(f"built {tag} in {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="module")
def images(docker_client: Any) -> dict[str, str]:
    base = os.environ.get("CONVSERVE_E2E_BASE_IMAGE")
    if not base:
        started = time.monotonic()
        made = subprocess.run(
            [str(DEPLOY / "docker" / "local-base.sh")],
            capture_output=True,
            text=True,
            check=False,
            timeout=BUILD_TIMEOUT_S,
        )
        assert made.returncode == 0, made.stderr[-3000:]
        base = made.stdout.strip().splitlines()[-1]
        print(f"base image {base} in {time.monotonic() - started:.0f} s")
    built = {}
    for target in ("server", "trainer"):
        built[target] = f"convserve-{target}:{TAG}"
        _build(
            docker_client,
            target,
            built[target],
            base,
            str(DOCKERFILE.relative_to(REPO_ROOT)),
            str(REPO_ROOT),
        )
    _build(docker_client, None, PROMETHEUS_IMAGE, base, "docker/prometheus.Dockerfile", str(DEPLOY))
    return built


def _host_port(client: Any, service: str, port: int) -> int:
    """The host port the engine picked for a service's published port (0 was asked)."""
    (container,) = client.containers.list(
        filters={
            "label": [
                f"com.docker.compose.project={PROJECT}",
                f"com.docker.compose.service={service}",
            ]
        }
    )
    container.reload()
    bindings = container.attrs["NetworkSettings"]["Ports"][f"{port}/tcp"]
    return int(bindings[0]["HostPort"])


def _wait(check: Callable[[], Any], what: str, timeout_s: float) -> Any:
    """`wait_for` at the pace of containers: once a second, a refused connection (nothing
    listening yet) counting as not yet."""
    return wait_for(check, what=what, timeout_s=timeout_s, interval_s=1.0, retry_on=(OSError,))


def _project_leftovers(client: Any) -> dict[str, list[str]]:
    label = f"com.docker.compose.project={PROJECT}"
    return {
        "containers": [c.name for c in client.containers.list(all=True, filters={"label": label})],
        "volumes": [v.name for v in client.volumes.list(filters={"label": label})],
        "networks": [n.name for n in client.networks.list(filters={"label": label})],
    }


@pytest.fixture(scope="module")
def stack(
    docker_client: Any, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    # Host port 0: the engine picks free ones (read back once the stack is up).
    published = ("CONVSERVE_GRPC_HOST_PORT", "CONVSERVE_REST_HOST_PORT",
                 "CONVSERVE_METRICS_HOST_PORT", "PROMETHEUS_HOST_PORT",
                 "GRAFANA_HOST_PORT")  # fmt: skip
    env = {
        **os.environ,
        **dict.fromkeys(published, "0"),
        "CONVSERVE_TAG": TAG,
        "COMPOSE_PROFILES": "cpu",
        "CONVSERVE_GRACE_PERIOD_S": str(GRACE_PERIOD_S),
        "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
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
                            "--dataset", "sample", "--epochs", "3", "--seed", "0", "--quiet",
                        ]
                    }
                }
            }
        )
    )  # fmt: skip
    compose = ["docker", "compose", "-p", PROJECT, "-f", str(COMPOSE), "-f", str(override)]
    # Anything a crashed earlier run left behind goes first.
    subprocess.run([*compose, "down", "-v", "--remove-orphans"], env=env, check=False)
    services = ["server", "prometheus"]
    grafana = env.get("GRAFANA_IMAGE")
    if grafana and _has_image(docker_client, grafana):
        services.append("grafana")
    try:
        subprocess.run(
            [*compose, "up", "-d", "--no-build", *services], env=env, check=True, timeout=600
        )
        ports = {
            "CONVSERVE_GRPC_HOST_PORT": _host_port(docker_client, "server", 8500),
            "CONVSERVE_REST_HOST_PORT": _host_port(docker_client, "server", 8501),
            "CONVSERVE_METRICS_HOST_PORT": _host_port(docker_client, "server", 8502),
            "PROMETHEUS_HOST_PORT": _host_port(docker_client, "prometheus", 9090),
        }
        if "grafana" in services:
            ports["GRAFANA_HOST_PORT"] = _host_port(docker_client, "grafana", 3000)
        yield {"client": docker_client, "ports": ports, "env": env, "services": services}
    finally:
        logs = subprocess.run(
            [*compose, "logs", "--no-color"], env=env, capture_output=True, text=True, check=False
        )
        print(logs.stdout[-5000:])
        subprocess.run([*compose, "down", "-v", "--remove-orphans"], env=env, check=False)
        leftovers = _project_leftovers(docker_client)
        assert leftovers == {"containers": [], "volumes": [], "networks": []}, leftovers


def _has_image(client: Any, name: str) -> bool:
    import docker

    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def _container(stack: dict, service: str) -> Any:
    (container,) = stack["client"].containers.list(
        all=True,
        filters={
            "label": [
                f"com.docker.compose.project={PROJECT}",
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


def _http_json(url: str) -> Any:
    import json

    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def test_the_stack_trains_serves_predicts_is_scraped_and_stops_cleanly(stack: dict) -> None:
    import json

    from convserve.client import ConvServeClient

    started = time.monotonic()
    # The trainer ran once and exited 0; then the server came up healthy (gRPC health).
    _wait(lambda: _server_healthy(stack), "the server's HEALTHCHECK to pass", STACK_TIMEOUT_S)
    print(f"trained and healthy in {time.monotonic() - started:.0f} s")
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
    assert accuracy >= 0.6, f"accuracy {accuracy:.2f} on {len(labels)} held-out digits"

    # The same digits through TF Serving's REST API on the published HTTP port.
    rest = f"http://127.0.0.1:{stack['ports']['CONVSERVE_REST_HOST_PORT']}"
    with urllib.request.urlopen(f"{rest}/v2/health/ready", timeout=5) as ready:
        assert ready.status == 200
    request = urllib.request.Request(
        f"{rest}/v1/models/mnist:predict",
        data=json.dumps({"signature_name": "predict_uint8", "instances": images.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        predictions = np.asarray(json.load(answer)["predictions"])
    assert predictions.shape == (len(labels), 10)
    assert np.argmax(predictions, axis=1).tolist() == np.asarray(result.digits).tolist()

    # The console ships in the image (package data) and prepares images there (pillow).
    with urllib.request.urlopen(f"{rest}/console/console.js", timeout=5) as script:
        assert b"The convserve console" in script.read()
    png = io.BytesIO()
    Image.fromarray(255 - images[0]).save(png, format="PNG")
    request = urllib.request.Request(
        f"{rest}/v1/convserve/prepare_image?model=mnist",
        data=png.getvalue(),
        headers={"Content-Type": "image/png"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.load(answer)["shape"] == [28, 28, 1]

    # The request counter through the server's own endpoint, then through Prometheus,
    # which found the server by its name on the compose network.
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
    query = 'convserve_requests_total{job="convserve",rpc="Predict",code="OK",model="mnist"}'
    scraped = _wait(
        lambda: _http_json(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': query})}")[
            "data"
        ]["result"],
        "Prometheus to scrape the server",
        120,
    )
    assert float(scraped[0]["value"][1]) >= 1

    # SIGTERM (the image's STOPSIGNAL): the server drains and exits 0 within its grace
    # period, long before `docker stop` would resort to SIGKILL.
    stopping = time.monotonic()
    server.stop(timeout=STOP_TIMEOUT_S)
    took = time.monotonic() - stopping
    server.reload()
    print(f"server stopped in {took:.1f} s, exit code {server.attrs['State']['ExitCode']}")
    assert server.attrs["State"]["ExitCode"] == 0, server.logs()[-3000:]
    assert took < GRACE_PERIOD_S + 5


def test_grafana_provisions_the_dashboard(stack: dict) -> None:
    if "grafana" not in stack["services"]:
        pytest.skip(
            "Grafana has no Debian package and grafana/grafana cannot be pulled here "
            "(set GRAFANA_IMAGE to an image the engine has); test_dashboard checks the "
            "dashboard offline and test_prometheus runs its queries on a live Prometheus"
        )
    import base64
    import json

    grafana = f"http://127.0.0.1:{stack['ports']['GRAFANA_HOST_PORT']}"

    def get(path: str) -> Any:
        request = urllib.request.Request(grafana + path)
        token = base64.b64encode(b"admin:admin").decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    _wait(lambda: get("/api/health")["database"] == "ok", "Grafana", 120)
    assert get("/api/dashboards/uid/convserve")["dashboard"]["title"] == "convserve"
    assert get("/api/datasources/uid/prometheus/health")["status"] == "OK"
