"""convserve-train refuses bad numbers and unwritable destinations before it trains."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import convserve.trainer.data as data_module
import convserve.trainer.export as export_module
import convserve.trainer.train as train_module
from convserve.trainer.__main__ import main
from convserve.trainer.data import load_sample
from convserve.trainer.export import ExportError, export_model
from convserve.trainer.models import build_model
from convserve.trainer.train import TrainResult

TINY = ["--dataset", "sample", "--limit-train", "64", "--epochs", "1", "--quiet"]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if main() gets as far as loading data."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("main() loaded data although its flags were bad")

    monkeypatch.setattr(data_module, "resolve", refuse)


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The last stderr line of main(argv), which must be an argparse usage error."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--learning-rate", "nan", "--learning-rate must be a finite number, got nan"),
        ("--learning-rate", "NaN", "--learning-rate must be a finite number, got nan"),
        ("--learning-rate", "inf", "--learning-rate must be a finite number, got inf"),
        ("--learning-rate", "-inf", "--learning-rate must be a finite number, got -inf"),
        ("--learning-rate", "1e400", "--learning-rate must be a finite number, got inf"),
        ("--learning-rate", "0", "--learning-rate must be positive, got 0.0"),
        ("--learning-rate", "-0.001", "--learning-rate must be positive, got -0.001"),
        ("--learning-rate", "11", "--learning-rate must be at most 10, got 11.0"),
        ("--epochs", "0", "--epochs must be positive, got 0"),
        ("--epochs", "-3", "--epochs must be positive, got -3"),
        ("--epochs", "10001", "--epochs must be at most 10,000, got 10001"),
        ("--batch-size", "0", "--batch-size must be positive, got 0"),
        ("--batch-size", "1000001", "--batch-size must be at most 1,000,000, got 1000001"),
        ("--limit-train", "0", "--limit-train must be positive, got 0"),
        ("--version", "0", "--version must be positive, got 0"),
        ("--version", str(2**63), f"--version must be at most {2**63 - 1:,}, got {2**63}"),
        ("--seed", "-1", "--seed must be >= 0, got -1"),
        ("--seed", str(2**32), f"--seed must be at most {2**32 - 1:,}, got {2**32}"),
        ("--label-smoothing", "1", "--label-smoothing must be at least 0 and below 1, got 1.0"),
        ("--label-smoothing", "-0.1", "--label-smoothing must be at least 0 and below 1, got -0.1"),
        ("--label-smoothing", "nan", "--label-smoothing must be at least 0 and below 1, got nan"),
    ],
)
@pytest.mark.usefixtures("no_training")
def test_numeric_flags_out_of_range_are_usage_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: str, value: str, message: str
) -> None:
    base = tmp_path / "m"
    last = usage_error(capsys, [*TINY, f"{flag}={value}", "--model-base-path", str(base)])
    assert last == f"convserve-train: error: {message}"
    assert not base.exists()


@pytest.mark.usefixtures("no_training")
def test_non_numbers_are_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["--model-base-path", str(tmp_path / "m")]
    last = usage_error(capsys, [*argv, "--epochs", "1.5"])
    assert last == "convserve-train: error: argument --epochs: invalid int value: '1.5'"
    last = usage_error(capsys, [*argv, "--learning-rate", "fast"])
    assert last == "convserve-train: error: argument --learning-rate: invalid float value: 'fast'"


@pytest.mark.parametrize(
    ("flag", "target", "message"),
    [
        # A regular file where a parent directory should be: unwritable even for root.
        ("--save-samples", "file.txt/x.npz", "cannot create {p}: {f} is not a directory"),
        ("--save-samples", "file.txt/deeper/x.npz", "cannot create {p}: {f} is not a directory"),
        ("--save-samples", "adir.npz", "{p} is a directory; expected a writable file path"),
        ("--model-base-path", "file.txt", "{p} is not a directory; expected a writable directory"),
        ("--model-base-path", "file.txt/models", "cannot create {p}: {f} is not a directory"),
    ],
)
@pytest.mark.usefixtures("no_training")
def test_unwritable_destinations_fail_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: str, target: str, message: str
) -> None:
    (tmp_path / "file.txt").write_text("not a directory")
    (tmp_path / "adir.npz").mkdir()
    path = tmp_path / target
    base = path if flag == "--model-base-path" else tmp_path / "m"
    samples = ["--save-samples", str(path)] if flag == "--save-samples" else []
    assert main([*TINY, "--model-base-path", str(base), *samples]) == 2
    out, err = capsys.readouterr()
    expected = message.format(p=path, f=tmp_path / "file.txt")
    assert err == f"convserve-train: error: {flag}: {expected}\n"
    assert out == ""
    assert not (tmp_path / "m").exists()


@pytest.mark.usefixtures("no_training")
def test_save_samples_checks_the_file_numpy_writes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # np.savez appends .npz to a name without it, so that is the file to check.
    (tmp_path / "out.npz").mkdir()
    argv = [*TINY, "--model-base-path", str(tmp_path / "m"), "--save-samples"]
    assert main([*argv, str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'out.npz'} is a directory" in capsys.readouterr().err


@pytest.mark.usefixtures("no_training")
def test_read_only_directories_fail_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_access = os.access

    def access(path: str | os.PathLike[str], mode: int, **kwargs: object) -> bool:
        # Root passes os.access for any mode bits, so the refusal is simulated for it.
        if Path(path) == locked and mode & os.W_OK:
            return False
        return real_access(path, mode)

    monkeypatch.setattr(os, "access", access)
    try:
        argv = [*TINY, "--model-base-path", str(tmp_path / "m")]
        assert main([*argv, "--save-samples", str(locked / "x.npz")]) == 2
        err = capsys.readouterr().err
        expected = f"--save-samples: cannot create {locked / 'x.npz'}: directory {locked} is not"
        assert err == f"convserve-train: error: {expected} writable (permission denied)\n"
        assert main([*TINY, "--model-base-path", str(locked)]) == 2
        err = capsys.readouterr().err
        expected = f"--model-base-path: {locked} is not writable (permission denied); expected"
        assert err == f"convserve-train: error: {expected} a writable directory\n"
    finally:
        locked.chmod(0o755)


@pytest.mark.usefixtures("no_training")
def test_directories_refusing_writes_fail_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.access says yes to root even where writes fail (/sys, read-only mounts)."""
    mounted = tmp_path / "mounted"
    mounted.mkdir()

    real_temporary_file = tempfile.NamedTemporaryFile

    def read_only_inside_mounted(*args: object, **kwargs: Any) -> Any:
        if Path(kwargs["dir"]) == mounted:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_temporary_file(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only_inside_mounted)
    argv = [*TINY, "--model-base-path", str(mounted)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    expected = f"--model-base-path: {mounted} is not writable (read-only file system); expected"
    assert err == f"convserve-train: error: {expected} a writable directory\n"
    samples = mounted / "new" / "x.npz"
    assert main([*TINY, "--model-base-path", str(tmp_path / "m"), "--save-samples", str(samples)])
    err = capsys.readouterr().err
    expected = f"--save-samples: cannot create {samples}: directory {mounted} is not writable"
    assert err == f"convserve-train: error: {expected} (read-only file system)\n"
    assert not (tmp_path / "m").exists()


@pytest.mark.usefixtures("no_training")
def test_existing_version_fails_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "m" / "3").mkdir(parents=True)
    assert main([*TINY, "--model-base-path", str(tmp_path / "m"), "--version", "3"]) == 2
    assert f"{tmp_path / 'm' / '3'} already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--augment", "mirror"],
            "--augment mirror mirrors images, which changes what a digit means; "
            "use none, shift, elastic or affine-elastic for this data set",
        ),
        (
            ["--average-mirrored"],
            "--average-mirrored averages each image's prediction with its mirror image's, "
            "and a mirrored digit means something else; use --no-average-mirrored for this "
            "data set",
        ),
        (
            ["--dataset", "digits8", "--augment", "elastic"],
            "--augment elastic shifts by up to 2 pixels, too far for 8x8 images; use none",
        ),
    ],
)
def test_augmentation_that_changes_labels_is_refused_before_training(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("main() trained with an augmentation that changes labels")

    monkeypatch.setattr(train_module, "train", refuse)
    base = tmp_path / "m"
    assert main([*TINY, *argv, "--model-base-path", str(base)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"convserve-train: error: {message}\n"
    assert not base.exists()


def test_samples_write_failure_after_export_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination passes the early check, then vanishes while the model trains."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    samples = out_dir / "s.npz"
    base = tmp_path / "m"

    def quick_train(model: keras.Model, data: object, *args: object) -> TrainResult:
        out_dir.rmdir()
        out_dir.write_text("now a file")
        return TrainResult(model, 0.1, np.zeros((10, 10), np.int64), 0.0)

    def quick_export(model: keras.Model, base: Path, *args: object, **kwargs: object) -> Path:
        return Path(base) / "1"

    monkeypatch.setattr(data_module, "resolve", lambda *args: load_sample().limit_train(64))
    monkeypatch.setattr(train_module, "train", quick_train)
    monkeypatch.setattr(export_module, "export_model", quick_export)
    assert main([*TINY, "--model-base-path", str(base), "--save-samples", str(samples)]) == 2
    out, err = capsys.readouterr()
    assert err == (
        f"convserve-train: error: --save-samples: cannot write {samples}: File exists: {out_dir} "
        f"(the model was exported to {base / '1'})\n"
    )
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert out == ""


def test_export_refuses_non_finite_weights(tmp_path: Path) -> None:
    """A diverged run must not become a servable model answering NaN."""
    model = build_model("keras")
    kernel = model.get_layer("conv1").kernel
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    images = np.zeros((15, 28, 28), np.uint8)
    with pytest.raises(ExportError, match=r"conv1/kernel is not finite .* --learning-rate"):
        export_model(model, tmp_path / "m", {"model_name": "x"}, images)
    assert not (tmp_path / "m").exists()


def test_export_into_an_unwritable_base_path_is_an_export_error(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("not a directory")
    model = build_model("keras")
    images = np.zeros((15, 28, 28), np.uint8)
    with pytest.raises(ExportError, match=r"--model-base-path: cannot write to .*file\.txt/m"):
        export_model(model, tmp_path / "file.txt" / "m", {"model_name": "x"}, images)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
        (["--save-samples", "{f}/x.npz"], "--save-samples: cannot create {f}/x.npz: {f} is not"),
    ],
)
def test_command_line_exits_2_with_one_error_line(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    """The real command, before TensorFlow is even imported: no traceback, exit code 2."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    argv = [a.format(f=blocker) for a in argv]
    result = subprocess.run(
        [sys.executable, "-m", "convserve.trainer", *TINY, *argv, "--model-base-path", "m"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("convserve-train: error: " + message.format(f=blocker))
    assert not (tmp_path / "m").exists()
