"""Fashion-MNIST and scikit-learn's 8x8 digits: loaders, class names, shapes, the model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

import convserve.trainer.data as data_module
from convserve.trainer.__main__ import main
from convserve.trainer.data import (
    DIGIT_CLASS_NAMES,
    FASHION_MNIST_CLASS_NAMES,
    DataError,
    Dataset,
    load_digits8,
    load_fashion_mnist,
    resolve,
)
from convserve.trainer.models import KernelError, build_model, conv_layer_names
from convserve.trainer.train import format_confusion
from tests.conftest import require_installed
from tests.trainer.idx_files import write_idx_dir

# Spelled out, not imported: the tests pin the published label order.
FASHION_NAMES = [
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
]
DIGITS8_TOTAL = 1797  # scikit-learn's bundled digits


def fake_fashion(directory: Path) -> dict[str, np.ndarray]:
    """Four small gzipped IDX files laid out like Debian's dataset-fashion-mnist."""
    rng = np.random.default_rng(15)
    arrays = {
        "x_train": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 20).astype(np.uint8),
        "x_test": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 7).astype(np.uint8),
    }
    write_idx_dir(directory, arrays, gz=True)
    return arrays


# --- Fashion-MNIST -----------------------------------------------------------------------


def test_fashion_mnist_reads_gzipped_idx_with_class_names(tmp_path: Path) -> None:
    arrays = fake_fashion(tmp_path)
    dataset = load_fashion_mnist(tmp_path)
    assert dataset.name == "fashion-mnist"
    assert list(dataset.class_names) == FASHION_NAMES
    assert dataset.image_shape == (28, 28)
    np.testing.assert_array_equal(dataset.x_train, arrays["x_train"])
    np.testing.assert_array_equal(dataset.y_train, arrays["y_train"])
    np.testing.assert_array_equal(dataset.x_test, arrays["x_test"])
    np.testing.assert_array_equal(dataset.y_test, arrays["y_test"])
    assert dataset.y_train.dtype == np.int64


def test_fashion_mnist_missing_directory_names_path_and_package(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"nowhere: no such directory.*dataset-fashion-mnist"):
        load_fashion_mnist(missing)


def test_fashion_mnist_missing_file_names_file_and_package(tmp_path: Path) -> None:
    fake_fashion(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(
        DataError, match=r"no t10k-images-idx3-ubyte or .*apt-get install dataset-fashion-mnist"
    ):
        load_fashion_mnist(tmp_path)


def test_resolve_fashion_mnist_uses_the_package_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_fashion(tmp_path)
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", tmp_path)
    messages: list[str] = []
    dataset = resolve("fashion-mnist", None, messages.append)
    assert dataset.name == "fashion-mnist"
    assert messages == [f"data: Fashion-MNIST from {tmp_path}"]
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", tmp_path / "gone")
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        resolve("fashion-mnist", None, messages.append)


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(DataError, match=r"--dataset must be one of .*fashion-mnist, digits8"):
        resolve("cifar", None, lambda _: None)


def test_installed_fashion_mnist_is_complete() -> None:
    require_installed(
        data_module.FASHION_MNIST_DIR.is_dir(), "Debian's dataset-fashion-mnist package"
    )
    dataset = load_fashion_mnist()
    assert dataset.x_train.shape == (60_000, 28, 28)
    assert dataset.x_test.shape == (10_000, 28, 28)
    # Every class is equally represented in both published splits.
    assert np.bincount(dataset.y_train, minlength=10).tolist() == [6000] * 10
    assert np.bincount(dataset.y_test, minlength=10).tolist() == [1000] * 10


# --- scikit-learn's 8x8 digits -----------------------------------------------------------


@pytest.fixture(scope="module")
def digits8() -> Dataset:
    return load_digits8()


def test_digits8_is_8x8_uint8_with_digit_names(digits8: Dataset) -> None:
    assert digits8.name == "digits8"
    assert digits8.image_shape == (8, 8)
    assert digits8.x_train.dtype == digits8.x_test.dtype == np.uint8
    # 0..16 scaled to the full byte range.
    assert digits8.x_train.min() == 0
    assert digits8.x_train.max() == 255
    assert digits8.class_names == DIGIT_CLASS_NAMES == tuple("0123456789")
    assert len(digits8.x_train) + len(digits8.x_test) == DIGITS8_TOTAL


def test_digits8_split_is_stratified_disjoint_and_fixed(digits8: Dataset) -> None:
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target, minlength=10)
    held_out = np.bincount(digits8.y_test, minlength=10)
    assert held_out.tolist() == [round(n * 0.2) for n in per_class]
    assert (np.bincount(digits8.y_train, minlength=10) + held_out).tolist() == per_class.tolist()
    train_rows = {row.tobytes() for row in digits8.x_train}
    assert not any(row.tobytes() in train_rows for row in digits8.x_test)
    again = load_digits8()
    np.testing.assert_array_equal(again.x_test, digits8.x_test)
    np.testing.assert_array_equal(again.y_train, digits8.y_train)


