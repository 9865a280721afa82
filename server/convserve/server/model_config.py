"""Which models to serve: the ``--model`` flag and the model config file, as typed values.

There are two sources, and each gives a list of `ModelEntry` (name, base path,
version policy, version labels):

- ``--model NAME=BASE_PATH`` (repeatable), read by `parse_model_flag`. The path
  is kept as given, so a relative one is relative to the working directory. A
  flag has no version policy (the server's default applies) and no labels.
- ``--model-config-file FILE``, read by `read_model_config_file`: TensorFlow
  Serving's ``ModelServerConfig`` in protobuf text format (``model_config_list {
  config { name: ... base_path: ... model_version_policy { ... } } }``). A
  relative ``base_path`` is taken relative to the directory of the file (TF
  Serving takes it relative to its working directory). An empty file or an empty
  ``model_config_list`` means no models yet: models can be added later by
  editing the file.

A base path is the directory holding the model's numbered versions
(``<base>/<version>/``). Parsing does not require it to exist: a model whose
base path is missing is reported and waits for its versions to appear (unless
the server runs with ``--exit-on-load-error``).

Version policies, as in TF Serving's ``ServableVersionPolicy``: ``latest
{ num_versions: N }`` serves the newest N versions found (N = 0 or unset means
1), ``all {}`` serves every version found, ``specific { versions: ... }`` serves
those of the listed versions that exist. An empty ``model_version_policy {}``
is TF Serving's default, the newest version; no ``model_version_policy`` at all
leaves the choice to the server (``policy=None``).

Version labels, as in TF Serving: ``version_labels { key: "canary" value: 2 }``
(repeatable) names a version, and requests may address it by the label instead
of its number. A label name is 1 to `MAX_LABEL_LENGTH` letters, digits, ``_``,
``.`` or ``-``, starting with a letter or digit (labels appear in URL paths and
logs); its version is in 1..`MAX_VERSION`. The labels are kept sorted by name
(`ModelEntry.labels`). Which versions they may point at is the runtime's
concern: by default only loaded ones, so a label usually goes with a version
policy that loads the version (``specific { versions: 1 versions: 2 }``).

Anything convserve cannot honour is refused with a `ModelConfigError` naming the
source and the field (``custom_model_config``, ``logging_config``, a model
platform other than TensorFlow) rather than ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

MAX_VERSION = 2**63 - 1
# More versions than this in memory at once is a typo, not a plan.
MAX_NUM_VERSIONS = 1000
MAX_NAME_LENGTH = 128
MAX_LABEL_LENGTH = 64
# A model config file larger than this is refused (a config of thousands of models
# is a few hundred KB).
MAX_CONFIG_BYTES = 16 << 20
# Names become Prometheus label values, gRPC health service names and URL path
# parts, so they are kept to characters that need no escaping in any of them.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Version labels appear in URL paths (/v1/models/NAME/labels/LABEL) and logs too.
_LABEL = _NAME
# Characters of a refused label name quoted in an error message, at most.
_QUOTED_LABEL_CHARS = 70
# The OIP adapter serves a built-in convolution model under this name
# (convserve.server.protocols.oip_convert.CONV_MODEL).
RESERVED_NAMES = frozenset({"conv2d"})
# gRPC health service names of the server itself (see convserve.server.app).
HEALTH_NAMES = frozenset({"liveness", "readiness"})
_PLATFORMS = ("", "tensorflow")
# ModelConfig.model_type (deprecated): MODEL_TYPE_UNSPECIFIED and TENSORFLOW.
_MODEL_TYPE_UNSPECIFIED = 0
_MODEL_TYPE_TENSORFLOW = 1

_FLAG = "--model"


class ModelConfigError(ValueError):
    """A model configuration that cannot be used; the message names the source and the field."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions to serve.

    ``latest``: the newest ``num_versions`` (1 to `MAX_NUM_VERSIONS`); ``all``:
    every version; ``specific``: those of ``versions`` that exist. ``versions``
    is stored ascending without duplicates whatever order it is given in.
    """

    kind: Literal["latest", "all", "specific"]
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("latest", "all", "specific"):
            raise ModelConfigError(
                f'version policy: kind "latest", "all" or "specific" expected, got {self.kind!r}'
            )
        if not _is_int(self.num_versions):
            raise ModelConfigError(
                f"version policy: num_versions must be an int, got {self.num_versions!r}"
            )
        if self.kind == "latest":
            if not 1 <= self.num_versions <= MAX_NUM_VERSIONS:
                raise ModelConfigError(
                    f"version policy latest: num_versions must be in 1..{MAX_NUM_VERSIONS},"
                    f" got {self.num_versions}"
                )
        elif self.num_versions != 1:
            raise ModelConfigError(
                f"version policy {self.kind}: num_versions applies to latest only,"
                f" got {self.num_versions}"
            )
        if self.kind == "specific":
            if not self.versions:
                raise ModelConfigError("version policy specific: at least one version expected")
            for version in self.versions:
                if not _is_int(version) or not 1 <= version <= MAX_VERSION:
                    raise ModelConfigError(
                        f"version policy specific: versions must be in 1..{MAX_VERSION},"
                        f" got {version!r}"
                    )
            # Frozen, so normalised through object.__setattr__: equal policies compare equal.
            object.__setattr__(self, "versions", tuple(sorted(set(self.versions))))
        elif self.versions:
            raise ModelConfigError(
                f"version policy {self.kind}: versions apply to specific only,"
                f" got {list(self.versions)}"
            )

    def select(self, available: Sequence[int]) -> list[int]:
        """The versions to serve out of `available`, ascending.

        latest: the newest ``num_versions`` (fewer if fewer exist); all: all of
        them; specific: those of ``versions`` present in `available`.
        Duplicates in `available` count once.
        """
        present = sorted(set(available))
        if self.kind == "latest":
            return present[-self.num_versions :]
        if self.kind == "all":
            return present
        wanted = set(self.versions)
        return [version for version in present if version in wanted]

    def describe(self) -> str:
        """A short human-readable form: ``latest 2``, ``all`` or ``specific [1, 3]``."""
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "all":
            return "all"
        return f"specific {list(self.versions)}"


@dataclass(frozen=True)
class ModelEntry:
    """One model to serve: the name clients address it by and its versioned directory.

    ``policy`` None means the server's default version policy. ``labels`` are
    its version labels, (label, version) pairs, stored sorted by label whatever
    order they are given in.
    """

    name: str
    base_path: Path
    policy: VersionPolicy | None = None
    labels: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        problem = _name_problem(self.name)
        if problem:
            raise ModelConfigError(f"model name: {problem}")
        labels = tuple(sorted(self.labels))
        for index, (label, version) in enumerate(labels):
            where = f"model {self.name!r}: version label {_quoted(label)}"
            problem = label_problem(label)
            if problem:
                raise ModelConfigError(f"{where}: {problem}")
            if not _is_int(version) or not 1 <= version <= MAX_VERSION:
                raise ModelConfigError(
                    f"{where}: a version in 1..{MAX_VERSION} expected, got {version!r}"
                )
            if index and labels[index - 1][0] == label:
                raise ModelConfigError(f"{where}: given more than once")
        # Frozen, so normalised through object.__setattr__: equal label sets compare equal.
        object.__setattr__(self, "labels", labels)

    def same_but_labels(self, other: ModelEntry) -> bool:
        """Whether `other` differs from this entry in its version labels only (or not at
        all): what is loaded stays, only the labels change."""
        mine = (self.name, self.base_path, self.policy)
        return mine == (other.name, other.base_path, other.policy)


def parse_model_flag(text: str) -> ModelEntry:
    """One ``--model NAME=BASE_PATH`` value.

    Split at the first ``=`` (a path may contain more). A relative path stays
    relative to the working directory. The entry has no version policy.
    """
    name, sep, base_path = text.partition("=")
    if not sep or not name or not base_path:
        raise ModelConfigError(f"{_FLAG}: NAME=BASE_PATH expected, got {text!r}")
    _check_name(name, _FLAG, "NAME")
    _check_base_path(base_path, _FLAG, "BASE_PATH")
    return ModelEntry(name=name, base_path=Path(base_path))


def parse_model_config(text: str, *, source: str = "model config") -> list[ModelEntry]:
    """A TensorFlow Serving ``ModelServerConfig`` in protobuf text format.

    Returns the models in file order; [] for an empty text or an empty
    ``model_config_list``. Base paths are returned as written: a relative one is
    resolved by the caller (`read_model_config_file` resolves it against the
    file's directory). `source` starts every error message.
    """
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        # The message starts with "line:column : ".
        raise ModelConfigError(
            f"{source}: not a TensorFlow Serving ModelServerConfig in text format: {exc}"
        ) from exc
    which = config.WhichOneof("config")
    if which == "custom_model_config":
        raise ModelConfigError(
            f"{source}: custom_model_config is not supported; list the models in"
            " model_config_list { config { name: ... base_path: ... } }"
        )
    entries: list[ModelEntry] = []
    first_index: dict[str, int] = {}
    for index, model in enumerate(config.model_config_list.config):
        field = f"model_config_list.config[{index}]"
        entry = _entry_from_proto(model, source, field)
        if entry.name in first_index:
            raise ModelConfigError(
                f"{source}: {field}.name: {entry.name!r} is already the name of"
                f" model_config_list.config[{first_index[entry.name]}]; model names must be unique"
            )
        first_index[entry.name] = index
        entries.append(entry)
    return entries


def read_model_config_file(path: Path) -> list[ModelEntry]:
    """The models listed in a ``--model-config-file``.

    A relative ``base_path`` is resolved against the directory holding the file
    (made absolute, symlinks not followed), so the file and its models can be
    moved together. TF Serving instead resolves it against its working
    directory; an absolute ``base_path`` means the same in both. Unreadable
    files and non-UTF-8 text raise `ModelConfigError` like bad contents.
    """
    return model_config_entries(read_config_text(path), path)


def read_config_text(path: Path) -> str:
    """A model config file's text (at most `MAX_CONFIG_BYTES`); raises `ModelConfigError`."""
    source = str(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ModelConfigError(f"{source}: larger than {MAX_CONFIG_BYTES} bytes")
        # utf-8-sig: a byte order mark, as some Windows editors write, is not text.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ModelConfigError(
            f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    except OSError as exc:
        raise ModelConfigError(
            f"{source}: cannot read the model config file: {exc.strerror or exc}"
        ) from exc


def model_config_entries(text: str, path: Path) -> list[ModelEntry]:
    """The models of a config file's `text`, relative base paths resolved against the
    directory holding `path`."""
    directory = path.absolute().parent
    return [
        ModelEntry(
            name=entry.name,
            base_path=directory / entry.base_path,
            policy=entry.policy,
            labels=entry.labels,
        )
        for entry in parse_model_config(text, source=str(path))
    ]


def check_unique(entries: Sequence[ModelEntry], *, source: str) -> None:
    """Raise `ModelConfigError` if two entries share a name (entries counted from 1)."""
    first: dict[str, int] = {}
    for position, entry in enumerate(entries, start=1):
        if entry.name in first:
            raise ModelConfigError(
                f"{source}: model name {entry.name!r} is given more than once"
                f" (entries {first[entry.name]} and {position}); model names must be unique"
            )
        first[entry.name] = position


def _entry_from_proto(
    model: model_server_config_pb2.ModelConfig, source: str, field: str
) -> ModelEntry:
    _check_name(model.name, source, f"{field}.name")
    _check_base_path(model.base_path, source, f"{field}.base_path")
    if model.model_platform not in _PLATFORMS:
        raise ModelConfigError(
            f"{source}: {field}.model_platform: {model.model_platform!r} is not supported;"
            ' "tensorflow" or nothing expected'
        )
    if model.model_type not in (_MODEL_TYPE_UNSPECIFIED, _MODEL_TYPE_TENSORFLOW):
        raise ModelConfigError(
            f"{source}: {field}.model_type: only TENSORFLOW is supported"
            ' (model_type is deprecated: use model_platform: "tensorflow")'
        )
    if model.model_type != _MODEL_TYPE_UNSPECIFIED and model.model_platform:
        # TF Serving refuses this combination too.
        raise ModelConfigError(
            f"{source}: {field}.model_type: set together with model_platform;"
            " give model_platform only (model_type is deprecated)"
        )
    if model.HasField("logging_config"):
        raise ModelConfigError(
            f"{source}: {field}.logging_config: not supported by convserve;"
            " remove it (convserve's logging is set with its own flags)"
        )
    policy = None
    if model.HasField("model_version_policy"):
        policy = _policy_from_proto(
            model.model_version_policy, source, f"{field}.model_version_policy"
        )
    labels = _labels_from_proto(model.version_labels, source, f"{field}.version_labels")
    return ModelEntry(
        name=model.name, base_path=Path(model.base_path), policy=policy, labels=labels
    )


def _labels_from_proto(labels: Any, source: str, field: str) -> tuple[tuple[str, int], ...]:
    # `labels` is the map<string, int64> version_labels (keys are unique by construction).
    pairs: list[tuple[str, int]] = []
    for label in sorted(labels):
        version = int(labels[label])
        where = f"{source}: {field}[{_quoted(label)}]"
        problem = label_problem(label)
        if problem:
            raise ModelConfigError(f"{where}: {problem}")
        if not 1 <= version <= MAX_VERSION:
            raise ModelConfigError(
                f"{where}: {version} is not a model version; 1..{MAX_VERSION} expected"
            )
        pairs.append((label, version))
    return tuple(pairs)


def label_problem(label: object) -> str | None:
    """Why `label` cannot be a version label, or None if it can."""
    rule = (
        f"1 to {MAX_LABEL_LENGTH} letters, digits, '_', '.' or '-', starting with a letter"
        " or digit expected"
    )
    if not isinstance(label, str):
        return f"a string expected, got {type(label).__name__}"
    if not label:
        return f"empty; {rule}"
    if len(label) > MAX_LABEL_LENGTH:
        return f"{len(label)} characters is too long; {rule}"
    if not _LABEL.fullmatch(label):
        return f"not a valid version label; {rule}"
    return None


def _quoted(label: object) -> str:
    """A label name as a double-quoted string (escaped, cut when long) for messages."""
    text = label if isinstance(label, str) else repr(label)
    if len(text) > _QUOTED_LABEL_CHARS:
        return f'{json.dumps(text[:_QUOTED_LABEL_CHARS])[:-1]}…" ({len(text)} characters)'
    return json.dumps(text)


def _policy_from_proto(policy: Any, source: str, field: str) -> VersionPolicy:
    # `policy` is a FileSystemStoragePathSourceConfig.ServableVersionPolicy (the
    # generated module ships without type stubs, hence Any).
    choice = policy.WhichOneof("policy_choice")
    if choice is None or choice == "latest":
        # An empty policy is TF Serving's default: the newest version.
        num_versions = int(policy.latest.num_versions) if choice else 0
        if num_versions > MAX_NUM_VERSIONS:
            raise ModelConfigError(
                f"{source}: {field}.latest.num_versions: {num_versions} is too many;"
                f" 1..{MAX_NUM_VERSIONS} expected (0 or unset means 1)"
            )
        return VersionPolicy("latest", num_versions=num_versions or 1)
    if choice == "all":
        return VersionPolicy("all")
    versions = [int(version) for version in policy.specific.versions]
    if not versions:
        raise ModelConfigError(
            f"{source}: {field}.specific.versions: at least one version expected"
        )
    for index, version in enumerate(versions):
        if not 1 <= version <= MAX_VERSION:
            raise ModelConfigError(
                f"{source}: {field}.specific.versions[{index}]: {version} is not a model"
                f" version; 1..{MAX_VERSION} expected"
            )
    return VersionPolicy("specific", versions=tuple(versions))


def _check_name(name: str, source: str, field: str) -> None:
    problem = _name_problem(name)
    if problem:
        raise ModelConfigError(f"{source}: {field}: {problem}")


def _name_problem(name: object) -> str | None:
    """Why `name` cannot be a model name, or None if it can."""
    rule = (
        f"1 to {MAX_NAME_LENGTH} letters, digits, '_', '.' or '-', starting with a letter"
        " or digit expected"
    )
    if not isinstance(name, str):
        return f"a string expected, got {name!r}"
    if not name:
        return f"missing; {rule}"
    if len(name) > MAX_NAME_LENGTH:
        return f"{len(name)} characters is too long; {rule}"
    if not _NAME.fullmatch(name):
        return f"{name!r} is not a valid model name; {rule}"
    if name in RESERVED_NAMES:
        return (
            f"{name!r} is reserved (the Open Inference Protocol adapter serves a built-in"
            " convolution model by that name); choose another name"
        )
    if name in HEALTH_NAMES:
        return (
            f"{name!r} is reserved (the server's own gRPC health service of that name);"
            " choose another name"
        )
    return None


def _check_base_path(base_path: str, source: str, field: str) -> None:
    if not base_path.strip():
        raise ModelConfigError(
            f"{source}: {field}: missing; the directory holding the model's numbered"
            " versions expected"
        )
    if "\0" in base_path:
        # The operating system cannot open such a path; say so now rather than at load time.
        raise ModelConfigError(f"{source}: {field}: {base_path!r} contains a NUL character")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
