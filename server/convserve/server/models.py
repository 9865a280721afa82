"""SavedModel versions: discovery, loading with warm-up, polling and atomic swaps.

A version is any SavedModel whose ``serving_default`` signature takes one
image tensor ``[N,H,W,C]`` (float32, 0..1) and returns one ``[N,K]`` tensor of
class probabilities: its shape, K and names come from the signature at load
(`ModelSignature`), the class names from the training record when it has
them. A ``feature_maps`` signature (layer name -> activations) is optional.

A model base path holds one directory per version (a positive integer name);
anything else (hidden export temp dirs, files, other names) is ignored. The
`ModelManager` serves the newest version that loaded and warmed up, keeps the
`keep_versions` newest loaded versions pinnable, and hands out leases: a
request holds a lease on its version while it runs, so a version swapped out
is released only after its last request has finished. A request names its
version by number, by a version label of the model config file
(`ModelManager.set_labels`), or neither (the serving version).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from convserve.server import errors, types
from convserve.server.blocking import run_detached
from convserve.server.inputs import ImageSpec

log = logging.getLogger(__name__)

TRAINING_RECORD = Path("assets.extra") / "training_record.json"
WARMUP_REQUESTS = Path("assets.extra") / "tf_serving_warmup_requests"
SERVING_SIGNATURE = "serving_default"
FEATURE_MAPS_SIGNATURE = "feature_maps"
KEEP_VERSIONS = 2
# Largest image side and channel count a served model may declare.
MAX_IMAGE_SIDE = 4096
MAX_CHANNELS = 64
MAX_CLASSES = 100_000
# The largest version number: versions are int64 everywhere they travel.
MAX_VERSION = 2**63 - 1
# Entries of a version directory its change marker looks at, at most.
SIGNATURE_MAX_ENTRIES = 10_000
# What may compute digit predictions on the CPU (see `LiteRtEngine`).
ENGINES = ("litert", "tensorflow")
# Characters of a load error that clients may see (ListModels, GetModelStatus).
MAX_ERROR_CHARS = 500
# Largest |LiteRT - SavedModel| probability difference a converted model may show.
PARITY_TOLERANCE = 1e-5
# Bytes of a training record read at most; a larger one refuses the version.
MAX_RECORD_BYTES = 1 << 20
# Characters of one class name at most: names go out with every prediction, so a long one
# multiplies every answer (1,024 images x 100 KB names would be a 100 MB answer).
MAX_CLASS_NAME_CHARS = 256
# Seconds nothing in a new version directory may have changed (by change time, which
# copying tools cannot backdate) before it is loaded: a version copied in file by file
# is loaded whole, not while its assets are still arriving.
VERSION_SETTLE_S = 1.0
# What a class name may not contain: it is printed in tables and logs (C0/C1 controls,
# line and paragraph separators, and the bidirectional overrides that reorder text).
_CONTROL_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
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
    """Drop a version that was loaded but will never serve: its workers go now."""
    workers = model.workers
    if workers is not None:
        workers.close()


def _discard_load(loading: asyncio.Future[LoadedModel]) -> None:
    if not loading.cancelled() and loading.exception() is None:
        _discard(loading.result())


class ModelLoadError(Exception):
    """A version could not be loaded or failed its warm-up; the message says why."""


@dataclass(frozen=True)
class ModelSignature:
    """What a version's serving_default takes and returns, read from the SavedModel."""

    input_name: str
    image_shape: tuple[int, int, int]  # [H,W,C]
    output_name: str
    classes: int  # K

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(self.image_shape)


