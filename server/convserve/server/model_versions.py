"""A model's versions: discovery under its base path, polling, labels, leases and swaps.

A model base path holds one directory per version (a positive integer name);
anything else (hidden export temp dirs, files, other names) is ignored. The
`ModelManager` loads versions with its loader (`models.load_model` through
`served.ServedModel`), serves the newest version that loaded and warmed up,
keeps the `keep_versions` newest loaded versions pinnable, and hands out
leases: a request holds a lease on its version while it runs, so a version
swapped out is released only after its last request has finished. A request
names its version by number, by a version label of the model config file
(`ModelManager.set_labels`), or neither (the serving version).

About 700 lines, on purpose: the manager's one state machine (polling, version
policy, labels, leases, retries) reads best in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convserve.server import errors, types
from convserve.server.blocking import run_detached
from convserve.server.models import (
    LoadedModel,
    ModelLoadError,
    class_names_of,
    load_model,
    read_record,
    record_marker,
)

log = logging.getLogger(__name__)

KEEP_VERSIONS = 2
# The largest version number: versions are int64 everywhere they travel.
MAX_VERSION = 2**63 - 1
# Entries of a version directory its change marker looks at, at most.
SIGNATURE_MAX_ENTRIES = 10_000
# Characters of a load error that clients may see (ListModels, GetModelStatus).
MAX_ERROR_CHARS = 500
# Seconds nothing in a new version directory may have changed (by change time, which
# copying tools cannot backdate) before it is loaded: a version copied in file by file
# is loaded whole, not while its assets are still arriving.
VERSION_SETTLE_S = 1.0
# Rounds of waiting for a version that keeps changing, per poll; after them the poll
# moves on and the next one looks again.
SETTLE_ROUNDS = 5
# Version labels that mean the serving version unless the model config file defines
# them: "latest" as its name says, "stable" for clients written before labels existed.
IMPLICIT_LABELS = ("latest", "stable")
_LABEL_HINT = (
    "a label may point only at a loaded version unless the server runs with "
    "--allow-version-labels-for-unavailable-models"
)


def discover_versions(base_path: Path) -> list[int]:
    """The version numbers under `base_path`, ascending (see `version_dirs`)."""
    return sorted(version_dirs(base_path))


def version_dirs(base_path: Path) -> dict[int, str]:
    """{version number: directory name} of the versions under `base_path`.

    Only directories named by a positive integer that fits int64 count (TF
    Serving's version numbers are int64, and so are every protocol's version
    fields); anything else is ignored, as TF Serving ignores it. Leading zeros
    are allowed, as TF Serving parses the name as a number (``0002/`` is
    version 2); when two directories name the same number, the one without
    leading zeros is the version, and padded twins without it are ignored with a
    warning (which one was meant cannot be told).
    """
    try:
        entries = list(base_path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:  # e.g. no permission: nothing loadable, and say why
        log.warning("cannot list %s: %s", base_path, exc)
        return {}
    found: dict[int, list[str]] = {}
    for entry in entries:
        name = entry.name
        if not name.isascii() or not name.isdigit() or not entry.is_dir():
            continue
        # Compared as text first: int() of a name of thousands of digits is slow.
        if len(name.lstrip("0")) > len(str(MAX_VERSION)):
            continue
        number = int(name)
        if 0 < number <= MAX_VERSION:
            found.setdefault(number, []).append(name)
    versions: dict[int, str] = {}
    for number, names in found.items():
        canonical = str(number)
        if canonical in names or len(names) == 1:
            versions[number] = canonical if canonical in names else names[0]
        else:
            log.warning("%s: directories %s all name version %d; ignored until one remains",
                        base_path, sorted(names), number)  # fmt: skip
    return versions


def base_path_problem(base_path: Path) -> str:
    """Why `base_path` holds no version directories, for operators and clients (no path)."""
    try:
        if not base_path.exists():
            return "the base path does not exist"
        if not base_path.is_dir():
            return "the base path is not a directory"
        next(iter(base_path.iterdir()), None)
    except OSError as exc:
        return f"the base path cannot be read ({exc.strerror or type(exc).__name__})"
    return "no version directories (<base_path>/<version>/) under the base path"


Marker = tuple[tuple[str, int, int, int], ...]


def _signature(path: Path) -> Marker:
    """A change marker for a version dir: a failed version is retried once it changes.

    Every entry below it counts (path, mtime, change time, size), the
    directory itself included, not saved_model.pb alone: a version refused
    because it was read while still being copied in becomes eligible again
    once any of its files changes. At most `SIGNATURE_MAX_ENTRIES` entries
    are read.
    """
    entries: list[tuple[str, int, int, int]] = []
    try:
        top = os.lstat(path)
    except OSError:
        return ()
    entries.append((".", top.st_mtime_ns, top.st_ctime_ns, 0))
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            full = os.path.join(root, name)
            try:
                stat = os.lstat(full)
            except OSError:
                continue
            entries.append(
                (os.path.relpath(full, path), stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
            )
            if len(entries) >= SIGNATURE_MAX_ENTRIES:
                return tuple(sorted(entries))
    return tuple(sorted(entries))


def settled_marker(path: Path, settle_s: float = VERSION_SETTLE_S) -> Marker | None:
    """The version's marker once nothing in it has changed for `settle_s` (blocking).

    Returns at once when its newest change time is `settle_s` old; else waits
    and looks again: a marker unchanged over a whole wait also counts as
    settled (a file server whose clock runs ahead never looks settled by its
    times alone). None if it still changes after `SETTLE_ROUNDS` waits.
    """
    marker = _signature(path)
    for _ in range(SETTLE_ROUNDS):
        newest = max((entry[2] for entry in marker), default=0) / 1e9
        if time.time() - newest >= settle_s:
            return marker
        time.sleep(settle_s)
        again = _signature(path)
        if again == marker:
            return marker
        marker = again
    return None


def _discard(model: LoadedModel) -> None:
    """Drop a version that was loaded but will never serve: its engine's processes go now."""
    model.engine.close()


