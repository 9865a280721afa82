"""SavedModel export: signatures match the Keras model, versioning, atomic rename."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

import convserve.trainer.export as export
from convserve.trainer.data import Dataset, load_sample
from convserve.trainer.export import ExportError, existing_versions, export_model, next_version
from convserve.trainer.models import build_model, feature_model, load_kernel
from convserve.trainer.train import (
    TrainConfig,
    deterministic,
    held_out_samples,
    predict_probabilities,
    train,
    training_record,
)


class Exported:
    def __init__(self, model: keras.Model, data: Dataset, record: dict[str, Any], path: Path):
        self.model, self.data, self.record, self.path = model, data, record, path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A briefly trained model with a frozen sobel-x first layer, exported once."""
    data = load_sample().limit_train(300)
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=2e-3, seed=1)
    with deterministic(config.seed):
        model = build_model("keras", load_kernel("sobel-x"))
        result = train(model, data, config, lambda _: None)
    record = training_record(
        model_name="digits",
        data=data,
        config=config,
        result=result,
        fixed_kernel="sobel-x",
        limit_train=300,
    )
    images, _ = held_out_samples(data)
    base = tmp_path_factory.mktemp("export") / "digits"
    path = export_model(model, base, record, images)
    return Exported(model, data, record, path)


def test_exported_as_version_1(exported: Exported) -> None:
    assert exported.path == exported.path.parent / "1"
    assert (exported.path / "saved_model.pb").is_file()
    assert (exported.path / "assets.extra" / "training_record.json").is_file()
    assert (exported.path / "assets.extra" / "tf_serving_warmup_requests").is_file()
    assert sorted(p.name for p in exported.path.parent.iterdir()) == ["1"]


def test_signature_specs(exported: Exported) -> None:
    loaded = tf.saved_model.load(str(exported.path))
    assert set(loaded.signatures) == {"serving_default", "predict_uint8", "feature_maps"}
    for name, dtype in [
        ("serving_default", tf.float32),
        ("predict_uint8", tf.uint8),
        ("feature_maps", tf.float32),
    ]:
        _, inputs = loaded.signatures[name].structured_input_signature
        assert list(inputs) == ["images"]
        assert inputs["images"].dtype == dtype
        assert inputs["images"].shape.as_list() == [None, 28, 28, 1]
    for name in ("serving_default", "predict_uint8"):
        outputs = loaded.signatures[name].structured_outputs
        assert list(outputs) == ["probabilities"]
        assert outputs["probabilities"].dtype == tf.float32
        assert outputs["probabilities"].shape.as_list() == [None, 10]
    maps = loaded.signatures["feature_maps"].structured_outputs
    assert {k: v.shape.as_list() for k, v in maps.items()} == {
        "fixed_kernel": [None, 28, 28, 1],
        "conv1": [None, 26, 26, 32],
        "conv2": [None, 11, 11, 64],
        "conv3": [None, 3, 3, 64],
    }


def test_savedmodel_predicts_like_keras(exported: Exported) -> None:
    loaded = tf.saved_model.load(str(exported.path))
    images = exported.data.x_test[:64]
    as_float = (images.astype(np.float32) / 255.0)[..., None]
    expected = exported.model.predict(as_float, verbose=0)
    from_float = loaded.signatures["serving_default"](images=tf.constant(as_float))
    from_uint8 = loaded.signatures["predict_uint8"](images=tf.constant(images[..., None]))
    assert np.max(np.abs(from_float["probabilities"].numpy() - expected)) < 1e-5
    assert np.max(np.abs(from_uint8["probabilities"].numpy() - expected)) < 1e-5
    # The model learnt something, so the comparison is between meaningful outputs.
    accuracy = np.mean(expected.argmax(axis=1) == exported.data.y_test[:64])
    assert accuracy > 0.5