def read_signature(module: Any) -> ModelSignature:
    """The serving signature's image input and probability output.

    Raises ModelLoadError unless it has exactly one float32 input of shape
    [N,H,W,C] (H, W, C known) and one float32 output of shape [N,K] (K known).
    """
    signatures = getattr(module, "signatures", {})
    fn = signatures.get(SERVING_SIGNATURE)
    if fn is None:
        raise ModelLoadError(f"signature {SERVING_SIGNATURE!r} missing (has {sorted(signatures)})")
    _, inputs = fn.structured_input_signature
    if len(inputs) != 1:
        raise ModelLoadError(
            f"{SERVING_SIGNATURE} must take one image tensor, it takes {sorted(inputs)}"
        )
    input_name, spec = next(iter(inputs.items()))
    dims = spec.shape.as_list() if spec.shape.rank is not None else None
    if (
        dims is None
        or len(dims) != 4
        or any(d is None for d in dims[1:])
        or spec.dtype != tf.float32
    ):
        raise ModelLoadError(
            f"{SERVING_SIGNATURE} input {input_name!r} must be float32 [N,H,W,C] with H, W "
            f"and C known, it is {spec.dtype.name} {dims}"
        )
    h, w, c = (int(d) for d in dims[1:])
    if not (0 < h <= MAX_IMAGE_SIDE and 0 < w <= MAX_IMAGE_SIDE and 0 < c <= MAX_CHANNELS):
        raise ModelLoadError(
            f"{SERVING_SIGNATURE} input {input_name!r}: images of at most {MAX_IMAGE_SIDE}x"
            f"{MAX_IMAGE_SIDE}x{MAX_CHANNELS} expected, it declares {h}x{w}x{c}"
        )
    outputs = fn.structured_outputs
    if not isinstance(outputs, dict) or len(outputs) != 1:
        names = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise ModelLoadError(f"{SERVING_SIGNATURE} must return one tensor, it returns {names}")
    output_name, out = next(iter(outputs.items()))
    out_dims = out.shape.as_list() if out.shape.rank is not None else None
    if out_dims is None or len(out_dims) != 2 or out_dims[1] is None or out.dtype != tf.float32:
        raise ModelLoadError(
            f"{SERVING_SIGNATURE} output {output_name!r} must be float32 [N,K] probabilities "
            f"with K known, it is {out.dtype.name} {out_dims}"
        )
    classes = int(out_dims[1])
    if not 0 < classes <= MAX_CLASSES:
        raise ModelLoadError(f"between 1 and {MAX_CLASSES} classes expected, got {classes}")
    return ModelSignature(str(input_name), (h, w, c), str(output_name), classes)


def class_names_of(record: dict[str, Any], classes: int) -> tuple[str, ...]:
    """The training record's class names if they name each of `classes` classes, else ().

    A list of another length is ignored with a warning (the version serves
    class indices); a name that is not text, too long or not valid Unicode
    refuses the version (ModelLoadError), since it would go out with every
    prediction of that class.
    """
    names = record.get("class_names")
    if not isinstance(names, list) or len(names) != classes:
        if names is not None:
            shown = f"{len(names)} names" if isinstance(names, list) else type(names).__name__
            log.warning("training record: %d class_names expected, ignoring %s", classes, shown)
        return ()
    out = []
    for index, name in enumerate(names):
        where = f"{TRAINING_RECORD}: class_names[{index}]"
        if isinstance(name, (dict, list)) or name is None:
            raise ModelLoadError(f"{where}: a string expected, got {type(name).__name__}")
        text = str(name)
        if not 0 < len(text) <= MAX_CLASS_NAME_CHARS:
            raise ModelLoadError(
                f"{where}: 1 to {MAX_CLASS_NAME_CHARS} characters expected, got {len(text)}"
            )
        if any(unicodedata.category(c) in _CONTROL_CATEGORIES or c in _BIDI for c in text):
            # Line separators and text direction overrides count as control characters here.
            raise ModelLoadError(f"{where}: control characters are not allowed in a class name")
        out.append(text)
    return tuple(out)


