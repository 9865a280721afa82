"""The client stays thin: no TensorFlow, no server code, no optional extras at import time."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT

CHECK = """
import sys
import convserve.client
import convserve.client.cli
import convserve.client.bench
forbidden = [m for m in ("tensorflow", "keras", "convserve.server", "convserve.trainer", "PIL",
                         "tritonclient", "aiohttp", "orjson") if m in sys.modules]
print(",".join(forbidden))
"""


def test_client_imports_nothing_heavy() -> None:
    roots = [str(REPO_ROOT / d) for d in ("client", "proto")]
    result = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": ":".join(roots), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_command_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "convserve.client", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert "exit codes:" in result.stdout
