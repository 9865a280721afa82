"""convserve-train end to end: flags, determinism, versions, the record and warm-up files."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config
from tensorflow_serving.apis import prediction_log_pb2

from convserve.trainer.__main__ import main
from convserve.trainer.data import load_sample
from convserve.trainer.train import confusion_matrix, format_confusion
from tests.conftest import REPO_ROOT
from tests.trainer.idx_files import write_idx_dir

TINY = ["--dataset", "sample", "--limit-train", "160", "--epochs", "1"]
RECORD_KEYS = {
    "model_name",
    "dataset",
    "architecture",
    "hyperparameters",
    "test_accuracy",
    "train_examples",
    "test_examples",
    "training_time_s",
    "refit",
    "exported_at",
    "tensorflow_version",
    "fixed_kernel",
    "total_parameters",
    "seed",
    "layers",
    "feature_map_layers",
    "confusion_matrix",
    "class_names",
    "model_card",
}


def weights_of(version_dir: Path) -> dict[str, np.ndarray]:
    prefix = str(version_dir / "variables" / "variables")
    reader = tf.train.load_checkpoint(prefix)
    return {
        name: reader.get_tensor(name)
        for name, _ in tf.train.list_variables(prefix)
        if name.startswith("variables/")
    }


def read_record(version_dir: Path) -> dict:
    with (version_dir / "assets.extra" / "training_record.json").open() as handle:
        return json.load(handle)


def test_help_works_without_training() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "convserve.trainer", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for flag in (
        "--model-base-path",
        "--dataset",
        "--data",
        "--arch",
        "--epochs",
        "--batch-size",
        "--optimizer",
        "--learning-rate",
        "--seed",
        "--fixed-kernel",
        "--version",
        "--limit-train",
        "--save-samples",
        "--quiet",
    ):
        assert flag in result.stdout


def test_training_record(trained_model_dir: Path) -> None:
    record = read_record(trained_model_dir / "1")
    assert set(record) == RECORD_KEYS
    assert record["model_name"] == "mnist"
    assert record["dataset"] == "sample"
    assert record["architecture"] == "keras-bn"
    assert record["train_examples"] == 2000
    assert record["test_examples"] == 1000
    assert record["seed"] == 0
    assert record["fixed_kernel"] == ""
    assert record["tensorflow_version"] == tf.__version__
    assert all(isinstance(v, str) for v in record["hyperparameters"].values())
    assert record["hyperparameters"]["epochs"] == "2"
    assert record["hyperparameters"]["limit_train"] == "2000"
    # The sample's own defaults: turns, zooms and elastic distortions, cosine-decayed
    # rate, smoothing.
    assert record["hyperparameters"]["batch_size"] == "64"
    assert record["hyperparameters"]["augment"] == "affine-elastic"
    assert record["hyperparameters"]["optimizer"] == "adam"
    assert record["hyperparameters"]["label_smoothing"] == "0.1"
    assert record["hyperparameters"]["lr_schedule"] == "cosine"
    assert record["total_parameters"] == 131_530
    assert sum(layer["parameters"] for layer in record["layers"]) == 131_530
    assert [layer["name"] for layer in record["layers"]][:3] == ["conv1", "pool1", "bn1"]
    assert record["feature_map_layers"] == ["conv1", "conv2", "conv3"]
    exported_at = datetime.datetime.fromisoformat(record["exported_at"])
    assert record["exported_at"].endswith("Z")
    assert exported_at.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.UTC) - exported_at) < datetime.timedelta(days=1)
    assert record["training_time_s"] > 0
    matrix = np.array(record["confusion_matrix"])
    assert matrix.shape == (10, 10)
    # MNIST's classes are the digits, named by themselves.
    assert record["class_names"] == [str(d) for d in range(10)]
    assert record["model_card"] == {
        "dataset": "sample",
        "source": record["model_card"]["source"],
        "image_shape": [28, 28, 1],
        "train_examples": 2000,
        "test_examples": 1000,
        "test_split": "a fixed stratified 20% of the sample (100 per digit), never trained on",
        "test_accuracy": record["test_accuracy"],
        "confusion_matrix": record["confusion_matrix"],
        "architecture": "keras-bn",
        "parameters": 131_530,
        "training_time_s": record["training_time_s"],
        "prediction": "the network's probabilities",
        "exported_model": "the model evaluated here",
    }
    assert record["refit"] is None
    assert record["hyperparameters"]["refit"] == "false"
    assert record["hyperparameters"]["average_mirrored"] == "false"
    assert record["model_card"]["source"].endswith("mnist_5k.csv.gz")
    assert matrix.sum() == 1000
    assert np.trace(matrix) / 1000 == pytest.approx(record["test_accuracy"])
    assert record["test_accuracy"] > 0.8


def test_warmup_requests_are_prediction_logs_of_held_out_digits(trained_model_dir: Path) -> None:
    path = trained_model_dir / "1" / "assets.extra" / "tf_serving_warmup_requests"
    with np.load(trained_model_dir.parent / "samples.npz") as samples:
        images = samples["images"]
    loaded = tf.saved_model.load(str(trained_model_dir / "1"))
    sizes = []
    offset = 0
    for raw in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        assert log.WhichOneof("log_type") == "predict_log"
        request = log.predict_log.request
        assert request.model_spec.name == "mnist"
        assert request.model_spec.signature_name == "serving_default"
        batch = tf.make_ndarray(request.inputs["images"])
        assert batch.dtype == np.float32
        assert batch.shape[1:] == (28, 28, 1)
        expected = images[offset : offset + len(batch)].astype(np.float32) / 255.0
        np.testing.assert_allclose(batch[..., 0], expected)
        out = loaded.signatures["serving_default"](images=tf.constant(batch))
        assert out["probabilities"].shape == (len(batch), 10)
        offset += len(batch)
        sizes.append(len(batch))
    assert sizes == [1, 2, 4, 8]


def test_saved_samples(trained_model_dir: Path) -> None:
    with np.load(trained_model_dir.parent / "samples.npz") as samples:
        images, labels = samples["images"], samples["labels"]
    assert images.dtype == np.uint8
    assert images.shape == (20, 28, 28)
    assert labels.tolist() == list(range(10)) * 2
    assert images.max() > 100  # real digits, not blank images


def test_fixed_seed_gives_identical_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = []
    for name, seed, quiet in (("a", "7", True), ("b", "7", True), ("c", "8", False)):
        argv = [*TINY, "--seed", seed, "--model-base-path", str(tmp_path / name)]
        assert main(argv + (["--quiet"] if quiet else [])) == 0
        runs.append((weights_of(tmp_path / name / "1"), capsys.readouterr().out))
    (first, quiet_out), (second, _), (other, loud_out) = runs
    assert len(first) >= 10
    assert first.keys() == second.keys() == other.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert any(not np.array_equal(first[name], other[name]) for name in first)
    # --quiet prints nothing; otherwise a line per epoch, accuracy and the confusion table.
    assert quiet_out == ""
    epoch_line = r"^epoch 1/\d+: +[0-9.]+ s, loss [0-9.]+, .* elapsed, ETA \S+$"
    assert re.search(epoch_line, loud_out, re.MULTILINE)
    assert "held-out accuracy:" in loud_out
    assert "true\\pred" in loud_out
    assert "recall" in loud_out
    # Op determinism is switched off again, so a later server in this process is unaffected.
    assert not tf_config.is_op_determinism_enabled()


def test_refit_exports_the_recipe_trained_on_the_test_images_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain, refit = tmp_path / "plain", tmp_path / "refit"
    samples = tmp_path / "samples.npz"
    assert main([*TINY, "--quiet", "--model-base-path", str(plain)]) == 0
    argv = [*TINY, "--refit", "--model-base-path", str(refit), "--save-samples", str(samples)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # The evaluation is the plain run's, bit for bit; then 160 + 1,000 images train again.
    assert "training keras-bn on 160 images of sample" in out
    assert "training keras-bn on 1160 images of sample" in out
    assert "refit training time:" in out
    assert "(the refit model trained on them)" in out
    before, after = read_record(plain / "1"), read_record(refit / "1")
    assert after["test_accuracy"] == before["test_accuracy"]
    assert after["confusion_matrix"] == before["confusion_matrix"]
    assert after["hyperparameters"]["refit"] == "true"
    assert after["train_examples"] == 1160
    assert after["test_examples"] == 1000
    assert after["refit"]["train_examples"] == 1160
    assert after["refit"]["training_time_s"] > 0
    card = after["model_card"]
    assert card["train_examples"] == 160
    assert card["test_accuracy"] == before["test_accuracy"]
    assert card["exported_model"].startswith(
        "the same recipe and seed trained again on the 160 training and 1,000 test images"
    )
    # The exported weights are the refit model's, not the evaluated one's.
    exported, evaluated = weights_of(refit / "1"), weights_of(plain / "1")
    assert exported.keys() == evaluated.keys()
    assert any(not np.array_equal(exported[name], evaluated[name]) for name in exported)


def test_fixed_kernel_flag(tmp_path: Path) -> None:
    base = tmp_path / "edge"
    argv = [*TINY, "--fixed-kernel", "edge-x", "--quiet", "--model-base-path", str(base)]
    assert main(argv) == 0
    record = read_record(base / "1")
    assert record["fixed_kernel"] == "edge-x"
    first = record["layers"][0]
    assert first == {
        "name": "fixed_kernel",
        "type": "Conv2D",
        "output_shape": [28, 28, 1],
        "parameters": 2,
        "trainable": False,
    }
    assert record["feature_map_layers"] == ["fixed_kernel", "conv1", "conv2", "conv3"]
    loaded = tf.saved_model.load(str(base / "1"))
    image = np.random.default_rng(0).random((1, 28, 28, 1), dtype=np.float32)
    maps = loaded.signatures["feature_maps"](images=tf.constant(image))
    edge = maps["fixed_kernel"].numpy()[0, :, :, 0]
    # [[1, -1]] with "same" padding: x[i, j] - x[i, j+1], zero beyond the right edge.
    shifted = np.pad(image[0, :, 1:, 0], ((0, 0), (0, 1)))
    np.testing.assert_allclose(edge, image[0, :, :, 0] - shifted, atol=1e-6)


def test_versions_and_collision(
    trained_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "mnist"
    shutil.copytree(trained_model_dir, base)
    assert main([*TINY, "--quiet", "--model-base-path", str(base), "--version", "1"]) == 2
    assert f"{base / '1'} already exists" in capsys.readouterr().err
    assert sorted(os.listdir(base)) == ["1"]
    assert main([*TINY, "--quiet", "--model-base-path", str(base)]) == 0
    assert sorted(os.listdir(base)) == ["1", "2"]  # next integer, no hidden leftovers
    assert read_record(base / "2")["train_examples"] == 160


def test_bad_inputs_fail_with_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    base = tmp_path / "m"
    assert main(["--data", str(broken), "--quiet", "--model-base-path", str(base)]) == 2
    assert f"{broken}: not a readable .npz file" in capsys.readouterr().err
    assert main([*TINY, "--fixed-kernel", "blur", "--model-base-path", str(base)]) == 2
    assert "--fixed-kernel: 'blur' is neither a preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY[:-1], "0", "--model-base-path", str(base)])
    assert exit_info.value.code == 2
    assert "--epochs must be positive" in capsys.readouterr().err
    assert not base.exists()


def test_confusion_table() -> None:
    labels = np.array([0, 0, 1, 9, 9, 9])
    predicted = np.array([0, 1, 1, 9, 9, 4])
    matrix = confusion_matrix(labels, predicted)
    assert matrix[0, 0] == 1
    assert matrix[0, 1] == 1
    assert matrix[9, 4] == 1
    assert matrix[9, 9] == 2
    assert matrix.sum() == 6
    lines = format_confusion(matrix).splitlines()
    assert len(lines) == 12
    assert lines[0].split()[:11] == ["true\\pred", *[str(d) for d in range(10)]]
    row_nine = lines[-1].split()
    assert row_nine[0] == "9"
    assert row_nine[5] == "1"
    assert row_nine[10] == "2"
    assert row_nine[-1] == "0.667"
    assert lines[4].split()[-1] == "-"  # digit 2 never occurs: no recall


def test_keras_keeps_its_original_recipe_and_exports_a_working_model(tmp_path: Path) -> None:
    base = tmp_path / "keras"
    argv = [*TINY, "--arch", "keras", "--quiet", "--model-base-path", str(base)]
    assert main(argv) == 0
    record = read_record(base / "1")
    assert record["architecture"] == "keras"
    assert record["total_parameters"] == 93_322
    assert record["model_card"]["parameters"] == 93_322
    # keras's recipe for the sample since the first release, except the explicit --epochs.
    hyperparameters = record["hyperparameters"]
    assert hyperparameters["batch_size"] == "16"
    assert hyperparameters["augment"] == "shift"
    assert hyperparameters["optimizer"] == "rmsprop"
    assert hyperparameters["label_smoothing"] == "0"
    # The exported model predicts as the record says it did on the held-out digits.
    loaded = tf.saved_model.load(str(base / "1"))
    sample = load_sample()
    images = sample.x_test.astype(np.float32)[..., None] / 255
    probabilities = loaded.signatures["serving_default"](images=tf.constant(images))
    predicted = np.argmax(next(iter(probabilities.values())).numpy(), axis=1)
    assert np.mean(predicted == sample.y_test) == pytest.approx(record["test_accuracy"])


def test_data_flag_trains_on_idx_files(tmp_path: Path) -> None:
    sample = load_sample()
    arrays = {
        "x_train": sample.x_train[:96],
        "y_train": sample.y_train[:96],
        "x_test": sample.x_test[:40],
        "y_test": sample.y_test[:40],
    }
    write_idx_dir(tmp_path / "idx", arrays, gz=True)
    base = tmp_path / "m"
    argv = ["--data", str(tmp_path / "idx"), "--epochs", "1", "--quiet"]
    assert main([*argv, "--model-base-path", str(base)]) == 0
    record = read_record(base / "1")
    assert record["dataset"] == str(tmp_path / "idx")
    assert record["train_examples"] == 96
    assert record["test_examples"] == 40
    # Not the sample: the full-data recipe of the default architecture applies.
    assert record["architecture"] == "keras-bn"
    assert record["hyperparameters"]["augment"] == "shift"
    assert np.array(record["confusion_matrix"]).sum() == 40


@pytest.mark.slow
def test_default_training_on_the_sample_reaches_98_5_percent(tmp_path: Path) -> None:
    """The documented default: the sample, every setting left alone, >= 98.5% held out.

    98.5-99.3% was measured over seven seeds on a 2-core machine (98.9% on average,
    99.0% with the default seed); the bound leaves room for another CPU's arithmetic
    while still failing keras's recipe (98.1%) and the elastic-only default of before
    (98.4% with seed 0)."""
    base = tmp_path / "mnist"
    assert main(["--dataset", "sample", "--quiet", "--model-base-path", str(base)]) == 0
    record = read_record(base / "1")
    assert record["dataset"] == "sample"
    assert record["test_examples"] == 1000
    assert record["hyperparameters"]["augment"] == "affine-elastic"
    assert record["test_accuracy"] >= 0.985, record["test_accuracy"]