def check_record(record: dict[str, Any]) -> None:
    """Refuse (ModelLoadError) a training record that clients could not be sent.

    Every string in it must be valid Unicode (JSON can spell a lone surrogate,
    which no protocol can encode), the typed fields (`types.TRAINING_FIELDS`)
    must read as their types within int64, and the layer table must be rows of
    a name, a type, an output shape of non-negative integers, a parameter count
    and a trainable flag. Fields convserve does not know are kept as they are.
    """
    _check_text(record, TRAINING_RECORD.as_posix())
    for name, kind in types.TRAINING_FIELDS.items():
        raw = record.get(name)
        if raw is None:
            continue
        where = f"{TRAINING_RECORD}: {name}"
        if isinstance(raw, (dict, list)):
            raise ModelLoadError(f"{where}: a {kind.__name__} expected, got {type(raw).__name__}")
        try:
            value = kind(raw)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ModelLoadError(f"{where}: a {kind.__name__} expected: {exc}") from exc
        if kind is int and not -(2**63) <= value < 2**63:
            raise ModelLoadError(f"{where}: {value} does not fit int64")
    layers = record.get("layers", [])
    if not isinstance(layers, list):
        raise ModelLoadError(f"{TRAINING_RECORD}: layers: a list expected")
    for index, row in enumerate(layers):
        where = f"{TRAINING_RECORD}: layers[{index}]"
        if not isinstance(row, dict):
            raise ModelLoadError(f"{where}: an object expected, got {type(row).__name__}")
        shape = row.get("output_shape", [])
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ModelLoadError(f"{where}.output_shape: a list of non-negative integers expected")
        if not _is_count(row.get("parameters", 0)):
            raise ModelLoadError(f"{where}.parameters: a non-negative integer expected")
        if not isinstance(row.get("trainable", True), bool):
            raise ModelLoadError(f"{where}.trainable: true or false expected")
        for key in ("name", "type"):
            if isinstance(row.get(key, ""), (dict, list)):
                raise ModelLoadError(f"{where}.{key}: a string expected")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _check_text(value: object, where: str) -> None:
    """Every string in a JSON value encodes as UTF-8 (iteratively: depth is the file's)."""
    stack = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ModelLoadError(
                    f"{at}: not valid Unicode text ({exc.reason} at character {exc.start})"
                ) from None
        elif isinstance(item, dict):
            for key, child in item.items():
                stack.append((key, f"{at} (a key)"))
                stack.append((child, f"{at}.{key}" if isinstance(key, str) else at))
        elif isinstance(item, list):
            stack.extend((child, f"{at}[{i}]") for i, child in enumerate(item))


class LiteRtEngine:
    """serving_default converted to LiteRT, run by its XNNPACK CPU kernels.

    For a network this small TensorFlow's per-call overhead dominates on the
    CPU (about 1 ms for one image); the converted graph computes the same
    probabilities (checked at load, see `load_model`) in a tenth of that.
    An interpreter serves one call at a time, so the engine keeps a pool of
    `copies` interpreters and a call waits for a free one.
    """

    def __init__(self, flatbuffer: bytes, *, threads: int, copies: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.threads = threads
        self.copies = copies
        self.flatbuffer = flatbuffer
        self._free: queue.SimpleQueue[_Interpreter] = queue.SimpleQueue()
        for _ in range(copies):
            interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
            signature = interpreter.get_signature_list().get("serving_default")
            inputs = interpreter.get_input_details()
            outputs = interpreter.get_output_details()
            if signature is None or len(inputs) != 1 or len(outputs) != 1:
                raise ModelLoadError(
                    f"the converted model has signatures {interpreter.get_signature_list()}, "
                    f"{len(inputs)} inputs and {len(outputs)} outputs; one serving_default "
                    "with one input and one output expected"
                )
            self._free.put(_Interpreter(interpreter, inputs[0]["index"], outputs[0]["index"]))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 [N,H,W,C] in [0,1] -> probabilities float32 [N,K] (thread-safe)."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        slot = self._free.get()
        try:
            return slot.run(images)
        finally:
            self._free.put(slot)


@dataclass(eq=False)
class _Interpreter:
    interpreter: Any
    input_index: int
    output_index: int
    shape: tuple[int, ...] = ()

    def run(self, images: np.ndarray) -> np.ndarray:
        if images.shape != self.shape:
            # Re-planning for another batch size takes microseconds, and the batcher
            # pads to a few sizes.
            self.interpreter.resize_tensor_input(self.input_index, images.shape, strict=True)
            self.interpreter.allocate_tensors()
            self.shape = images.shape
        self.interpreter.set_tensor(self.input_index, images)
        self.interpreter.invoke()
        return np.asarray(self.interpreter.get_tensor(self.output_index))


def convert_to_litert(module: Any) -> bytes:
    """The serving_default signature of a loaded SavedModel as a LiteRT flatbuffer."""
    fn = module.signatures[SERVING_SIGNATURE]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], module)
    return bytes(converter.convert())


