"""Model versions: discovery, loading and warm-up of real exports, swaps, pins, leases."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from convserve.server import engines, errors, model_versions, models, types
from convserve.server.engines import litert
from convserve.server.model_config import VersionPolicy
from tests.server import toy_engine
from tests.server.runtime_helpers import float_digits, make_settings, started_runtime

# -- discovery -----------------------------------------------------------------


def test_discovery_keeps_only_positive_integer_directories(tmp_path: Path) -> None:
    for name in ("1", "3", "12", "0", ".export-5", "7.tmp", "latest", "-2", "0x4", "٣"):
        (tmp_path / name).mkdir()
    (tmp_path / "9").write_text("a file, not a version")
    assert model_versions.discover_versions(tmp_path) == [1, 3, 12]


def test_discovery_keeps_only_versions_that_fit_int64(tmp_path: Path) -> None:
    largest = 2**63 - 1
    for name in (str(largest), str(largest + 1), "9" * 20, "9" * 250, "0" * 30 + "5"):
        (tmp_path / name).mkdir()
    assert model_versions.discover_versions(tmp_path) == [5, largest]


def test_discovery_of_a_missing_base_path_is_empty(tmp_path: Path) -> None:
    assert model_versions.discover_versions(tmp_path / "nowhere") == []


def test_leading_zeros_name_the_version_they_spell(tmp_path: Path) -> None:
    # TF Serving parses the directory name as a number: 0002/ is version 2.
    for name in ("0002", "7", "010", "000", "00"):
        (tmp_path / name).mkdir()
    assert model_versions.version_dirs(tmp_path) == {2: "0002", 7: "7", 10: "010"}
    assert model_versions.discover_versions(tmp_path) == [2, 7, 10]


def test_the_unpadded_directory_is_the_version_when_both_exist(tmp_path: Path) -> None:
    for name in ("2", "02", "0002"):
        (tmp_path / name).mkdir()
    assert model_versions.version_dirs(tmp_path) == {2: "2"}


def test_padded_twins_without_the_unpadded_name_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("1", "02", "002"):
        (tmp_path / name).mkdir()
    with caplog.at_level(logging.WARNING, logger=model_versions.__name__):
        assert model_versions.version_dirs(tmp_path) == {1: "1"}
    assert "directories ['002', '02'] all name version 2; ignored until one remains" in caplog.text


def test_base_path_problems_are_told_without_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing-models"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    empty = tmp_path / "empty-models"
    empty.mkdir()
    no_versions = tmp_path / "no-versions"
    (no_versions / "latest").mkdir(parents=True)
    (no_versions / "0").mkdir()
    (no_versions / "5").write_text("a file, not a version")
    # Exact texts: clients may see them, and none of them may carry a server path.
    assert model_versions.base_path_problem(missing) == "the base path does not exist"
    assert model_versions.base_path_problem(a_file) == "the base path is not a directory"
    nothing = "no version directories (<base_path>/<version>/) under the base path"
    assert model_versions.base_path_problem(empty) == nothing
    assert model_versions.base_path_problem(no_versions) == nothing


def test_an_unreadable_base_path_is_told_without_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tests may run as root, whom permission bits do not stop: refuse the listing.
    def refuse(self: Path) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    assert (
        model_versions.base_path_problem(tmp_path)
        == "the base path cannot be read (Permission denied)"
    )


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
            engine=engines.Engine(toy_engine.context_for((8, 8, 1), 3)),
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
    base: Path,
    keep: int = 2,
    policy: VersionPolicy | None = None,
    loader: FakeLoader | None = None,
    settle_s: float = 0.0,
) -> tuple[model_versions.ModelManager, FakeLoader, Recorder]:
    # settle_s 0 by default: these tests write whole versions before they poll, and a
    # second of settling per load would make them slow without testing anything more.
    loader = FakeLoader() if loader is None else loader
    recorder = Recorder()
    manager = model_versions.ModelManager(
        base,
        "mnist",
        "/CPU:0",
        on_loaded=recorder.on_loaded,
        on_serving=recorder.on_serving,
        keep_versions=keep,
        loader=loader,
        policy=policy,
        settle_s=settle_s,
    )
    return manager, loader, recorder


def states(manager: model_versions.ModelManager) -> list[tuple[int, str, bool]]:
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


# -- version directories, base path problems, changes on disk -------------------


async def test_a_zero_padded_directory_serves_as_its_version(tmp_path: Path) -> None:
    (tmp_path / "0002").mkdir()
    (tmp_path / "0002" / "ok").write_text("")
    manager, loader, _ = manager_for(tmp_path)
    assert await manager.poll_once() == 2
    assert loader.calls == [2]
    assert manager.path_of(2) == tmp_path / "0002"
    assert manager.serving is not None
    assert manager.serving.path == tmp_path / "0002"
    assert states(manager) == [(2, "AVAILABLE", True)]


async def test_the_unpadded_twin_is_the_one_loaded(tmp_path: Path) -> None:
    add_version(tmp_path, 2)
    (tmp_path / "02").mkdir()
    (tmp_path / "02" / "broken").write_text("")
    manager, loader, _ = manager_for(tmp_path)
    assert await manager.poll_once() == 2
    assert loader.calls == [2]
    assert manager.serving is not None
    assert manager.serving.path == tmp_path / "2"


async def test_padded_twins_are_not_loaded_until_one_remains(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    for name in ("02", "002"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ok").write_text("")
    manager, loader, _ = manager_for(tmp_path)
    assert await manager.poll_once() == 1
    assert await manager.poll_once() is None
    assert loader.calls == [1]
    shutil.rmtree(tmp_path / "002")
    assert await manager.poll_once() == 2
    assert manager.path_of(2) == tmp_path / "02"
    assert manager.serving is not None
    assert manager.serving.path == tmp_path / "02"


async def test_why_not_serving_names_the_problem_without_the_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = tmp_path / "mnist"
    manager, _, _ = manager_for(base)
    with caplog.at_level(logging.ERROR, logger=model_versions.__name__):
        assert await manager.poll_once() is None
    assert manager.why_not_serving() == "the base path does not exist"
    # Operators get the path in the log; clients only the text above.
    assert f"mnist: the base path does not exist ({base})" in caplog.text
    add_version(base, 1, ok=False)
    assert await manager.poll_once() is None
    assert manager.why_not_serving() == "no version loads (version 1: version 1 is broken)"
    add_version(base, 2)
    assert await manager.poll_once() == 2
    assert manager.why_not_serving() == ""


class RecordLoader(FakeLoader):
    """FakeLoader that reads the training record as `models.load_model` does."""

    def __call__(self, name: str, version: int, path: Path, device: str) -> models.LoadedModel:
        marker = models.record_marker(path)
        record = models.read_record(path)
        model = super().__call__(name, version, path, device)
        model.record = record
        model.record_marker = marker
        model.class_names = models.class_names_of(record, model.signature.classes)
        return model


def write_record(version_dir: Path, record: dict[str, Any]) -> None:
    path = version_dir / models.TRAINING_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


async def test_a_training_record_copied_in_later_is_picked_up(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    manager, loader, _ = manager_for(tmp_path, loader=RecordLoader())
    assert await manager.poll_once() == 1
    model = manager.serving
    assert model is not None
    assert model.class_names == ()
    write_record(tmp_path / "1", {"dataset": "sample", "class_names": ["cat", "dog", "owl"]})
    assert await manager.poll_once() is None
    # The same loaded version, not a reload: only the record was read again.
    assert manager.serving is model
    assert loader.calls == [1]
    assert model.class_names == ("cat", "dog", "owl")
    assert model.record["dataset"] == "sample"
    assert model.metadata((1,)).class_names == ("cat", "dog", "owl")


async def test_a_changed_record_that_cannot_be_used_keeps_the_one_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_version(tmp_path, 1)
    write_record(tmp_path / "1", {"class_names": ["cat", "dog", "owl"]})
    manager, _, _ = manager_for(tmp_path, loader=RecordLoader())
    assert await manager.poll_once() == 1
    model = manager.serving
    assert model is not None
    assert model.class_names == ("cat", "dog", "owl")
    write_record(tmp_path / "1", {"class_names": ["cat", "dog\n", "owl"]})
    with caplog.at_level(logging.ERROR, logger=model_versions.__name__):
        assert await manager.poll_once() is None
    assert model.class_names == ("cat", "dog", "owl")
    assert (
        "mnist version 1: the changed training record is not used: "
        "assets.extra/training_record.json: class_names[1]: control characters are not "
        "allowed in a class name"
    ) in caplog.text
    # Fixed again (another size, so that the change shows whatever the clock's grain).
    write_record(tmp_path / "1", {"class_names": ["cats", "dogs", "owls"]})
    assert await manager.poll_once() is None
    assert model.class_names == ("cats", "dogs", "owls")


class ChangingLoader(FakeLoader):
    """FakeLoader that, on its first call for `version`, adds a file to the version dir
    while it loads: what it loaded may be half a copy."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.version = version

    def __call__(self, name: str, version: int, path: Path, device: str) -> models.LoadedModel:
        model = super().__call__(name, version, path, device)
        if version == self.version and self.calls.count(version) == 1:
            (path / "variables.data-00001-of-00002").write_bytes(b"arrived late")
        return model


