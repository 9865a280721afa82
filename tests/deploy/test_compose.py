"""The Compose stack, checked without a Docker engine (test_docker_e2e runs it)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from convserve.server.settings import Settings
from tests.conftest import REPO_ROOT
from tests.deploy.common import (
    COMPOSE,
    DASHBOARD,
    DEPLOY,
    DOCKERFILE,
    GRPC_PORT,
    METRICS_PORT,
    REST_PORT,
    constraint_version,
    dockerfile_stages,
)

SETTINGS_ENV = {f"CONVSERVE_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # safe_load resolves the x-* anchors and `<<` merges, as Compose does.
    return yaml.safe_load(COMPOSE.read_text())


def _duration_s(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(
        float(number) * units[unit]
        for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    )


def _default(value: str) -> str:
    """The default of a Compose interpolation "${NAME:-default}" (or the plain value)."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", str(value))
    return match.group(1) if match else str(value)


def test_plain_up_starts_the_cpu_stack_and_the_gpu_profile_the_gpu_one(compose) -> None:
    env = dict(
        line.split("=", 1)
        for line in (DEPLOY / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env["COMPOSE_PROFILES"] == "cpu"
    profiles = {name: service.get("profiles", []) for name, service in compose["services"].items()}
    assert profiles["trainer"] == profiles["server"] == ["cpu"]
    assert profiles["trainer-gpu"] == profiles["server-gpu"] == ["gpu"]
    assert profiles["prometheus"] == profiles["grafana"] == []


@pytest.mark.parametrize(
    ("trainer", "server"), [("trainer", "server"), ("trainer-gpu", "server-gpu")]
)
def test_trainer_is_a_one_shot_job_the_server_waits_for(compose, trainer, server) -> None:
    services = compose["services"]
    assert services[trainer]["restart"] == "no"
    assert services[trainer]["build"]["target"] == "trainer"
    assert services[server]["build"]["target"] == "server"
    assert services[server]["depends_on"] == {
        trainer: {"condition": "service_completed_successfully"}
    }
    assert "models:/models" in services[trainer]["volumes"]
    assert "models:/models:ro" in services[server]["volumes"]
    assert "models" in compose["volumes"]
    model_path = services[server]["environment"]["CONVSERVE_MODEL_BASE_PATH"]
    args = services[trainer]["command"]
    assert args[args.index("--model-base-path") + 1] == model_path


def test_builds_use_the_dockerfile_and_its_targets(compose) -> None:
    stages = dockerfile_stages()
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        build = service["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == REPO_ROOT, name
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in stages, name


def test_gpu_services_reserve_an_nvidia_gpu_on_tensorflows_gpu_image(compose) -> None:
    gpu_image = f"tensorflow/tensorflow:{constraint_version('tensorflow')}-gpu"
    for name in ("trainer-gpu", "server-gpu"):
        service = compose["services"][name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert service["build"]["args"]["BASE_IMAGE"] == gpu_image
    server_gpu = compose["services"]["server-gpu"]
    assert server_gpu["environment"]["CONVSERVE_DEVICE"].startswith("gpu")
    # Prometheus and the bench job reach either variant as "server".
    assert "server" in server_gpu["networks"]["default"]["aliases"]


def test_server_environment_names_real_settings_and_stops_after_the_drain(compose) -> None:
    for name in ("server", "server-gpu"):
        service = compose["services"][name]
        unknown = set(service["environment"]) - SETTINGS_ENV
        assert not unknown, f"{name} sets variables the server does not read: {unknown}"
        grace_s = float(_default(service["environment"]["CONVSERVE_GRACE_PERIOD_S"]))
        assert _duration_s(service["stop_grace_period"]) > grace_s
        ports = [
            f"{_default(host)}:{container}"
            for host, _, container in (port.rpartition(":") for port in service["ports"])
        ]
        assert ports == [
            f"{GRPC_PORT}:{GRPC_PORT}",
            f"{REST_PORT}:{REST_PORT}",
            f"{METRICS_PORT}:{METRICS_PORT}",
        ]
        # The server in the container listens on the published container ports.
        for field, port in (
            ("port", GRPC_PORT),
            ("rest_port", REST_PORT),
            ("metrics_port", METRICS_PORT),
        ):
            default = Settings.model_fields[field].default
            listens = _default(service["environment"].get(f"CONVSERVE_{field.upper()}", default))
            assert int(listens) == port, f"{name}: {field} {listens}"


def test_third_party_images_are_pinned(compose) -> None:
    for name, service in compose["services"].items():
        # A replaceable image (PROMETHEUS_IMAGE, ...) is pinned by its default.
        image = _default(service["image"])
        if image.startswith("convserve-"):
            continue
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image} has no repository"
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned"


def test_images_that_cannot_be_built_here_are_replaceable(compose) -> None:
    services = compose["services"]
    assert services["prometheus"]["image"] == "${PROMETHEUS_IMAGE:-prom/prometheus:v3.5.0}"
    assert services["grafana"]["image"] == "${GRAFANA_IMAGE:-grafana/grafana:12.1.0}"


def test_prometheus_and_grafana_get_deploys_own_files(compose) -> None:
    services = compose["services"]
    prometheus_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert prometheus_mounts["./prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert (DEPLOY / "prometheus" / "prometheus.yml").is_file()

    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    mounted = {
        target: DEPLOY / source for source, target in grafana_mounts.items() if "/" in source
    }
    assert "/etc/grafana/provisioning" in mounted
    providers = yaml.safe_load(
        (mounted["/etc/grafana/provisioning"] / "dashboards" / "convserve.yaml").read_text()
    )["providers"]
    (provider,) = providers
    dashboards_in_container = provider["options"]["path"]
    assert (mounted[dashboards_in_container] / DASHBOARD.name).is_file()
    datasources = yaml.safe_load(
        (mounted["/etc/grafana/provisioning"] / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]
    (datasource,) = datasources
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["type"] == "prometheus"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/{DASHBOARD.name}"