def _discard_load(loading: asyncio.Future[LoadedModel]) -> None:
    if not loading.cancelled() and loading.exception() is None:
        _discard(loading.result())


@dataclass(frozen=True)
class LabelState:
    """A model's version labels: as configured, as in effect, and why some are not.

    Replaced whole (one assignment), so that a request resolving a label sees
    one configuration of them, never half of an update.
    """

    configured: Mapping[str, int] = field(default_factory=dict)
    effective: Mapping[str, int] = field(default_factory=dict)
    # label -> why it does not point at its configured version.
    problems: Mapping[str, str] = field(default_factory=dict)


class ModelManager:
    """Serves the newest good version under `base_path`; loads new ones in the background.

    Without a `policy`, the newest version that loads serves and the
    `keep_versions` newest loaded stay pinnable (a new version is loaded only
    when it is newer than the serving one). With a `model_config.VersionPolicy`
    (TF Serving's latest N / all / specific), exactly the versions it selects
    among those on disk are loaded; the newest loaded one serves.

    Version labels (`labels`, `set_labels`) follow TF Serving's rule: a label
    points only at a loaded version, unless `allow_unavailable_labels` (then
    requests by it get UNAVAILABLE until its version loads). A label whose
    version is not loaded is refused (logged once at ERROR, reported in
    `label_errors`) and keeps the version it had, if that is still loaded;
    labels are checked again after every poll, so a refused one takes effect
    once its version has loaded.
    """

    def __init__(
        self,
        base_path: Path,
        name: str,
        device: str,
        *,
        on_loaded: Callable[[str, int, bool], None] | None = None,
        on_serving: Callable[[LoadedModel, int], None] | None = None,
        keep_versions: int = KEEP_VERSIONS,
        loader: Callable[[str, int, Path, str], LoadedModel] = load_model,
        policy: Any = None,
        settle_s: float = VERSION_SETTLE_S,
        labels: Sequence[tuple[str, int]] = (),
        allow_unavailable_labels: bool = False,
    ) -> None:
        self.base_path = Path(base_path)
        self.name = name
        self.device = device
        self.keep_versions = max(1, keep_versions)
        self.policy = policy
        self._on_loaded = on_loaded
        self._on_serving = on_serving
        self._loader = loader
        self._loaded: dict[int, LoadedModel] = {}
        self._serving: LoadedModel | None = None
        self.settle_s = settle_s
        # Versions that failed, with the marker of the files that failed, and why.
        self._failed: dict[int, Marker] = {}
        self._errors: dict[int, str] = {}
        # Each version's directory name, from the last listing (``0002/`` is version 2).
        self._dirs: dict[int, str] = {}
        # What is wrong with the base path itself ("" while it lists versions).
        self._path_problem = ""
        self._loading: int | None = None
        self._closed = False
        # Retired versions some request still holds.
        self._unloading: dict[int, LoadedModel] = {}
        self._poll_lock = asyncio.Lock()
        self._state_lock = threading.Lock()
        self.allow_unavailable_labels = allow_unavailable_labels
        # Checked against the loaded versions at the end of the first poll: before it,
        # nothing is loaded and every label would be refused.
        self._labels = LabelState(configured=dict(labels))
        # label -> the version its refusal was logged for (logged once per version).
        self._refused: dict[str, int] = {}

    @property
    def serving(self) -> LoadedModel | None:
        return self._serving

    @property
    def loaded_versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._loaded))

    @property
    def unloading(self) -> tuple[LoadedModel, ...]:
        """Retired versions some request still holds."""
        return tuple(self._unloading.values())

    @property
    def loaded(self) -> tuple[LoadedModel, ...]:
        """Every loaded version (serving or pinnable), oldest first."""
        return tuple(self._loaded[v] for v in sorted(self._loaded))

    def status(self) -> tuple[types.VersionStatus, ...]:
        """Each version's state, ascending: loading, available, unloading or refused (END)."""
        states: dict[int, types.VersionStatus] = {}
        for version, error in self._errors.items():
            states[version] = types.VersionStatus(version, "END", error=error)
        for version in list(self._unloading):
            states[version] = types.VersionStatus(version, "UNLOADING")
        for version in list(self._loaded):
            serving = self._serving is not None and self._serving.version == version
            states[version] = types.VersionStatus(version, "AVAILABLE", serving=serving)
        loading = self._loading
        if loading is not None:
            states[loading] = types.VersionStatus(loading, "LOADING")
        return tuple(states[v] for v in sorted(states))

    @property
    def labels(self) -> tuple[tuple[str, int], ...]:
        """The version labels in effect, (label, version) by label."""
        return tuple(sorted(self._labels.effective.items()))

    @property
    def label_errors(self) -> tuple[str, ...]:
        """Why configured labels are not in effect as configured, one line each, by label."""
        problems = self._labels.problems
        return tuple(problems[label] for label in sorted(problems))

    def set_labels(self, labels: Sequence[tuple[str, int]]) -> None:
        """Configure the version labels (label, version) and apply them at once, as far as
        the loaded versions allow (see the class docstring). Call on the event loop."""
        configured = dict(labels)
        for label in sorted(set(self._labels.configured) - set(configured)):
            log.info("model %s: version label %r removed", self.name, label)
        self._update_labels(configured)

    def _update_labels(self, configured: Mapping[str, int] | None = None) -> None:
        """Point each label `configured` (None: as configured so far) at its version if it
        may (see the class docstring), and swap the new labels in at once."""
        before = self._labels
        if configured is None:
            configured = before.configured
        loaded = sorted(self._loaded)
        effective: dict[str, int] = {}
        problems: dict[str, str] = {}
        for label, version in sorted(configured.items()):
            previous = before.effective.get(label)
            if version in self._loaded or self.allow_unavailable_labels:
                effective[label] = version
                was = f" (was {previous})" if previous is not None else ""
                if self._refused.pop(label, None) == version:
                    log.info("model %s: version label %r -> %d now in effect%s: version %d "
                             "has loaded", self.name, label, version, was, version)  # fmt: skip
                elif previous != version and version not in self._loaded:
                    log.warning("model %s: version label %r -> %d%s, a version that is not "
                                "loaded: requests by the label get UNAVAILABLE until it is",
                                self.name, label, version, was)  # fmt: skip
                elif previous != version:
                    log.info("model %s: version label %r -> %d%s", self.name, label, version, was)
                continue
            kept = previous if previous in self._loaded else None
            stays = f"stays on version {kept}" if kept is not None else "is not in effect"
            problems[label] = (
                f"model {self.name}: version label {label!r} -> {version} not applied: version "
                f"{version} is not loaded (loaded: {', '.join(map(str, loaded)) or 'none'}); "
                f"{label!r} {stays}"
            )
            if kept is not None:
                effective[label] = kept
            if self._refused.get(label) != version:
                self._refused[label] = version
                log.error("%s (%s)", problems[label], _LABEL_HINT)
        for label in [name for name in self._refused if name not in configured]:
            del self._refused[label]
        # One assignment: a request sees the labels before or after, never a mixture.
        self._labels = LabelState(configured=configured, effective=effective, problems=problems)

    def path_of(self, version: int) -> Path:
        """The directory of `version` (as the last listing named it)."""
        return self.base_path / self._dirs.get(version, str(version))

    def _known_bad(self, version: int) -> bool:
        failed = self._failed.get(version)
        return failed is not None and failed == _signature(self.path_of(version))

    def _candidates(self, available: list[int]) -> list[int]:
        """Versions to load now, newest first (not loaded and not known to fail)."""
        if self.policy is not None:
            wanted = self.policy.select(available)
            return [v for v in reversed(wanted) if v not in self._loaded and not self._known_bad(v)]
        current = self._serving.version if self._serving is not None else 0
        out = []
        for version in reversed(available):
            if version <= current:
                break
            if self._known_bad(version):
                continue
            out.append(version)
        return out

    async def poll_once(self) -> int | None:
        """Load the newest new version, if any, and swap it in.

        Tries newer versions newest first until one loads; returns the
        version now serving if it changed, else None. Failures are logged and
        counted; the serving version is untouched by them. A version is loaded
        once its directory has settled (`settled_marker`); one whose files
        change while it loads is loaded again at the next poll. Loaded
        versions pick up a training record that changed since they loaded, and
        without a policy, a serving version whose directory was deleted gives
        way to the newest one left on disk.
        """
        async with self._poll_lock:
            try:
                return await self._poll()
            finally:
                # The loaded versions may have changed: the labels follow.
                if not self._closed:
                    self._update_labels()

    async def _poll(self) -> int | None:
        """One `poll_once`, under its lock."""
        if self._closed:
            return None
        swapped: int | None = None
        # Listed once per poll (every decision below sees the same versions), and
        # off the event loop, as are the change markers: in threads that cannot
        # hold the process at exit (a hung file system).
        self._dirs = await run_detached(version_dirs, self.base_path, name="list-versions")
        available = sorted(self._dirs)
        await self._note_problem(available)
        await self._refresh_records()
        for version in await run_detached(self._candidates, available, name="candidates"):
            model = await self._load(version)
            if model is None:
                continue
            if self._closed:
                _discard(model)  # released while it loaded
                return None
            changed = self._swap_in(model)
            if self.policy is None:
                return version
            if changed:
                swapped = version
        if self.policy is not None:
            swapped = self._apply_policy(available) or swapped
        elif available and self._serving is not None and self._serving.version not in available:
            swapped = await self._roll_back(available)
        return swapped

    async def _note_problem(self, available: list[int]) -> None:
        """Keep the base path's problem current; log it at ERROR when it changes."""
        if available:
            problem = ""
        else:
            problem = await run_detached(base_path_problem, self.base_path, name="base-path")
        if problem and problem != self._path_problem:
            log.error("%s: %s (%s)", self.name, problem, self.base_path)
        self._path_problem = problem

    def why_not_serving(self) -> str:
        """Why no version serves, as clients may see it (no server paths); "" while one
        does, or while the first one is still loading."""
        if self._serving is not None:
            return ""
        if self._path_problem:
            return self._path_problem
        if self._errors:
            newest = max(self._errors)
            return f"no version loads (version {newest}: {self._errors[newest]})"
        return ""

    async def _refresh_records(self) -> None:
        """Read again the training record of a loaded version whose record changed (its
        assets were copied in after its variables): class names and metadata follow it.
        A record that cannot be used now is logged and the one read at load is kept."""
        for model in self.loaded:
            marker = await run_detached(record_marker, model.path, name="record")
            if marker == model.record_marker:
                continue
            try:
                record = await run_detached(read_record, model.path, name="record")
                names = class_names_of(record, model.signature.classes)
            except ModelLoadError as exc:
                log.error("%s version %d: the changed training record is not used: %s",
                          self.name, model.version, exc)  # fmt: skip
            else:
                model.record, model.class_names = record, names
                log.info("%s version %d: training record read again (%d class names)",
                         self.name, model.version, len(names))  # fmt: skip
            model.record_marker = marker

    async def _roll_back(self, available: list[int]) -> int | None:
        """The serving version's directory is gone: the newest version left serves (loaded
        if it is not yet); until one does, the gone one serves on."""
        gone = self._serving
        assert gone is not None
        for version in reversed(available):
            model = self._loaded.get(version) or await self._load(version)
            if model is None:
                continue
            if self._closed:
                return None
            log.warning("%s: version %d was deleted from disk; rolling back to version %d",
                        self.name, gone.version, version)  # fmt: skip
            self._loaded[version] = model
            for old in [v for v in self._loaded if v not in available]:
                self._retire(self._loaded.pop(old))
            self._serving = model
            if self._on_serving is not None:
                self._on_serving(model, len(self._loaded))
            return version
        return None

    async def _load(self, version: int) -> LoadedModel | None:
        """Load one version once it has settled (None: refused, logged and counted, or
        still being written)."""
        path = self.path_of(version)
        marker = await run_detached(settled_marker, path, self.settle_s, name="settle")
        if marker is None:
            log.info("%s version %d is still being written; loading it later", self.name, version)
            return None
        self._loading = version
        # A thread cannot be stopped: if this poll is cancelled, the load runs on and
        # its result is released when it ends.
        loading = asyncio.ensure_future(
            run_detached(self._loader, self.name, version, path, self.device, name="load")
        )
        try:
            model = await asyncio.shield(loading)
            after = await run_detached(_signature, path, name="settle")
        except asyncio.CancelledError:
            loading.add_done_callback(_discard_load)
            raise
        except Exception as exc:
            self._failed[version] = marker
            self._errors[version] = self._shown_error(exc)
            log.error("%s version %d refused: %s", self.name, version, exc)
            if self._on_loaded is not None:
                self._on_loaded(self.name, version, False)
            return None
        finally:
            self._loading = None
        if after != marker:
            # Files arrived or changed while it loaded: what loaded may be half of it.
            _discard(model)
            log.info("%s version %d changed while it loaded; loading it again later",
                     self.name, version)  # fmt: skip
            return None
        self._failed.pop(version, None)
        self._errors.pop(version, None)
        log.info("%s version %d loaded and warmed up from %s", self.name, version, path)
        if self._on_loaded is not None:
            self._on_loaded(self.name, version, True)
        return model

    def _shown_error(self, exc: Exception) -> str:
        """Why a version was refused, as clients may see it: no server paths, bounded."""
        text = str(exc).replace(str(self.base_path), "<base_path>")
        return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "…"

    def _apply_policy(self, available: list[int]) -> int | None:
        """Retire loaded versions the policy no longer selects, once one it selects is
        loaded (until then the old ones serve on: a bad or half-copied new version
        never leaves the model without a version). Returns the version now serving
        if that changed."""
        assert self.policy is not None
        wanted = set(self.policy.select(available))
        if not wanted & set(self._loaded):
            if self._loaded:
                log.warning("%s: no version of %s loads; still serving %s", self.name,
                            sorted(wanted), list(self.loaded_versions))  # fmt: skip
            return None
        before = self._serving
        for version in [v for v in self._loaded if v not in wanted]:
            self._retire(self._loaded.pop(version))
            if self._serving is not None and self._serving.version == version:
                self._serving = None
        if self._serving is None and self._loaded:
            # The policy dropped the serving version: the newest one left serves.
            self._swap_in(self._loaded[max(self._loaded)])
        return None if self._serving is before or self._serving is None else self._serving.version

    def _swap_in(self, model: LoadedModel) -> bool:
        """Add a loaded version; it serves if it is the newest. Returns whether it serves."""
        self._loaded[model.version] = model
        previous = self._serving
        if previous is not None and previous.version > model.version:
            # An older version the policy selects: pinnable, not the default.
            if self._on_serving is not None:
                self._on_serving(model, len(self._loaded))
            return False
        self._serving = model
        if self.policy is None:
            for version in sorted(self._loaded)[: -self.keep_versions]:
                self._retire(self._loaded.pop(version))
        log.info(
            "%s now serving version %d (previous %s; loaded %s)",
            self.name,
            model.version,
            previous.version if previous is not None else "none",
            list(self.loaded_versions),
        )
        if self._on_serving is not None:
            self._on_serving(model, len(self._loaded))
        return True

    def _retire(self, model: LoadedModel) -> None:
        model.retired = True
        self._unloading[model.version] = model
        log.info("%s version %d unloaded once its requests finish", self.name, model.version)
        self._maybe_release(model)

    def _maybe_release(self, model: LoadedModel) -> None:
        with self._state_lock:
            done = model.retired and model.leases == 0
            release = done and model.on_release is not None
            callback = model.on_release if release else None
            if release:
                model.on_release = None
            if done and self._unloading.get(model.version) is model:
                del self._unloading[model.version]
        if callback is not None:
            callback(model)

    def resolve(self, ref: types.ModelRef) -> LoadedModel:
        """The loaded version `ref` names: pinned by number, by version label, or the
        serving one when neither is given.

        Raises errors.NotFound for another model name, a version not loaded or
        a label the model does not have, errors.InvalidArgument when both a
        version and a label are given, errors.Unavailable when nothing serves
        yet or a configured label's version is not loaded.
        """
        if ref.name not in (None, "", self.name):
            raise errors.NotFound(
                f"model_spec.name: model {errors.shown(ref.name)} is not served here "
                f"(this serves {self.name!r})"
            )
        version = ref.version or None
        if ref.label:
            if version is not None:
                raise errors.InvalidArgument(
                    "model_spec",
                    f"a version or a version label expected, not both (got version {version} "
                    f"and version label {errors.shown(ref.label)})",
                )
            version = self._label_version(ref.label)
        if version is None:
            model = self._serving
            if model is None:
                raise errors.Unavailable(f"model {self.name!r} has no version ready yet")
            return model
        pinned = self._loaded.get(version)
        if pinned is None:
            loaded = list(self.loaded_versions)
            if ref.label:
                # Only a label the server was told to allow before its version loads.
                raise errors.Unavailable(
                    f"model {self.name!r} version label {errors.shown(ref.label)} -> {version}: "
                    f"version {version} is not loaded yet (loaded versions: {loaded})"
                )
            raise errors.NotFound(
                f"model {self.name!r} version {version} is not loaded (loaded versions: {loaded})"
            )
        return pinned

    def _label_version(self, label: str) -> int | None:
        """The version `label` points at (None: the serving version, for an implicit label).

        Raises errors.NotFound for a label the model does not have and
        errors.Unavailable for a configured one that is not in effect.
        """
        labels = self._labels  # once: the labels as of one update, whatever happens meanwhile
        version = labels.effective.get(label)
        if version is not None:
            return version
        if label in labels.configured:
            wanted = labels.configured[label]
            raise errors.Unavailable(
                f"model {self.name!r} version label {label!r} -> {wanted} is not in effect: "
                f"version {wanted} is not loaded (loaded versions: {list(self.loaded_versions)})"
            )
        if label in IMPLICIT_LABELS:
            return None
        known = ", ".join(repr(name) for name in sorted(labels.configured)) or "none"
        raise errors.NotFound(
            f"model {self.name!r} has no version label {errors.shown(label)} (its labels: "
            f"{known}; 'latest' names the serving version)"
        )

    @contextlib.contextmanager
    def lease(self, ref: types.ModelRef) -> Iterator[LoadedModel]:
        """Hold the version `ref` names while the body runs; it is not released meanwhile."""
        with self._state_lock:
            model = self.resolve(ref)
            model.leases += 1
        try:
            yield model
        finally:
            with self._state_lock:
                model.leases -= 1
            self._maybe_release(model)

    def release_all(self) -> list[LoadedModel]:
        """Forget every version (at shutdown); returns them. Loads still running are
        released when they end."""
        self._closed = True
        models = list(self._loaded.values())
        self._loaded.clear()
        self._serving = None
        for model in models:
            self._retire(model)
        return models