async def test_a_version_that_changes_while_it_loads_is_loaded_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add_version(tmp_path, 1)
    manager, loader, recorder = manager_for(tmp_path, loader=ChangingLoader(2))
    assert await manager.poll_once() == 1
    add_version(tmp_path, 2)
    with caplog.at_level(logging.INFO, logger=model_versions.__name__):
        assert await manager.poll_once() is None
    assert "mnist version 2 changed while it loaded; loading it again later" in caplog.text
    assert manager.serving is not None
    assert manager.serving.version == 1
    # Neither refused nor loaded: nothing to report about version 2 yet.
    assert states(manager) == [(1, "AVAILABLE", True)]
    assert recorder.loads == [(1, True)]
    assert await manager.poll_once() == 2
    assert loader.calls == [1, 2, 2]
    assert recorder.loads == [(1, True), (2, True)]
    assert states(manager) == [(1, "AVAILABLE", False), (2, "AVAILABLE", True)]


async def test_deleting_the_serving_version_rolls_back_to_a_loaded_one(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    manager, loader, recorder = manager_for(tmp_path)
    assert await manager.poll_once() == 1
    add_version(tmp_path, 2)
    assert await manager.poll_once() == 2
    shutil.rmtree(tmp_path / "2")
    assert await manager.poll_once() == 1
    assert states(manager) == [(1, "AVAILABLE", True)]
    assert loader.calls == [1, 2]
    assert recorder.released == [2]
    assert await manager.poll_once() is None


async def test_deleting_the_serving_version_loads_the_newest_left(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    add_version(tmp_path, 2, ok=False)
    add_version(tmp_path, 3)
    add_version(tmp_path, 4)
    manager, loader, recorder = manager_for(tmp_path)
    assert await manager.poll_once() == 4
    assert loader.calls == [4]
    shutil.rmtree(tmp_path / "4")
    # Version 3, never loaded until now, is the newest one left.
    assert await manager.poll_once() == 3
    assert loader.calls == [4, 3]
    assert states(manager) == [(3, "AVAILABLE", True)]
    assert recorder.released == [4]
    # Past a version that does not load, to the next one.
    shutil.rmtree(tmp_path / "3")
    assert await manager.poll_once() == 1
    assert loader.calls == [4, 3, 2, 1]
    assert states(manager) == [(1, "AVAILABLE", True), (2, "END", False)]
    assert recorder.released == [4, 3]


async def test_with_every_version_deleted_the_serving_one_serves_on(tmp_path: Path) -> None:
    add_version(tmp_path, 1)
    manager, _, recorder = manager_for(tmp_path)
    assert await manager.poll_once() == 1
    shutil.rmtree(tmp_path / "1")
    assert await manager.poll_once() is None
    assert manager.serving is not None
    assert manager.serving.version == 1
    assert recorder.released == []


# -- settling: a version is loaded once its files stop changing --------------------


class Writer:
    """Appends to a file of `directory` every 20 ms until stopped."""

    def __init__(self, directory: Path) -> None:
        self.file = directory / "variables.data-00000-of-00001"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with self.file.open("ab") as out:
                out.write(b"x" * 64)

    def __enter__(self) -> Writer:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_directory_that_keeps_changing_never_settles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_versions, "SETTLE_ROUNDS", 3)
    with Writer(tmp_path):
        started = time.monotonic()
        assert model_versions.settled_marker(tmp_path, 0.2) is None
        waited = time.monotonic() - started
    assert waited >= 3 * 0.2


def test_a_directory_unchanged_over_a_whole_wait_has_settled(tmp_path: Path) -> None:
    with Writer(tmp_path):
        time.sleep(0.1)
    # Just written: too new by its change times, so it is looked at twice, a wait apart.
    started = time.monotonic()
    marker = model_versions.settled_marker(tmp_path, 0.2)
    waited = time.monotonic() - started
    assert marker is not None
    assert marker == model_versions._signature(tmp_path)
    assert tuple(entry[0] for entry in marker if entry[0] != ".") == (
        "variables.data-00000-of-00001",
    )
    assert 0.2 <= waited < 0.6


def test_a_directory_changed_long_enough_ago_settles_at_once(tmp_path: Path) -> None:
    (tmp_path / "saved_model.pb").write_bytes(b"graph")
    time.sleep(0.3)
    started = time.monotonic()
    marker = model_versions.settled_marker(tmp_path, 0.2)
    # No wait: its newest change is already older than the settle time.
    assert time.monotonic() - started < 0.2
    assert marker == model_versions._signature(tmp_path)


async def test_a_version_still_being_written_is_loaded_once_it_settles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(model_versions, "SETTLE_ROUNDS", 2)
    add_version(tmp_path, 1)
    manager, loader, recorder = manager_for(tmp_path, settle_s=0.2)
    assert await manager.poll_once() == 1
    add_version(tmp_path, 2)
    with Writer(tmp_path / "2"), caplog.at_level(logging.INFO, logger=model_versions.__name__):
        assert await manager.poll_once() is None
    assert "mnist version 2 is still being written; loading it later" in caplog.text
    assert loader.calls == [1]
    assert states(manager) == [(1, "AVAILABLE", True)]
    assert await manager.poll_once() == 2
    assert loader.calls == [1, 2]
    assert recorder.loads == [(1, True), (2, True)]


# -- training records: what clients could not be sent refuses the version -----------

RECORD = models.TRAINING_RECORD.as_posix()


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("x" * 100_000, "1 to 256 characters expected, got 100000"),
        ("x" * 257, "1 to 256 characters expected, got 257"),
        ("", "1 to 256 characters expected, got 0"),
        ("two\nlines", "control characters are not allowed in a class name"),
        ("tab\there", "control characters are not allowed in a class name"),
        ("nul\x00", "control characters are not allowed in a class name"),
        ("del\x7f", "control characters are not allowed in a class name"),
        ("next\x85line", "control characters are not allowed in a class name"),
        ("line\u2028separator", "control characters are not allowed in a class name"),
        ("right\u202eto left", "control characters are not allowed in a class name"),
        (None, "a string expected, got NoneType"),
        ({"en": "cat"}, "a string expected, got dict"),
        (["cat"], "a string expected, got list"),
    ],
)
def test_bad_class_names_refuse_the_version(name: object, problem: str) -> None:
    with pytest.raises(models.ModelLoadError) as caught:
        models.class_names_of({"class_names": ["cat", name, "owl"]}, 3)
    assert str(caught.value) == f"{RECORD}: class_names[1]: {problem}"


