"""yamllint over every YAML file in deploy/, with deploy/.yamllint."""

from __future__ import annotations

from tests.conftest import REPO_ROOT
from tests.deploy.common import DEPLOY, run

YAMLLINT = str(REPO_ROOT / ".venv" / "bin" / "yamllint")
CONFIG = DEPLOY / ".yamllint"


def _yaml_files() -> list[str]:
    return sorted(str(p) for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def test_every_yaml_file_passes_yamllint() -> None:
    files = _yaml_files()
    # The tree really is covered: Compose, Prometheus, Grafana and Kubernetes files.
    for part in ("compose.yaml", "prometheus.yml", "alerts.yml", "kustomization.yaml"):
        assert any(f.endswith(part) for f in files), part
    assert len(files) >= 20
    run([YAMLLINT, "--strict", "-c", str(CONFIG), "-f", "parsable", *files])


def test_yamllint_config_catches_real_problems(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nenabled: yes\nlist: [ 1 ]\n" + "x: " + "y" * 120 + "\n")
    try:
        run([YAMLLINT, "--strict", "-c", str(CONFIG), "-f", "parsable", str(bad)])
    except AssertionError as failure:
        report = str(failure)
    else:
        raise AssertionError("yamllint accepted a file with duplicate keys and bare yes")
    for rule in ("key-duplicates", "truthy", "brackets", "line-length"):
        assert f"({rule})" in report, rule
