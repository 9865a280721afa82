"""The committed wire code must be what `make generate` writes now."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


def test_stale_code_is_detected(tmp_path, monkeypatch) -> None:
    """The check fails when a generated file differs from the generator's output."""
    sys.path.insert(0, str(REPO_ROOT / "proto"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    copy = tmp_path / "convserve" / "v1"
    copy.mkdir(parents=True)
    for source in generate.PACKAGE_DIR.iterdir():
        if source.is_file():
            (copy / source.name).write_bytes(source.read_bytes())
    monkeypatch.setattr(generate, "PACKAGE_DIR", copy)
    monkeypatch.setattr(generate, "PROTO_ROOT", tmp_path)
    assert generate.stale_files() == []
    stale = copy / "tensor_pb2.py"
    stale.write_text(stale.read_text() + "\n# edited by hand\n")
    assert generate.stale_files() == ["tensor_pb2.py"]


def test_protobuf_floor_matches_generator() -> None:
    """pyproject's protobuf floor is the runtime version the generated code demands."""
    import re
    import tomllib

    gencode = (REPO_ROOT / "proto" / "convserve" / "v1" / "tensor_pb2.py").read_text()
    version = re.search(r"# Protobuf Python Version: (\d+\.\d+\.\d+)", gencode)
    assert version is not None
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    protobuf = next(d for d in deps if d.startswith("protobuf"))
    assert f">={version.group(1)}" in protobuf, (protobuf, version.group(1))