def test_class_names_up_to_the_limit_are_served() -> None:
    assert models.MAX_CLASS_NAME_CHARS == 256
    names = ["x" * 256, "chat noir", "😀"]
    assert models.class_names_of({"class_names": names}, 3) == tuple(names)


def test_a_wrong_number_of_class_names_is_only_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=models.__name__):
        # Not checked either: they will not be served.
        assert models.class_names_of({"class_names": ["x" * 100_000, "\x00"]}, 3) == ()
        assert models.class_names_of({"class_names": "cat,dog,owl"}, 3) == ()
        assert models.class_names_of({}, 3) == ()
    assert [r.getMessage() for r in caplog.records] == [
        "training record: 3 class_names expected, ignoring 2 names",
        "training record: 3 class_names expected, ignoring str",
    ]


def test_a_lone_surrogate_class_name_refuses_the_version(tmp_path: Path) -> None:
    # JSON can spell half of a UTF-16 pair; no protocol can send it.
    (tmp_path / "assets.extra").mkdir()
    (tmp_path / models.TRAINING_RECORD).write_text('{"class_names": ["0", "1", "\\ud800"]}')
    with pytest.raises(models.ModelLoadError) as caught:
        models.read_record(tmp_path)
    assert str(caught.value) == (
        f"{RECORD}.class_names[2]: not valid Unicode text (surrogates not allowed at character 0)"
    )
    # A whole pair is one character, and fine.
    (tmp_path / models.TRAINING_RECORD).write_text('{"class_names": ["0", "1", "\\ud83d\\ude00"]}')
    record = models.read_record(tmp_path)
    assert models.class_names_of(record, 3) == ("0", "1", "😀")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"test_accuracy": "abc"},
            f"{RECORD}: test_accuracy: a float expected: could not convert string to float: 'abc'",
        ),
        (
            {"train_examples": 1e30},
            f"{RECORD}: train_examples: 1000000000000000019884624838656 does not fit int64",
        ),
        (
            {"total_parameters": 2**63},
            f"{RECORD}: total_parameters: 9223372036854775808 does not fit int64",
        ),
        ({"dataset": ["sample"]}, f"{RECORD}: dataset: a str expected, got list"),
        ({"training_time_s": {"s": 1}}, f"{RECORD}: training_time_s: a float expected, got dict"),
        (
            {"layers": [{"output_shape": [None]}]},
            f"{RECORD}: layers[0].output_shape: a list of non-negative integers expected",
        ),
        (
            {"layers": [{"name": "conv1", "output_shape": [26, 26, 32]}, {"output_shape": [-1]}]},
            f"{RECORD}: layers[1].output_shape: a list of non-negative integers expected",
        ),
        (
            {"layers": [{"output_shape": [True]}]},
            f"{RECORD}: layers[0].output_shape: a list of non-negative integers expected",
        ),
        (
            {"layers": [{"output_shape": "26x26"}]},
            f"{RECORD}: layers[0].output_shape: a list of non-negative integers expected",
        ),
        ({"layers": "x"}, f"{RECORD}: layers: a list expected"),
        (
            {"layers": [{"trainable": "no"}]},
            f"{RECORD}: layers[0].trainable: true or false expected",
        ),
        ({"layers": [5]}, f"{RECORD}: layers[0]: an object expected, got int"),
        (
            {"layers": [{"parameters": 1.5}]},
            f"{RECORD}: layers[0].parameters: a non-negative integer expected",
        ),
        ({"layers": [{"type": ["Conv2D"]}]}, f"{RECORD}: layers[0].type: a string expected"),
        (
            {"hyperparameters": {"\ud800": "1"}},
            f"{RECORD}.hyperparameters (a key): not valid Unicode text "
            "(surrogates not allowed at character 0)",
        ),
        (
            {"model_card": {"source": ["ok", "bad \udfff"]}},
            f"{RECORD}.model_card.source[1]: not valid Unicode text "
            "(surrogates not allowed at character 4)",
        ),
    ],
)
def test_malformed_records_name_the_field(record: dict[str, Any], message: str) -> None:
    with pytest.raises(models.ModelLoadError) as caught:
        models.check_record(record)
    assert str(caught.value) == message