def test_a_mirror_averaged_export_answers_the_same_for_an_image_and_its_mirror(
    exported: Exported, tmp_path: Path
) -> None:
    images, _ = held_out_samples(exported.data)
    path = export_model(
        exported.model, tmp_path / "m", exported.record, images, average_mirrored=True
    )
    loaded = tf.saved_model.load(str(path))
    as_float = (exported.data.x_test[:64].astype(np.float32) / 255.0)[..., None]
    served = loaded.signatures["serving_default"](images=tf.constant(as_float))["probabilities"]
    mirrored = loaded.signatures["serving_default"](images=tf.constant(as_float[:, :, ::-1]))
    uint8 = loaded.signatures["predict_uint8"](
        images=tf.constant(exported.data.x_test[:64, :, :, None])
    )["probabilities"]
    expected = predict_probabilities(exported.model, as_float, average_mirrored=True)
    np.testing.assert_allclose(served.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(uint8.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(mirrored["probabilities"].numpy(), expected, atol=1e-5)
    # The network alone is not mirror-symmetric, so the average is a different answer.
    plain = predict_probabilities(exported.model, as_float)
    assert np.max(np.abs(plain - expected)) > 1e-3


def test_feature_maps_match_keras(exported: Exported) -> None:
    loaded = tf.saved_model.load(str(exported.path))
    as_float = (exported.data.x_test[:5].astype(np.float32) / 255.0)[..., None]
    got = loaded.signatures["feature_maps"](images=tf.constant(as_float))
    expected = feature_model(exported.model)(as_float)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name].numpy(), np.asarray(expected[name]), atol=1e-5)
    # The frozen sobel-x layer: the horizontal gradient with zero padding.
    padded = np.pad(as_float[..., 0], ((0, 0), (1, 1), (1, 1)))
    sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)
    manual = sum(
        sobel[dy, dx] * padded[:, dy : dy + 28, dx : dx + 28] for dy in range(3) for dx in range(3)
    )
    np.testing.assert_allclose(got["fixed_kernel"].numpy()[..., 0], manual, atol=1e-5)


def test_next_version_ignores_non_versions(tmp_path: Path) -> None:
    base = tmp_path / "m"
    assert next_version(base) == 1
    for name in ("3", "10", "0", "foo", ".export-11-tmp", "v12"):
        (base / name).mkdir(parents=True)
    (base / "20").write_text("a file, not a version")
    assert existing_versions(base) == [3, 10]
    assert next_version(base) == 11


def test_export_numbers_versions_and_rejects_collisions(exported: Exported, tmp_path: Path) -> None:
    base = tmp_path / "m"
    shutil.copytree(exported.path.parent, base)
    images, _ = held_out_samples(exported.data)
    assert export_model(exported.model, base, exported.record, images).name == "2"
    assert export_model(exported.model, base, exported.record, images, version=7).name == "7"
    assert export_model(exported.model, base, exported.record, images).name == "8"
    before = sorted(os.listdir(base))
    with pytest.raises(ExportError, match=r"m/7 already exists"):
        export_model(exported.model, base, exported.record, images, version=7)
    with pytest.raises(ExportError, match="positive"):
        export_model(exported.model, base, exported.record, images, version=0)
    assert sorted(os.listdir(base)) == before == ["1", "2", "7", "8"]


def test_export_is_a_rename_of_a_hidden_complete_directory(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "m"
    renames: list[tuple[Path, Path, list[str], bool]] = []
    real_rename = os.rename

    def spying_rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        source, target = Path(src), Path(dst)
        contents = sorted(p.relative_to(source).as_posix() for p in source.rglob("*"))
        renames.append((source, target, contents, target.exists()))
        real_rename(src, dst)

    monkeypatch.setattr(export.os, "rename", spying_rename)
    images, _ = held_out_samples(exported.data)
    target = export_model(exported.model, base, exported.record, images)
    assert len(renames) == 1
    source, renamed_to, contents, target_existed = renames[0]
    assert renamed_to == target == base / "1"
    assert source.parent == base
    assert source.name.startswith(".")
    assert not target_existed
    # Everything was in place before the version became visible.
    for required in (
        "saved_model.pb",
        "variables/variables.index",
        "assets.extra/training_record.json",
        "assets.extra/tf_serving_warmup_requests",
    ):
        assert required in contents
    assert sorted(os.listdir(base)) == ["1"]  # no temporary directory left


def test_failed_export_leaves_nothing(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "m"

    def broken_warmup(*args: object) -> int:
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_warmup", broken_warmup)
    images, _ = held_out_samples(exported.data)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(exported.model, base, exported.record, images)
    assert os.listdir(base) == []
