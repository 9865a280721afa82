"""Model versions: discovery, loading and warm-up of real exports, swaps, pins, leases."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from convserve.server import errors, models, types
from convserve.server.model_config import VersionPolicy

# -- discovery -----------------------------------------------------------------


def test_discovery_keeps_only_positive_integer_directories(tmp_path: Path) -> None:
    for name in ("1", "3", "12", "0", ".export-5", "7.tmp", "latest", "-2", "0x4", "٣"):
        (tmp_path / name).mkdir()
    (tmp_path / "9").write_text("a file, not a version")
    assert models.discover_versions(tmp_path) == [1, 3, 12]


def test_discovery_keeps_only_versions_that_fit_int64(tmp_path: Path) -> None:
    largest = 2**63 - 1
    for name in (str(largest), str(largest + 1), "9" * 20, "9" * 250, "0" * 30 + "5"):
        (tmp_path / name).mkdir()
    assert models.discover_versions(tmp_path) == [5, largest]


def test_discovery_of_a_missing_base_path_is_empty(tmp_path: Path) -> None:
    assert models.discover_versions(tmp_path / "nowhere") == []


# -- the manager with a loader that needs no TensorFlow ------------------------


class FakeLoader:
    """Loads every version dir holding a file `ok`; anything else fails."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, name: str, version: int, path: Path, device: str) -> models.LoadedModel:
        self.calls.append(version)
        if not (path / "ok").is_file():
            raise models.ModelLoadError(f"version {version} is broken")
        return models.LoadedModel(
            name=name,
            version=version,
            path=path,
            device=device,
            record={},
            module=None,
            signature=models.ModelSignature("images", (8, 8, 1), "probabilities", 3),
        )


def add_version(base: Path, version: int, ok: bool = True) -> None:
    path = base / str(version)
    path.mkdir(parents=True)
    (path / ("ok" if ok else "broken")).write_text("")


class Recorder:
    def __init__(self) -> None:
        self.loads: list[tuple[int, bool]] = []
        self.serving: list[tuple[int, int]] = []
        self.released: list[int] = []

    def on_loaded(self, model: str, version: int, ok: bool) -> None:
        self.loads.append((version, ok))

    def on_serving(self, model: models.LoadedModel, loaded: int) -> None:
        model.on_release = lambda m: self.released.append(m.version)
        self.serving.append((model.version, loaded))


def manager_for(
    base: Path, keep: int = 2, policy: VersionPolicy | None = None
) -> tuple[models.ModelManager, FakeLoader, Recorder]:
    loader = FakeLoader()
    recorder = Recorder()
    manager = models.ModelManager(
        base,
        "mnist",
        "/CPU:0",
        on_loaded=recorder.on_loaded,
        on_serving=recorder.on_serving,
        keep_versions=keep,
        loader=loader,
        policy=policy,
    )
    return manager, loader, recorder


def states(manager: models.ModelManager) -> list[tuple[int, str, bool]]:
    return [(s.version, s.state, s.serving) for s in manager.status()]