def test_infinite_counts_are_refused() -> None:
    # Python's JSON reads Infinity, and int() of it raises OverflowError.
    with pytest.raises(models.ModelLoadError, match=rf"^{RECORD}: train_examples: .*infinity"):
        models.check_record(json.loads('{"train_examples": Infinity}'))


def test_a_record_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    (tmp_path / "assets.extra").mkdir()
    path = tmp_path / models.TRAINING_RECORD
    frame = '{"model_card": ""}'
    # Exactly the limit is read; one byte more is not.
    path.write_text(frame[:-2] + "x" * (models.MAX_RECORD_BYTES - len(frame)) + frame[-2:])
    assert path.stat().st_size == models.MAX_RECORD_BYTES == 1 << 20
    assert len(models.read_record(tmp_path)["model_card"]) == models.MAX_RECORD_BYTES - len(frame)
    path.write_text(frame[:-2] + "x" * (models.MAX_RECORD_BYTES + 1 - len(frame)) + frame[-2:])
    with pytest.raises(models.ModelLoadError) as caught:
        models.read_record(tmp_path)
    assert str(caught.value) == f"{RECORD} is larger than 1048576 bytes"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "cannot read assets.extra/training_record.json: "),
        (b'{"dataset": "\xff"}', "'utf-8' codec can't decode byte 0xff"),
        (b'{"dataset": "samp', "cannot read assets.extra/training_record.json: "),
        (b"[1, 2]", "assets.extra/training_record.json must hold a JSON object"),
    ],
)
def test_unreadable_records_are_refused(tmp_path: Path, raw: bytes, fragment: str) -> None:
    (tmp_path / "assets.extra").mkdir()
    (tmp_path / models.TRAINING_RECORD).write_bytes(raw)
    with pytest.raises(models.ModelLoadError) as caught:
        models.read_record(tmp_path)
    assert fragment in str(caught.value)


