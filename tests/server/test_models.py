"""Model versions: discovery, loading and warm-up of real exports, swaps, pins, leases."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from convserve.server import errors, models, types

# -- discovery -----------------------------------------------------------------


def test_discovery_keeps_only_positive_integer_directories(tmp_path: Path) -> None:
    for name in ("1", "3", "12", "0", ".export-5", "7.tmp", "latest", "-2", "0x4", "٣"):
        (tmp_path / name).mkdir()
    (tmp_path / "9").write_text("a file, not a version")
    assert models.discover_versions(tmp_path) == [1, 3, 12]


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
            name=name, version=version, path=path, device=device, record={}, module=None
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


def manager_for(base: Path, keep: int = 2) -> tuple[models.ModelManager, FakeLoader, Recorder]:
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
    )
    return manager, loader, recorder


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

    no_record = tmp_path / "4"
    shutil.copytree(model_base_path / "1", no_record)
    (no_record / models.TRAINING_RECORD).unlink()
    with pytest.raises(models.ModelLoadError, match=r"training_record\.json"):
        models.load_model("mnist", 4, no_record, "/CPU:0")
