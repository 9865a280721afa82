"""Paths and small functions shared by the deploy tests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "convserve.json"
K8S = DEPLOY / "k8s"
# Everything `kubectl apply -k` is meant to be run on.
KUSTOMIZATIONS = {
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "bench": K8S / "bench",
}
# A current Kubernetes release that kubernetes-validate ships schemas for.
KUBERNETES_VERSION = "1.37.0"

GRPC_PORT = 8500
REST_PORT = 8501
METRICS_PORT = 8502


def run(args: list[str], *, input_text: str | None = None, timeout_s: float = 120) -> str:
    """Run a program; fail the test with its output when it exits non-zero."""
    done = subprocess.run(
        args,
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=REPO_ROOT,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {done.returncode}\n"
            f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
    return done.stdout


def constraint_version(package: str) -> str:
    """The version .ci/constraints.txt pins `package` to."""
    wanted = re.sub(r"[-_.]+", "-", package.lower())
    for line in (REPO_ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and re.sub(r"[-_.]+", "-", name.lower()) == wanted:
            return version
    raise AssertionError(f"{package} is not pinned in .ci/constraints.txt")


def load_yaml_documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions as (KEYWORD, arguments), line continuations joined.

    The pseudo-stage "" holds the instructions before the first FROM (global ARGs).
    """
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, arguments = line.partition(" ")
        keyword = keyword.upper()
        arguments = " ".join(arguments.split())
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?: AS (\S+))?", arguments, flags=re.IGNORECASE)
            assert match is not None, f"cannot read FROM {arguments!r}"
            current = match.group(2) or f"stage{len(stages)}"
            stages[current] = [("FROM", match.group(1))]
        else:
            stages[current].append((keyword, arguments))
    return stages


def stage_chain(stages: dict[str, list[tuple[str, str]]], name: str) -> list[str]:
    """`name` and every stage it is built FROM, nearest first."""
    chain = [name]
    while True:
        parent = stages[chain[-1]][0][1]
        if parent not in stages:
            return chain
        chain.append(parent)
