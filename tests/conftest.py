"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# TensorFlow's C++ start-up chatter drowns test output; warnings still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Test servers listen on ports of their own (port 0), never on the fixed default REST
# port 8501: the HTTP server is off unless a test asks for it (rest_port=-1, any port).
os.environ.setdefault("CONVSERVE_REST_PORT", "0")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model base path holding version 1, trained briefly on the sample digits.

    Accurate enough for "the right digit comes back" checks, small enough to
    train in well under a minute on two cores. Also writes `samples.npz`
    (held-out digits and labels) beside the base path.
    """
    from convserve.trainer.__main__ import main

    root = tmp_path_factory.mktemp("model")
    base = root / "mnist"
    code = main(
        [
            "--dataset", "sample",
            "--limit-train", "2000",
            "--epochs", "2",
            "--seed", "0",
            "--quiet",
            "--model-base-path", str(base),
            "--save-samples", str(root / "samples.npz"),
        ]
    )  # fmt: skip
    assert code == 0, "training the shared test model failed"
    assert (base / "1" / "saved_model.pb").is_file()
    return base


@pytest.fixture(scope="session")
def model_base_path(trained_model_dir: Path) -> Path:
    """The base path of the shared trained model (version 1). Do not write into it."""
    return trained_model_dir


@pytest.fixture(scope="session")
def sample_digits(trained_model_dir: Path) -> tuple:
    """Held-out digits (uint8 [k,28,28]) and their labels, saved by the trainer."""
    import numpy as np

    with np.load(trained_model_dir.parent / "samples.npz") as data:
        return data["images"], data["labels"]


def _train(base: Path, *args: str) -> Path:
    from convserve.trainer.__main__ import main

    code = main([*args, "--seed", "0", "--quiet", "--model-base-path", str(base),
                 "--save-samples", str(base.parent / "samples.npz")])  # fmt: skip
    assert code == 0, f"training {base.name} failed"
    assert (base / "1" / "saved_model.pb").is_file()
    return base


@pytest.fixture(scope="session")
def fashion_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Fashion-MNIST model (28x28x1, ten named classes), trained briefly on 3,000 of
    the Debian package's images; `samples.npz` beside it."""
    from convserve.trainer.data import FASHION_MNIST_DIR

    require_installed(FASHION_MNIST_DIR.is_dir(), "dataset-fashion-mnist")
    base = tmp_path_factory.mktemp("fashion") / "fashion"
    return _train(base, "--dataset", "fashion-mnist", "--model-name", "fashion",
                  "--limit-train", "3000", "--epochs", "1")  # fmt: skip


@pytest.fixture(scope="session")
def digits8_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8x8x1 digits model (scikit-learn's bundled digits); `samples.npz` beside it."""
    base = tmp_path_factory.mktemp("digits8") / "digits8"
    return _train(base, "--dataset", "digits8", "--model-name", "digits8", "--epochs", "4")


def samples_of(model_dir: Path) -> tuple:
    """(images uint8 [k,H,W], labels) the trainer saved beside a model's base path."""
    import numpy as np

    with np.load(model_dir.parent / "samples.npz") as data:
        return data["images"], data["labels"]


def require_installed(present: bool, what: str) -> None:
    """Skip the test when `what` (a tool or data set .ci/run installs) is absent.

    In CI (CI=true), where .ci/run installs all of them, fail instead, so a
    broken install step cannot hide behind a skip.
    """
    if present:
        return
    message = f"{what} is not installed (.ci/run installs it)"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """The path of an external program a test drives, e.g. ``promtool`` (see
    `require_installed`)."""
    import shutil

    path = shutil.which(name)
    require_installed(path is not None, name)
    assert path is not None
    return path