def test_keras_architecture_fits_8x8_images() -> None:
    model = build_model("keras", image_shape=(8, 8), num_classes=10)
    assert tuple(model.input.shape) == (None, 8, 8, 1)
    assert conv_layer_names(model) == ["conv1", "conv2", "conv3"]
    assert tuple(model.get_layer("conv3").output.shape) == (None, 2, 2, 64)
    probabilities = model(np.zeros((3, 8, 8, 1), np.float32))
    assert tuple(probabilities.shape) == (3, 10)
    tutorial = build_model("tutorial", image_shape=(8, 8))
    assert tuple(tutorial.get_layer("dense").input.shape) == (None, 2 * 2 * 64)


def test_model_shape_errors() -> None:
    with pytest.raises(KernelError, match=r"kernel \[9, 1, 1, 1\] is larger than the 8x8 images"):
        build_model("keras", np.ones((9, 1, 1, 1), np.float32), image_shape=(8, 8))
    with pytest.raises(ValueError, match="at least 4x4 pixels, got 3x8"):
        build_model("keras", image_shape=(3, 8))


def test_confusion_table_shows_class_names() -> None:
    matrix = np.diag([3, 1, 2])
    table = format_confusion(matrix, ("cat", "dog", "2"))
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert lines[2].endswith("1.000  cat")
    assert lines[3].endswith("1.000  dog")
    assert lines[4].endswith("1.000")  # a digit is its own name


# --- digits8 end to end: train, export, load, predict ------------------------------------


@pytest.fixture(scope="module")
def digits8_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits8")
    argv = [
        "--dataset",
        "digits8",
        "--epochs",
        "1",
        "--quiet",
        "--model-name",
        "digits8",
        "--model-base-path",
        str(root / "digits8"),
        "--save-samples",
        str(root / "samples.npz"),
    ]
    assert main(argv) == 0
    return root / "digits8" / "1"


def read_record(version_dir: Path) -> dict[str, Any]:
    with (version_dir / "assets.extra" / "training_record.json").open() as handle:
        record: dict[str, Any] = json.load(handle)
    return record