def test_no_record_is_an_empty_one(tmp_path: Path) -> None:
    assert models.read_record(tmp_path) == {}
    assert models.record_marker(tmp_path) is None


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


# -- memory: batches sized to --max-model-memory-bytes ------------------------------

MNIST_SIGNATURE = models.ModelSignature("images", (28, 28, 1), "probabilities", 10)
# A row's float32 input and output: 4 * (28*28*1 + 10) bytes.
IO_ROW = 3176


def test_plan_memory_fits_the_rows_to_the_budget() -> None:
    # 5 engine copies (2 in the server, 3 in workers) of 10,000 bytes a row and 5,000
    # fixed; the 3 workers' shared regions and the server's 2 batch buffers hold the
    # input and output rows again: 5 * 10,000 + 5 * 3,176 = 65,880 bytes a row.
    fixed, per_row = 5 * 5_000, 65_880

    def plan(budget: int, max_batch_size: int = 64) -> engines.MemoryPlan:
        limits = models.MemoryLimits(budget, max_batch_size, engine_copies=2, worker_copies=3)
        return models.plan_memory(MNIST_SIGNATURE, limits, row_bytes=10_000, fixed_bytes=5_000)

    assert plan(fixed + 8 * per_row - 1) == engines.MemoryPlan(7, fixed + 7 * per_row)
    assert plan(fixed + 8 * per_row) == engines.MemoryPlan(8, fixed + 8 * per_row)
    assert plan(fixed + per_row) == engines.MemoryPlan(1, 90_880)
    assert plan(10**12) == engines.MemoryPlan(64, fixed + 64 * per_row)
    assert plan(10**12, max_batch_size=4) == engines.MemoryPlan(4, fixed + 4 * per_row)
    with pytest.raises(models.ModelLoadError) as caught:
        plan(fixed + per_row - 1)
    assert str(caught.value) == (
        "input 28x28x1 needs 90,880 bytes of buffers for one image (5 engine copies of "
        "10,000 bytes per image and 5,000 fixed), over the memory budget of 90,879 bytes "
        "(--max-model-memory-bytes)"
    )