async def test_start_serves_the_newest_loadable_version(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    add_version(tmp_path, 2)
    add_version(tmp_path, 3, ok=False)
    manager, loader, recorder = manager_for(tmp_path)
    assert manager.serving is None
    with pytest.raises(errors.Unavailable):
        manager.resolve(types.ModelRef())
    assert await manager.poll_once() == 2
    assert loader.calls == [3, 2]
    assert recorder.loads == [(3, False), (2, True)]
    assert manager.serving is not None
    assert manager.serving.version == 2
    assert manager.loaded_versions == (2,)


async def test_a_failed_version_is_not_retried_until_it_changes(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    manager, loader, recorder = manager_for(tmp_path)
    await manager.poll_once()
    add_version(tmp_path, 2, ok=False)
    (tmp_path / "2" / "saved_model.pb").write_bytes(b"garbage")
    assert await manager.poll_once() is None
    assert await manager.poll_once() is None
    assert loader.calls == [1, 2]
    assert recorder.loads == [(1, True), (2, False)]
    assert manager.serving is not None
    assert manager.serving.version == 1
    # Fixed in place (new files): tried again and served.
    (tmp_path / "2" / "ok").write_text("")
    (tmp_path / "2" / "saved_model.pb").write_bytes(b"a fixed export, larger than before")
    assert await manager.poll_once() == 2
    assert recorder.loads[-1] == (2, True)


async def test_a_version_refused_mid_copy_is_retried_when_any_file_changes(
    tmp_path: Path,
) -> None:
    add_version(tmp_path, 1)
    manager, loader, recorder = manager_for(tmp_path)
    await manager.poll_once()
    # saved_model.pb arrived first; the rest of the copy had not.
    version = tmp_path / "2"
    (version / "variables").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"complete")
    assert await manager.poll_once() is None
    assert await manager.poll_once() is None  # unchanged: not tried again
    assert loader.calls == [1, 2]
    # The copy completes; saved_model.pb itself is untouched.
    (version / "variables" / "variables.index").write_bytes(b"index")
    (version / "ok").write_text("")
    assert await manager.poll_once() == 2
    assert loader.calls == [1, 2, 2]
    assert recorder.loads[-1] == (2, True)


async def test_swaps_keep_the_newest_versions_and_release_after_the_last_lease(
    tmp_path: Path,
) -> None:
    add_version(tmp_path, 1)
    manager, _, recorder = manager_for(tmp_path, keep=2)
    await manager.poll_once()
    with manager.lease(types.ModelRef()) as held:
        assert held.version == 1
        add_version(tmp_path, 2)
        assert await manager.poll_once() == 2
        add_version(tmp_path, 3)
        assert await manager.poll_once() == 3
        # Version 1 left the loaded set but a request still holds it.
        assert manager.loaded_versions == (2, 3)
        assert held.retired
        assert recorder.released == []
    assert recorder.released == [1]
    assert recorder.serving == [(1, 1), (2, 2), (3, 2)]


async def test_pinning_resolves_loaded_versions_only(tmp_path: Path) -> None:
    add_version(tmp_path, 4)
    manager, _, _ = manager_for(tmp_path)
    await manager.poll_once()
    add_version(tmp_path, 5)
    await manager.poll_once()
    assert manager.resolve(types.ModelRef(version=4)).version == 4
    assert manager.resolve(types.ModelRef(name="mnist")).version == 5
    assert manager.resolve(types.ModelRef(name="mnist", version=5)).version == 5
    with pytest.raises(errors.NotFound, match=r"version 3 is not loaded.*\[4, 5\]"):
        manager.resolve(types.ModelRef(version=3))
    with pytest.raises(errors.NotFound, match="'fashion' is not served here"):
        manager.resolve(types.ModelRef(name="fashion"))


async def test_older_versions_appearing_later_are_ignored(tmp_path: Path) -> None:
    add_version(tmp_path, 5)
    manager, loader, _ = manager_for(tmp_path)
    await manager.poll_once()
    add_version(tmp_path, 3)
    assert await manager.poll_once() is None
    assert loader.calls == [5]


# -- version policies (TF Serving's model_version_policy) ------------------------


async def test_latest_n_serves_the_newest_and_keeps_n_loaded(tmp_path: Path) -> None:
    for version in (1, 2, 3):
        add_version(tmp_path, version)
    manager, loader, recorder = manager_for(tmp_path, policy=VersionPolicy("latest", 2))
    assert await manager.poll_once() == 3
    assert loader.calls == [3, 2]
    assert states(manager) == [(2, "AVAILABLE", False), (3, "AVAILABLE", True)]
    assert manager.resolve(types.ModelRef(version=2)).version == 2
    add_version(tmp_path, 4)
    assert await manager.poll_once() == 4
    assert manager.loaded_versions == (3, 4)
    assert recorder.released == [2]
    # Rolled back on disk: version 4 goes, 3 serves again and 2 comes back as the second.
    for entry in (tmp_path / "4").iterdir():
        entry.unlink()
    (tmp_path / "4").rmdir()
    assert await manager.poll_once() == 3
    assert states(manager) == [(2, "AVAILABLE", False), (3, "AVAILABLE", True)]
    assert recorder.released == [2, 4]


async def test_specific_versions_are_the_only_ones_loaded(tmp_path: Path) -> None:
    for version in (1, 2, 3, 4):
        add_version(tmp_path, version)
    manager, loader, _ = manager_for(tmp_path, policy=VersionPolicy("specific", versions=(1, 3)))
    assert await manager.poll_once() == 3
    assert sorted(loader.calls) == [1, 3]
    assert manager.loaded_versions == (1, 3)
    assert manager.resolve(types.ModelRef(version=1)).version == 1
    with pytest.raises(errors.NotFound, match=r"version 4 is not loaded.*\[1, 3\]"):
        manager.resolve(types.ModelRef(version=4))
    assert await manager.poll_once() is None  # nothing new to do
    assert sorted(loader.calls) == [1, 3]


async def test_all_versions_are_loaded_as_they_arrive(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    add_version(tmp_path, 2)
    manager, _, recorder = manager_for(tmp_path, policy=VersionPolicy("all"))
    assert await manager.poll_once() == 2
    add_version(tmp_path, 3)
    assert await manager.poll_once() == 3
    assert states(manager) == [
        (1, "AVAILABLE", False),
        (2, "AVAILABLE", False),
        (3, "AVAILABLE", True),
    ]
    assert recorder.released == []


async def test_status_reports_refused_and_unloading_versions(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    add_version(tmp_path, 2, ok=False)
    manager, _, _ = manager_for(tmp_path, keep=1)
    assert await manager.poll_once() == 1
    status = {s.version: s for s in manager.status()}
    assert status[2].state == "END"
    assert status[2].error == "version 2 is broken"
    with manager.lease(types.ModelRef()):
        add_version(tmp_path, 3)
        assert await manager.poll_once() == 3
        # Version 1 is retired but a request still holds it.
        assert states(manager) == [
            (1, "UNLOADING", False),
            (2, "END", False),
            (3, "AVAILABLE", True),
        ]
    assert states(manager) == [(2, "END", False), (3, "AVAILABLE", True)]


# -- real exports ---------------------------------------------------------------


@pytest.mark.slow
def test_a_real_export_loads_warms_up_and_describes_itself(
    model_base_path: Path, sample_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    version_dir = model_base_path / "1"
    warmup = models.read_warmup_requests(version_dir)
    assert [inputs["images"].shape[0] for _, inputs in warmup] == [1, 2, 4, 8]
    assert {name for name, _ in warmup} == {"serving_default"}
    assert all(inputs["images"].dtype == np.float32 for _, inputs in warmup)
    model = models.load_model("mnist", 1, version_dir, "/CPU:0")
    images, labels = sample_digits
    probabilities = model.predict(images.astype(np.float32)[..., None] / 255)
    assert probabilities.shape == (len(images), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert np.mean(probabilities.argmax(axis=1) == labels) >= 0.8
    maps = model.feature_maps(np.zeros((1, 28, 28, 1), np.float32))
    assert set(model.feature_map_layers) == set(maps)
    assert model.feature_map_layers == tuple(model.record["feature_map_layers"])
    meta = model.metadata((1,))
    assert meta.serving_version == 1
    assert meta.loaded_versions == (1,)
    assert [row.name for row in meta.layers] == [r["name"] for r in model.record["layers"]]
    assert meta.training["model_name"] == model.record["model_name"]
    assert meta.inputs[0].shape == (-1, 28, 28, 1)


# -- the LiteRT engine ----------------------------------------------------------


@pytest.mark.slow
def test_litert_predicts_what_the_savedmodel_predicts_from_every_thread(
    model_base_path: Path, sample_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    model = models.load_model(
        "mnist", 1, model_base_path / "1", "/CPU:0", [1, 2, 4, 8], engine="litert", engine_copies=2
    )
    assert model.engine == "litert"
    assert model.litert is not None
    assert model.litert.copies == 2
    images = sample_digits[0].astype(np.float32)[..., None] / 255
    expected = model.predict_tensorflow(images)
    got = model.predict(images)
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= models.PARITY_TOLERANCE
    assert np.array_equal(got.argmax(axis=1), expected.argmax(axis=1))

    # More callers than interpreters, at changing batch sizes: each gets its own rows.
    failures: list[str] = []

    def caller(offset: int) -> None:
        for size in (1, 3, 8, 5, 1, 16) * 3:
            start = (offset * 7 + size) % (len(images) - size)
            out = model.predict(images[start : start + size])
            if np.max(np.abs(out - expected[start : start + size])) > models.PARITY_TOLERANCE:
                failures.append(f"caller {offset}, rows {start}..{start + size}")

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []


@pytest.mark.slow
def test_a_conversion_that_fails_leaves_tensorflow_serving(
    model_base_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(module: object) -> bytes:
        raise RuntimeError("op not supported")

    monkeypatch.setattr(models, "convert_to_litert", refuse)
    with caplog.at_level(logging.WARNING, logger=models.__name__):
        model = models.load_model("mnist", 1, model_base_path / "1", "/CPU:0", engine="litert")
    assert model.engine == "tensorflow"
    assert model.litert is None
    assert "LiteRT conversion failed, TensorFlow serves it: op not supported" in caplog.text
    assert model.predict(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)


@pytest.mark.slow
def test_a_conversion_that_disagrees_is_never_served(
    model_base_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    honest = models.LiteRtEngine.__call__

    def off_by_a_little(self: models.LiteRtEngine, images: np.ndarray) -> np.ndarray:
        return honest(self, images) + np.float32(1e-3)

    monkeypatch.setattr(models.LiteRtEngine, "__call__", off_by_a_little)
    with caplog.at_level(logging.WARNING, logger=models.__name__):
        model = models.load_model("mnist", 1, model_base_path / "1", "/CPU:0", engine="litert")
    assert model.engine == "tensorflow"
    assert "LiteRT differs from the SavedModel by 0.001" in caplog.text


@pytest.mark.slow
def test_tensorflow_engine_and_gpu_devices_never_convert(
    model_base_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(module: object) -> bytes:
        raise AssertionError("converted")

    monkeypatch.setattr(models, "convert_to_litert", must_not_run)
    model = models.load_model("mnist", 1, model_base_path / "1", "/CPU:0", engine="tensorflow")
    assert model.engine == "tensorflow"
    # No GPU here: TensorFlow places the ops on the CPU (soft placement), but the
    # choice of engine follows the device asked for.
    model = models.load_model("mnist", 1, model_base_path / "1", "/GPU:0", engine="litert")
    assert model.engine == "tensorflow"
    with pytest.raises(ValueError, match="engine must be one of"):
        models.load_model("mnist", 1, model_base_path / "1", "/CPU:0", engine="onnx")


@pytest.mark.slow
def test_corrupt_exports_are_refused(model_base_path: Path, tmp_path: Path) -> None:
    bad_graph = tmp_path / "2"
    shutil.copytree(model_base_path / "1", bad_graph)
    (bad_graph / "saved_model.pb").write_bytes(b"\x00not a saved model")
    with pytest.raises(models.ModelLoadError, match="cannot load the SavedModel"):
        models.load_model("mnist", 2, bad_graph, "/CPU:0")

    bad_warmup = tmp_path / "3"
    shutil.copytree(model_base_path / "1", bad_warmup)
    (bad_warmup / models.WARMUP_REQUESTS).write_bytes(b"\x01\x02 not a TFRecord file")
    with pytest.raises(models.ModelLoadError, match="tf_serving_warmup_requests"):
        models.load_model("mnist", 3, bad_warmup, "/CPU:0")

    bad_record = tmp_path / "4"
    shutil.copytree(model_base_path / "1", bad_record)
    (bad_record / models.TRAINING_RECORD).write_text("[1, 2]")
    with pytest.raises(models.ModelLoadError, match=r"training_record\.json must hold"):
        models.load_model("mnist", 4, bad_record, "/CPU:0")


def _export(path: Path, fn: Any) -> Path:
    module = tf.Module()
    module.fn = fn
    tf.saved_model.save(module, str(path), signatures={"serving_default": fn})
    return path


@pytest.mark.slow
def test_any_image_classifier_loads_by_its_signature(tmp_path: Path) -> None:
    """A SavedModel from elsewhere: 6x5x3 input, 4 classes, no training record or
    feature maps. Its shape and class count come from its signature."""
    weights = tf.constant(np.random.default_rng(0).normal(size=(90, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 5, 3], tf.float32, name="pixels")])
    def classify(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"scores": tf.nn.softmax(tf.reshape(pixels, [-1, 90]) @ weights)}

    path = _export(tmp_path / "1", classify)
    model = models.load_model("rgb", 1, path, "/CPU:0", warm_batch_sizes=(1, 4))
    assert model.signature == models.ModelSignature("pixels", (6, 5, 3), "scores", 4)
    assert model.class_names == ()
    assert not model.has_feature_maps
    assert model.feature_map_layers == ()
    images = np.random.default_rng(1).random((3, 6, 5, 3), dtype=np.float32)
    expected = classify(tf.constant(images))["scores"].numpy()
    np.testing.assert_allclose(model.predict(images), expected, rtol=1e-5, atol=1e-6)
    meta = model.metadata((1,))
    assert meta.inputs[0].shape == (-1, 6, 5, 3)
    assert meta.outputs[0].shape == (-1, 4)
    assert meta.training == {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signature", "message"),
    [
        (
            tf.TensorSpec([None, 28, 28], tf.float32),
            r"input 'x' must be float32 \[N,H,W,C\].*float32 \[None, 28, 28\]",
        ),
        (
            tf.TensorSpec([None, None, 28, 1], tf.float32),
            r"with H, W and C known, it is float32 \[None, None, 28, 1\]",
        ),
        (tf.TensorSpec([None, 4, 4, 1], tf.uint8), r"it is uint8 \[None, 4, 4, 1\]"),
    ],
)
def test_signatures_that_are_not_image_classifiers_are_refused(
    tmp_path: Path, signature: tf.TensorSpec, message: str
) -> None:
    @tf.function(input_signature=[signature])
    def fn(x: tf.Tensor) -> dict[str, tf.Tensor]:
        flat = tf.reshape(tf.cast(x, tf.float32), [tf.shape(x)[0], -1])
        return {"p": tf.nn.softmax(flat[:, :3])}

    path = _export(tmp_path / "1", fn)
    with pytest.raises(models.ModelLoadError, match=message):
        models.load_model("bad", 1, path, "/CPU:0")


@pytest.mark.slow
def test_an_output_that_is_not_n_by_k_is_refused(tmp_path: Path) -> None:
    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 1], tf.float32)])
    def fn(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"maps": x, "p": tf.reshape(x, [-1, 16])}

    path = _export(tmp_path / "1", fn)
    with pytest.raises(
        models.ModelLoadError, match=r"must return one tensor, it returns \['maps', 'p'\]"
    ):
        models.load_model("bad", 1, path, "/CPU:0")