@dataclass(eq=False)
class LoadedModel:
    """One loaded, warmed-up version and its signatures.

    `predict` and `feature_maps` are blocking TensorFlow calls: run them in a
    thread, never on the event loop.
    """

    name: str
    version: int
    path: Path
    device: str
    record: dict[str, Any]
    module: Any = field(repr=False)
    signature: ModelSignature
    class_names: tuple[str, ...] = ()
    # What computes `predict`: "tensorflow" (the SavedModel) or "litert" (`LiteRtEngine`).
    engine: str = "tensorflow"
    litert: LiteRtEngine | None = field(default=None, repr=False)
    # The same LiteRT model in worker processes, when the server runs it there
    # (`engine_process.ProcessEngine`); `predict` stays in-process either way.
    workers: Any = field(default=None, repr=False)
    # Most images one batch may hold, and the bytes its buffers are sized for at that
    # size (see `plan_memory`).
    max_rows: int = 64
    memory_bytes: int = 0
    # The training record's (mtime, change time, size) when it was read.
    record_marker: tuple[int, int, int] | None = None
    leases: int = 0
    retired: bool = False
    # Called once the version is retired and its last lease is gone.
    on_release: Callable[[LoadedModel], None] | None = field(default=None, repr=False)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 [N,H,W,C] in [0,1] -> probabilities float32 [N,K]."""
        if self.litert is not None:
            return self.litert(images)
        return self.predict_tensorflow(images)

    def predict_tensorflow(self, images: np.ndarray) -> np.ndarray:
        """`predict` through the SavedModel's serving_default, whatever the engine."""
        sig = self.signature
        fn = self.module.signatures[SERVING_SIGNATURE]
        with tf.device(self.device):
            out = fn(**{sig.input_name: tf.constant(images, dtype=tf.float32)})
        return np.asarray(out[sig.output_name].numpy(), dtype=np.float32)

    @property
    def has_feature_maps(self) -> bool:
        return FEATURE_MAPS_SIGNATURE in self.module.signatures

    def feature_maps(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [N,H,W,C] -> {layer name: float32 [N,H',W',F]} (needs `has_feature_maps`)."""
        fn = self.module.signatures[FEATURE_MAPS_SIGNATURE]
        _, inputs = fn.structured_input_signature
        with tf.device(self.device):
            out = fn(**{next(iter(inputs)): tf.constant(images, dtype=tf.float32)})
        return {name: np.asarray(value.numpy()) for name, value in out.items()}

    @property
    def feature_map_layers(self) -> tuple[str, ...]:
        """Layer names in model order (the training record's, else the signature's)."""
        if not self.has_feature_maps:
            return ()
        names = self.record.get("feature_map_layers")
        outputs = self.module.signatures[FEATURE_MAPS_SIGNATURE].structured_outputs
        if (
            isinstance(names, list)
            and all(isinstance(n, str) for n in names)
            and set(names) == set(outputs)
        ):
            return tuple(str(n) for n in names)
        return tuple(sorted(outputs))

    def metadata(self, loaded_versions: tuple[int, ...]) -> types.ModelMetadata:
        layers = []
        for row in self.record.get("layers", []):
            layers.append(
                types.LayerRow(
                    name=str(row.get("name", "")),
                    type=str(row.get("type", "")),
                    output_shape=tuple(int(d) for d in row.get("output_shape", [])),
                    parameters=int(row.get("parameters", 0)),
                    trainable=bool(row.get("trainable", True)),
                )
            )
        return types.ModelMetadata(
            model_name=self.name,
            loaded_versions=loaded_versions,
            serving_version=self.version,
            inputs=(
                types.TensorSpecInfo(
                    "images", ("uint8", "float32"), (-1, *self.signature.image_shape)
                ),
            ),
            outputs=(
                types.TensorSpecInfo("probabilities", ("float32",), (-1, self.signature.classes)),
            ),
            layers=tuple(layers),
            training=dict(self.record),
            device=self.device,
            class_names=self.class_names,
        )


def read_record(path: Path) -> dict[str, Any]:
    """The version's training record ({} without one), checked (`check_record`).

    Raises ModelLoadError for an unreadable, oversized (`MAX_RECORD_BYTES`),
    malformed or unsendable record.
    """
    record_path = path / TRAINING_RECORD
    if not record_path.exists():
        return {}  # a SavedModel from elsewhere: served without a training record
    try:
        with record_path.open("rb") as file:
            raw = file.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            raise ModelLoadError(f"{TRAINING_RECORD} is larger than {MAX_RECORD_BYTES} bytes")
        record = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"cannot read {TRAINING_RECORD}: {exc}") from exc
    if not isinstance(record, dict):
        raise ModelLoadError(f"{TRAINING_RECORD} must hold a JSON object")
    check_record(record)
    return record


def record_marker(path: Path) -> tuple[int, int, int] | None:
    """(mtime, change time, size) of the version's training record; None without one."""
    try:
        stat = os.stat(path / TRAINING_RECORD)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)