def test_digits8_savedmodel_takes_8x8_images(digits8_export: Path, digits8: Dataset) -> None:
    loaded = tf.saved_model.load(str(digits8_export))
    for name in ("serving_default", "predict_uint8", "feature_maps"):
        _, inputs = loaded.signatures[name].structured_input_signature
        assert inputs["images"].shape.as_list() == [None, 8, 8, 1]
    images = digits8.x_test[:16]
    as_float = (images.astype(np.float32) / 255.0)[..., None]
    out = loaded.signatures["serving_default"](images=tf.constant(as_float))
    probabilities = out["probabilities"].numpy()
    assert probabilities.shape == (16, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    from_uint8 = loaded.signatures["predict_uint8"](images=tf.constant(images[..., None]))
    np.testing.assert_allclose(from_uint8["probabilities"].numpy(), probabilities, atol=1e-6)
    maps = loaded.signatures["feature_maps"](images=tf.constant(as_float))
    assert maps["conv1"].shape == (16, 8, 8, 32)


def test_digits8_warmup_and_samples_are_8x8(digits8_export: Path) -> None:
    path = digits8_export / "assets.extra" / "tf_serving_warmup_requests"
    shapes = []
    for raw in tf.data.TFRecordDataset(str(path)):
        request = prediction_log_pb2.PredictionLog.FromString(raw.numpy()).predict_log.request
        assert request.model_spec.name == "digits8"
        shapes.append(tf.make_ndarray(request.inputs["images"]).shape)
    assert shapes == [(n, 8, 8, 1) for n in (1, 2, 4, 8)]
    with np.load(digits8_export.parent.parent / "samples.npz") as samples:
        assert samples["images"].shape == (20, 8, 8)
        assert samples["labels"].tolist() == list(range(10)) * 2


def test_digits8_record_has_class_names_and_model_card(
    digits8_export: Path, digits8: Dataset
) -> None:
    record = read_record(digits8_export)
    assert record["class_names"] == list("0123456789")
    assert record["dataset"] == "digits8"
    # The small-data defaults apply, except the explicit --epochs 1.
    assert record["hyperparameters"]["epochs"] == "1"
    assert record["hyperparameters"]["batch_size"] == "16"
    assert record["hyperparameters"]["augment"] == "none"
    card = record["model_card"]
    assert card["dataset"] == "digits8"
    assert card["image_shape"] == [8, 8, 1]
    assert card["train_examples"] == len(digits8.x_train) == record["train_examples"]
    assert card["test_examples"] == len(digits8.x_test) == record["test_examples"]
    matrix = np.array(card["confusion_matrix"])
    assert matrix.shape == (10, 10)
    assert card["confusion_matrix"] == record["confusion_matrix"]
    assert matrix.sum(axis=1).tolist() == np.bincount(digits8.y_test, minlength=10).tolist()
    assert np.trace(matrix) / matrix.sum() == pytest.approx(card["test_accuracy"])
    assert card["test_accuracy"] == record["test_accuracy"]
    # One epoch of 8x8 digits already learns far more than chance (0.1).
    assert card["test_accuracy"] > 0.5


def test_fashion_mnist_end_to_end_on_small_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_fashion(tmp_path / "fashion")
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", tmp_path / "fashion")
    base = tmp_path / "models"
    argv = ["--dataset", "fashion-mnist", "--epochs", "1", "--quiet", "--model-base-path"]
    assert main([*argv, str(base)]) == 0
    record = read_record(base / "1")
    assert record["class_names"] == FASHION_NAMES
    assert record["model_card"]["dataset"] == "fashion-mnist"
    assert record["model_card"]["train_examples"] == 20
    assert record["model_card"]["test_examples"] == 7
    assert record["model_card"]["image_shape"] == [28, 28, 1]
    assert list(FASHION_MNIST_CLASS_NAMES) == FASHION_NAMES
    # By default clothes are mirrored in training and their predictions mirror-averaged:
    # the served model answers an image and its mirror image alike.
    assert record["hyperparameters"]["augment"] == "mirror"
    assert record["hyperparameters"]["average_mirrored"] == "true"
    assert "mirror image" in record["model_card"]["prediction"]
    serve = tf.saved_model.load(str(base / "1")).signatures["predict_uint8"]
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    plain = serve(images=tf.constant(images))["probabilities"].numpy()
    mirrored = serve(images=tf.constant(images[:, :, ::-1]))["probabilities"].numpy()
    np.testing.assert_allclose(mirrored, plain, atol=1e-6)