def test_plan_memory_counts_at_least_the_input_and_output_rows() -> None:
    # Tensors smaller than the row itself (or unknown, 0) still hold the input and output.
    limits = models.MemoryLimits(100_000, 64)
    per_row = IO_ROW + 2 * IO_ROW
    assert models.plan_memory(MNIST_SIGNATURE, limits, row_bytes=100) == engines.MemoryPlan(
        100_000 // per_row, 100_000 // per_row * per_row
    )
    assert models.plan_memory(MNIST_SIGNATURE, limits) == engines.MemoryPlan(10, 95_280)


def test_an_image_larger_than_the_budget_is_refused() -> None:
    huge = models.ModelSignature("images", (4096, 4096, 64), "probabilities", 10)
    with pytest.raises(models.ModelLoadError) as caught:
        models.plan_memory(huge, models.MemoryLimits(1 << 30, 64, engine_copies=2))
    assert str(caught.value) == (
        "input 4096x4096x64 needs 17,179,869,344 bytes of buffers for one image (2 engine "
        "copies of 4,294,967,336 bytes per image), over the memory budget of 1,073,741,824 "
        "bytes (--max-model-memory-bytes)"
    )


@pytest.fixture(scope="module")
def mnist_tensor_bytes(model_base_path: Path) -> tuple[int, int]:
    """(bytes per image, fixed bytes) of the shared model's LiteRT tensors."""
    module = tf.saved_model.load(str(model_base_path / "1"))
    return litert.tensor_bytes(litert.convert(module), (28, 28, 1))