def read_warmup_requests(path: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(signature name, inputs) of each PredictionLog in the version's warm-up file.

    Returns [] when the version has no warm-up file.
    """
    from tensorflow_serving.apis import prediction_log_pb2

    file = path / WARMUP_REQUESTS
    if not file.is_file():
        return []
    requests = []
    try:
        for raw in tf.data.TFRecordDataset(str(file)):
            entry = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
            if not entry.HasField("predict_log"):
                continue
            request = entry.predict_log.request
            inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
            requests.append((request.model_spec.signature_name or "serving_default", inputs))
    except Exception as exc:
        raise ModelLoadError(f"cannot read {WARMUP_REQUESTS}: {exc}") from exc
    return requests


@dataclass(frozen=True)
class MemoryLimits:
    """What one version's buffers may use, and how many copies of them the server makes."""

    budget_bytes: int  # the server's max_model_memory_bytes
    max_batch_size: int  # the server's; a version may get fewer rows
    engine_copies: int = 1  # in-process interpreters
    worker_copies: int = 0  # worker processes: an interpreter and a shared region each


@dataclass(frozen=True)
class MemoryPlan:
    """How many images one batch of a version may hold, and the bytes that takes."""

    rows: int
    bytes: int


def plan_memory(
    signature: ModelSignature,
    limits: MemoryLimits,
    *,
    row_bytes: int = 0,
    fixed_bytes: int = 0,
) -> MemoryPlan:
    """The largest batch (up to `limits.max_batch_size`) whose buffers fit the budget.

    Each engine copy holds `fixed_bytes` plus, per row, `row_bytes` (its
    tensors: input, activations, output) and at least the row's float32 input
    and output; each worker's shared region and the server's batch assembly (two
    buffers) hold the input and output rows again. Raises ModelLoadError when
    not even one image fits, naming the input and the budget.
    """
    h, w, c = signature.image_shape
    io_row = 4 * (h * w * c + signature.classes)
    copy_row = max(row_bytes, io_row)
    copies = max(1, limits.engine_copies + limits.worker_copies)
    fixed = copies * max(0, fixed_bytes)
    per_row = copies * copy_row + (limits.worker_copies + 2) * io_row
    if fixed + per_row > limits.budget_bytes:
        raise ModelLoadError(
            f"input {h}x{w}x{c} needs {fixed + per_row:,} bytes of buffers for one image "
            f"({copies} engine copies of {copy_row:,} bytes per image"
            + (f" and {fixed_bytes:,} fixed" if fixed_bytes else "")
            + f"), over the memory budget of {limits.budget_bytes:,} bytes "
            "(--max-model-memory-bytes)"
        )
    rows = max(1, min(limits.max_batch_size, (limits.budget_bytes - fixed) // per_row))
    return MemoryPlan(rows, fixed + rows * per_row)


def litert_tensor_bytes(flatbuffer: bytes, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(bytes per image, fixed bytes) of a LiteRT model's tensors (blocking).

    Every tensor counts, as if none shared memory: an upper bound of what an
    interpreter allocates. Measured at batch sizes 1 and 2.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # Without the default XNNPACK delegate: the tensors it takes over keep their batch-1
    # shapes in the interpreter's view after a resize, and would go uncounted.
    interpreter = Interpreter(
        model_content=flatbuffer,
        num_threads=1,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    index = interpreter.get_input_details()[0]["index"]
    totals = []
    for rows in (1, 2):
        interpreter.resize_tensor_input(index, (rows, *image_shape), strict=True)
        interpreter.allocate_tensors()
        totals.append(
            sum(
                int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize
                for d in interpreter.get_tensor_details()
            )
        )
    per_row = max(0, totals[1] - totals[0])
    return per_row, max(0, totals[0] - per_row)


def load_model(
    name: str,
    version: int,
    path: Path,
    device: str,
    warm_batch_sizes: Sequence[int] = (),
    *,
    engine: str = "tensorflow",
    engine_threads: int = 1,
    engine_copies: int = 1,
    memory: MemoryLimits | None = None,
) -> LoadedModel:
    """Load and warm up one version (blocking; run it in a thread).

    After the version's own warm-up requests, `predict` also runs once per
    size in `warm_batch_sizes` (the batcher's padded sizes), so that no
    request pays for a first call at a new batch size.

    engine="litert" on a CPU device converts serving_default to LiteRT
    (`LiteRtEngine`, `engine_copies` interpreters of `engine_threads` threads
    each) and serves predictions with it once its probabilities match the
    SavedModel's on the warm-up images within PARITY_TOLERANCE; if the
    conversion fails or the results differ, the version is served by
    TensorFlow and a warning says why. GPU devices always use TensorFlow.
    With `memory`, batches are limited to the rows whose buffers fit its
    budget (`plan_memory`, with the LiteRT model's own tensor sizes when it is
    converted), checked before anything runs at a large size; warm-up sizes
    above that are skipped, and `max_rows` and `memory_bytes` say the outcome.
    Raises ModelLoadError when the SavedModel cannot be loaded, lacks a
    required signature, has a training record clients could not be sent, does
    not fit the memory budget with one image, or any warm-up request fails or
    gives a wrong result.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    marker = record_marker(path)
    record = read_record(path)
    try:
        with tf.device(device):
            module = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot load the SavedModel: {exc}") from exc
    signatures = getattr(module, "signatures", {})
    signature = read_signature(module)
    shape = signature.image_shape
    model = LoadedModel(
        name=name,
        version=version,
        path=path,
        device=device,
        record=record,
        module=module,
        signature=signature,
        class_names=class_names_of(record, signature.classes),
        record_marker=marker,
    )
    limits = memory or MemoryLimits(2**62, max(warm_batch_sizes, default=64), engine_copies)
    # Before anything runs: an input too large for one image is refused here.
    plan = plan_memory(signature, limits)
    flatbuffer: bytes | None = None
    if engine == "litert" and "GPU" not in device.upper():
        try:
            flatbuffer = convert_to_litert(module)
            row_bytes, fixed_bytes = litert_tensor_bytes(flatbuffer, shape)
        except Exception as exc:
            log.warning("%s version %d: LiteRT conversion failed, TensorFlow serves it: %s",
                        name, version, exc)  # fmt: skip
            flatbuffer = None
        else:
            plan = plan_memory(signature, limits, row_bytes=row_bytes, fixed_bytes=fixed_bytes)
    if plan.rows < limits.max_batch_size:
        log.warning("%s version %d: batches limited to %d images by the memory budget "
                    "(%d bytes)", name, version, plan.rows, limits.budget_bytes)  # fmt: skip
    model.max_rows = plan.rows
    model.memory_bytes = plan.bytes
    warmup = read_warmup_requests(path)
    if not warmup:
        log.warning(
            "%s version %d has no warm-up requests; warming with one blank image", name, version
        )
        blank = np.zeros((1, *shape), np.float32)
        warmup = [(SERVING_SIGNATURE, {signature.input_name: blank})]
    for signature_name, inputs in warmup:
        fn = signatures.get(signature_name)
        if fn is None:
            raise ModelLoadError(f"a warm-up request names an unknown signature {signature_name!r}")
        try:
            with tf.device(device):
                out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
            outputs = {k: v.numpy() for k, v in out.items()}
        except Exception as exc:
            raise ModelLoadError(f"warm-up request failed: {exc}") from exc
        rows = next(iter(inputs.values())).shape[0]
        for key, value in outputs.items():
            if value.shape[:1] != (rows,) or not np.all(np.isfinite(value)):
                raise ModelLoadError(
                    f"warm-up output {key!r} has shape {list(value.shape)} or non-finite values "
                    f"for {rows} input rows"
                )
    if engine == "litert":
        if "GPU" in device.upper():
            log.info("%s version %d: TensorFlow computes on %s (LiteRT is for CPUs)",
                     name, version, device)  # fmt: skip
        elif flatbuffer is not None:
            key = signature.input_name
            probe = [v[key] for s, v in warmup if s == SERVING_SIGNATURE and key in v]
            _use_litert(model, flatbuffer, probe, threads=engine_threads, copies=engine_copies)
    sizes = {size for size in warm_batch_sizes if size <= plan.rows}
    if warm_batch_sizes:
        sizes.add(plan.rows)
    for size in sorted(sizes):
        # FIFO pool: `copies` calls in a row warm every interpreter at this size.
        for _ in range(model.litert.copies if model.litert is not None else 1):
            try:
                probabilities = model.predict(np.zeros((size, *shape), np.float32))
            except Exception as exc:
                raise ModelLoadError(f"warm-up at batch size {size} failed: {exc}") from exc
            if probabilities.shape != (size, signature.classes):
                raise ModelLoadError(
                    f"probabilities of shape [{size}, {signature.classes}] expected at batch "
                    f"size {size}, "
                    f"got {list(probabilities.shape)}"
                )
    # The feature maps signature is served too: run it once so its first call is not slow.
    if model.has_feature_maps:
        try:
            model.feature_maps(np.zeros((1, *shape), np.float32))
        except Exception as exc:
            raise ModelLoadError(f"feature_maps warm-up failed: {exc}") from exc
    return model


def _use_litert(
    model: LoadedModel, flatbuffer: bytes, probe: list[np.ndarray], *, threads: int, copies: int
) -> None:
    """Switch `model.predict` to LiteRT if the converted graph agrees with the SavedModel
    (compared in batches of at most `model.max_rows` images)."""
    rng = np.random.default_rng(0)
    shape = model.signature.image_shape
    # The trainer's warm-up images, blank and saturated images and noise.
    images = np.concatenate(
        [
            *(np.asarray(p, np.float32).reshape(-1, *shape) for p in probe),
            np.zeros((1, *shape), np.float32),
            np.ones((1, *shape), np.float32),
            rng.random((6, *shape), dtype=np.float32),
        ]
    )
    try:
        candidate = LiteRtEngine(flatbuffer, threads=threads, copies=copies)
        gaps = [
            np.abs(candidate(part) - model.predict_tensorflow(part))
            for part in np.array_split(images, -(-len(images) // model.max_rows))
        ]
        # np.max, not max(): a NaN anywhere must fail the comparison below.
        difference = float(np.max(np.concatenate(gaps)))
    except Exception as exc:
        log.warning("%s version %d: LiteRT conversion failed, TensorFlow serves it: %s",
                    model.name, model.version, exc)  # fmt: skip
        return
    if not difference <= PARITY_TOLERANCE:
        log.warning("%s version %d: LiteRT differs from the SavedModel by %.3g (over %g), "
                    "TensorFlow serves it", model.name, model.version, difference,
                    PARITY_TOLERANCE)  # fmt: skip
        return
    model.litert = candidate
    model.engine = "litert"
    log.info("%s version %d: LiteRT computes predictions (%d x %d threads; max difference "
             "from the SavedModel %.2g)", model.name, model.version, copies, threads,
             difference)  # fmt: skip


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