@pytest.mark.slow
def test_litert_tensor_bytes_count_more_than_the_input_row(
    model_base_path: Path, mnist_tensor_bytes: tuple[int, int]
) -> None:
    row_bytes, fixed_bytes = mnist_tensor_bytes
    assert row_bytes > 28 * 28 * 4
    # The float32 weights do not grow with the batch.
    parameters = models.read_record(model_base_path / "1")["total_parameters"]
    assert fixed_bytes >= 4 * parameters


@pytest.mark.slow
def test_litert_tensor_bytes_count_the_activations_of_each_row(
    mnist_tensor_bytes: tuple[int, int],
) -> None:
    # conv1's output alone is 28x28x32 float32 per image (the training record's table).
    assert mnist_tensor_bytes[0] >= 28 * 28 * 32 * 4


@pytest.mark.slow
def test_a_memory_budget_limits_the_rows_of_a_batch(
    model_base_path: Path,
    mnist_tensor_bytes: tuple[int, int],
    sample_digits: tuple[np.ndarray, np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    row_bytes, fixed_bytes = mnist_tensor_bytes
    copies = 2 + 3
    per_row = copies * max(row_bytes, IO_ROW) + (3 + 2) * IO_ROW
    budget = copies * fixed_bytes + 3 * per_row + per_row // 2
    limits = models.MemoryLimits(
        budget_bytes=budget, max_batch_size=64, engine_copies=2, worker_copies=3
    )
    plan = models.plan_memory(MNIST_SIGNATURE, limits, row_bytes=row_bytes, fixed_bytes=fixed_bytes)
    assert plan == engines.MemoryPlan(3, copies * fixed_bytes + 3 * per_row)
    with caplog.at_level(logging.WARNING, logger=models.__name__):
        model = models.load_model(
            "mnist",
            1,
            model_base_path / "1",
            "/CPU:0",
            (1, 2, 4, 8, 16),
            engine="litert",
            engine_copies=2,
            memory=limits,
        )
    assert model.engine.name == "litert"
    assert model.max_rows == 3
    assert model.memory_bytes == plan.bytes
    assert model.memory_bytes <= budget
    assert f"mnist version 1: batches limited to 3 images by the memory budget ({budget} bytes)" \
        in caplog.text  # fmt: skip
    images = float_digits(sample_digits[0][:3])
    got = model.predict(images)
    assert got.shape == (3, 10)
    assert np.max(np.abs(got - model.predict_tensorflow(images))) <= engines.PARITY_TOLERANCE


@pytest.mark.slow
def test_a_budget_too_small_for_one_image_refuses_the_version_before_warm_up(
    model_base_path: Path, mnist_tensor_bytes: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    warmed: list[object] = []
    monkeypatch.setattr(models, "run_warmup_requests", lambda *args: warmed.append(args))
    limits = models.MemoryLimits(20_000, 64, engine_copies=2, worker_copies=3)
    with pytest.raises(models.ModelLoadError) as caught:
        models.load_model(
            "mnist", 1, model_base_path / "1", "/CPU:0", engine="litert", memory=limits
        )
    assert str(caught.value) == (
        "input 28x28x1 needs 31,760 bytes of buffers for one image (5 engine copies of 3,176 "
        "bytes per image), over the memory budget of 20,000 bytes (--max-model-memory-bytes)"
    )
    # Enough for the input and output rows, not for the converted model's tensors.
    row_bytes, fixed_bytes = mnist_tensor_bytes
    needed = 5 * fixed_bytes + 5 * max(row_bytes, IO_ROW) + 5 * IO_ROW
    limits = models.MemoryLimits(needed - 1, 64, engine_copies=2, worker_copies=3)
    with pytest.raises(models.ModelLoadError) as caught:
        models.load_model(
            "mnist", 1, model_base_path / "1", "/CPU:0", engine="litert", memory=limits
        )
    assert str(caught.value) == (
        f"input 28x28x1 needs {needed:,} bytes of buffers for one image (5 engine copies of "
        f"{max(row_bytes, IO_ROW):,} bytes per image and {fixed_bytes:,} fixed), over the "
        f"memory budget of {needed - 1:,} bytes (--max-model-memory-bytes)"
    )
    assert warmed == []


# -- real exports: version directories and training records ---------------------------


@pytest.mark.slow
async def test_the_runtime_serves_a_version_from_a_zero_padded_directory(
    model_base_path: Path, tmp_path: Path, sample_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    shutil.copytree(model_base_path / "1", tmp_path / "0002")
    settings = make_settings(tmp_path, engine_workers="thread", version_settle_s=0.0)
    runtime, _ = await started_runtime(settings)
    try:
        manager = runtime.manager
        assert manager.settle_s == 0.0
        assert manager.serving is not None
        assert manager.serving.version == 2
        assert manager.path_of(2) == tmp_path / "0002"
        assert manager.serving.path == tmp_path / "0002"
        images, labels = sample_digits
        out = await runtime.predict(types.PredictInput(images[:8]), deadline=None)
        assert out.model_version == 2
        assert np.mean(out.digits == labels[:8]) >= 0.75
    finally:
        await runtime.stop(5)


def edit_record(version_dir: Path, **changes: Any) -> None:
    path = version_dir / models.TRAINING_RECORD
    record = json.loads(path.read_text())
    record.update(changes)
    # ensure_ascii: a lone surrogate is written as its JSON escape, e.g. \ud800.
    path.write_text(json.dumps(record))


@pytest.mark.slow
def test_real_versions_with_bad_records_are_refused(model_base_path: Path, tmp_path: Path) -> None:
    surrogate = shutil.copytree(model_base_path / "1", tmp_path / "2")
    edit_record(surrogate, class_names=[str(d) for d in range(9)] + ["\ud800"])
    assert '"\\ud800"' in (surrogate / models.TRAINING_RECORD).read_text()
    with pytest.raises(models.ModelLoadError) as caught:
        models.load_model("mnist", 2, surrogate, "/CPU:0")
    assert str(caught.value) == (
        f"{RECORD}.class_names[9]: not valid Unicode text (surrogates not allowed at character 0)"
    )

    long_name = shutil.copytree(model_base_path / "1", tmp_path / "3")
    edit_record(long_name, class_names=["x" * 100_000] + [str(d) for d in range(1, 10)])
    with pytest.raises(models.ModelLoadError, match=r"class_names\[0\]: 1 to 256 characters"):
        models.load_model("mnist", 3, long_name, "/CPU:0")

    bad_layers = shutil.copytree(model_base_path / "1", tmp_path / "4")
    edit_record(bad_layers, layers="x")
    with pytest.raises(models.ModelLoadError) as caught:
        models.load_model("mnist", 4, bad_layers, "/CPU:0")
    assert str(caught.value) == f"{RECORD}: layers: a list expected"


@pytest.mark.slow
def test_a_real_version_with_the_wrong_number_of_class_names_serves_indices(
    model_base_path: Path, tmp_path: Path
) -> None:
    version = shutil.copytree(model_base_path / "1", tmp_path / "1")
    edit_record(version, class_names=["zero", "one", "two"])
    model = models.load_model("mnist", 1, version, "/CPU:0")
    assert model.class_names == ()
    assert model.record["class_names"] == ["zero", "one", "two"]
    assert model.predict(np.zeros((1, 28, 28, 1), np.float32)).shape == (1, 10)


@pytest.mark.slow
async def test_a_real_versions_assets_copied_in_after_it_loaded_are_read(
    model_base_path: Path, tmp_path: Path
) -> None:
    base = tmp_path / "mnist"
    version = shutil.copytree(model_base_path / "1", base / "1")
    # A copy that brings assets.extra last: the version loads before its record arrives.
    held = shutil.move(version / "assets.extra", tmp_path / "held")
    manager = model_versions.ModelManager(base, "mnist", "/CPU:0", settle_s=0.0)
    assert await manager.poll_once() == 1
    model = manager.serving
    assert model is not None
    assert model.class_names == ()
    assert model.record == {}
    shutil.copytree(held, version / "assets.extra")
    assert await manager.poll_once() is None
    assert manager.serving is model
    assert model.class_names == tuple(str(d) for d in range(10))
    assert model.record["dataset"] == "sample"
    assert model.metadata((1,)).training["model_name"] == "mnist"
