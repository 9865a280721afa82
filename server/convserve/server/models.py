"""One SavedModel version: its signature, training record, engine, warm-up and memory.

A version is any SavedModel whose ``serving_default`` signature takes one
image tensor ``[N,H,W,C]`` (float32, 0..1) and returns one ``[N,K]`` tensor of
class probabilities: its shape, K and names come from the signature at load
(`ModelSignature`), the class names from the training record when it has
them. A ``feature_maps`` signature (layer name -> activations) is optional.
`load_model` loads and warms up one version with the engine that will
compute it (`convserve.server.engines`); `convserve.server.model_versions` finds a
model's versions and decides which serve.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from convserve.server import engines, types
from convserve.server.engines import Engine
from convserve.server.inputs import ImageSpec

log = logging.getLogger(__name__)

TRAINING_RECORD = Path("assets.extra") / "training_record.json"
WARMUP_REQUESTS = Path("assets.extra") / "tf_serving_warmup_requests"
SERVING_SIGNATURE = "serving_default"
FEATURE_MAPS_SIGNATURE = "feature_maps"
# Largest image side and channel count a served model may declare.
MAX_IMAGE_SIDE = 4096
MAX_CHANNELS = 64
MAX_CLASSES = 100_000
# Bytes of a training record read at most; a larger one refuses the version.
MAX_RECORD_BYTES = 1 << 20
# Characters of one class name at most: names go out with every prediction, so a long one
# multiplies every answer (1,024 images x 100 KB names would be a 100 MB answer).
MAX_CLASS_NAME_CHARS = 256
# What a class name may not contain: it is printed in tables and logs (C0/C1 controls,
# line and paragraph separators, and the bidirectional overrides that reorder text).
_CONTROL_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


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
    # What computes `predict` (see `convserve.server.engines`).
    engine: Engine = field(repr=False)
    class_names: tuple[str, ...] = ()
    # The training record's (mtime, change time, size) when it was read.
    record_marker: tuple[int, int, int] | None = None
    leases: int = 0
    retired: bool = False
    # Called once the version is retired and its last lease is gone.
    on_release: Callable[[LoadedModel], None] | None = field(default=None, repr=False)

    @property
    def max_rows(self) -> int:
        """Most images one batch may hold (its buffers fit the memory budget)."""
        return self.engine.max_rows

    @property
    def memory_bytes(self) -> int:
        """The bytes its batch buffers are sized for (see `plan_memory`)."""
        return self.engine.memory_bytes

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 [N,H,W,C] in [0,1] -> probabilities float32 [N,K] (by its engine)."""
        return self.engine.predict(images)

    def predict_tensorflow(self, images: np.ndarray) -> np.ndarray:
        """`predict` through the SavedModel's serving_default, whatever the engine."""
        return savedmodel_predict(self.module, self.signature, self.device, images)

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


def plan_memory(
    signature: ModelSignature,
    limits: MemoryLimits,
    *,
    row_bytes: int = 0,
    fixed_bytes: int = 0,
) -> engines.MemoryPlan:
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
    return engines.MemoryPlan(rows, fixed + rows * per_row)


def savedmodel_predict(
    module: Any, signature: ModelSignature, device: str, images: np.ndarray
) -> np.ndarray:
    """float32 [N,H,W,C] -> probabilities float32 [N,K] through serving_default (blocking)."""
    fn = module.signatures[SERVING_SIGNATURE]
    with tf.device(device):
        out = fn(**{signature.input_name: tf.constant(images, dtype=tf.float32)})
    return np.asarray(out[signature.output_name].numpy(), dtype=np.float32)


def load_model(
    name: str,
    version: int,
    path: Path,
    device: str,
    warm_batch_sizes: Sequence[int] = (),
    *,
    engine: str = engines.FALLBACK,
    engine_threads: int = 1,
    engine_copies: int = 1,
    memory: MemoryLimits | None = None,
    workers: engines.WorkerOptions | None = None,
) -> LoadedModel:
    """Load and warm up one version (blocking; run it in a thread).

    The engine named `engine` is built for it (`engines.build`: with
    `workers`, in worker processes if the engine has them; an engine that
    cannot serve the version hands it to the next, down to TensorFlow, with a
    warning saying why; converted engines are compared with the SavedModel on
    the warm-up images), then the version's own warm-up requests run through
    TensorFlow, and `predict` once per size in `warm_batch_sizes` (the
    batcher's padded sizes), so that no request pays for a first call at a
    new batch size.
    With `memory`, batches are limited to the rows whose buffers fit its
    budget (`plan_memory`, with the engine's own tensor sizes), checked before
    anything runs at a large size; warm-up sizes above that are skipped, and
    `max_rows` and `memory_bytes` say the outcome. Raises ModelLoadError when
    the SavedModel cannot be loaded, lacks a required signature, has a
    training record clients could not be sent, does not fit the memory budget
    with one image, or any warm-up request fails or gives a wrong result.
    """
    if engine not in engines.ENGINES:
        raise ValueError(f"engine must be one of {sorted(engines.ENGINES)}, got {engine!r}")
    marker = record_marker(path)
    record = read_record(path)
    try:
        with tf.device(device):
            module = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot load the SavedModel: {exc}") from exc
    signature = read_signature(module)
    shape = signature.image_shape
    limits = memory or MemoryLimits(2**62, max(warm_batch_sizes, default=64), engine_copies)
    # Before anything runs: an input too large for one image is refused here.
    plan_memory(signature, limits)
    warmup = _warmup_requests(name, version, path, signature)

    def plan(row_bytes: int, fixed_bytes: int) -> engines.MemoryPlan:
        return plan_memory(signature, limits, row_bytes=row_bytes, fixed_bytes=fixed_bytes)

    key = signature.input_name
    probe = [v[key] for s, v in warmup if s == SERVING_SIGNATURE and key in v]
    computed = engines.build(
        engine,
        engines.EngineContext(
            label=f"{name} version {version}",
            image_shape=shape,
            classes=signature.classes,
            device=device,
            module=module,
            reference=functools.partial(savedmodel_predict, module, signature, device),
            probe=_probe_images(probe, shape),
            threads=engine_threads,
            copies=engine_copies,
            plan=plan,
            workers=workers,
        ),
    )
    try:
        run_warmup_requests(warmup, device, module)
    except BaseException:
        computed.close()
        raise
    model = LoadedModel(
        name=name,
        version=version,
        path=path,
        device=device,
        record=record,
        module=module,
        signature=signature,
        engine=computed,
        class_names=class_names_of(record, signature.classes),
        record_marker=marker,
    )
    try:
        if computed.max_rows < limits.max_batch_size:
            log.warning("%s version %d: batches limited to %d images by the memory budget "
                        "(%d bytes)", name, version, computed.max_rows,
                        limits.budget_bytes)  # fmt: skip
        sizes = {size for size in warm_batch_sizes if size <= computed.max_rows}
        if warm_batch_sizes:
            sizes.add(computed.max_rows)
        try:
            computed.warm_up(sorted(sizes))
        except engines.EngineUnavailable as exc:
            raise ModelLoadError(str(exc)) from exc
        # The feature maps signature is served too: run it once so its first call is not
        # slow.
        if model.has_feature_maps:
            try:
                model.feature_maps(np.zeros((1, *shape), np.float32))
            except Exception as exc:
                raise ModelLoadError(f"feature_maps warm-up failed: {exc}") from exc
    except BaseException:
        computed.close()
        raise
    return model


def _warmup_requests(
    name: str, version: int, path: Path, signature: ModelSignature
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The version's warm-up requests; one blank image without them."""
    warmup = read_warmup_requests(path)
    if warmup:
        return warmup
    log.warning(
        "%s version %d has no warm-up requests; warming with one blank image", name, version
    )
    blank = np.zeros((1, *signature.image_shape), np.float32)
    return [(SERVING_SIGNATURE, {signature.input_name: blank})]


def run_warmup_requests(
    warmup: list[tuple[str, dict[str, np.ndarray]]], device: str, module: Any
) -> None:
    """Run warm-up requests through the SavedModel (blocking). Raises ModelLoadError if
    one names an unknown signature, fails, or gives a wrong or non-finite result."""
    signatures = getattr(module, "signatures", {})
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


def _probe_images(warmup: list[np.ndarray], shape: tuple[int, int, int]) -> np.ndarray:
    """What a converted engine is compared on: the trainer's warm-up images, blank and
    saturated images and noise."""
    rng = np.random.default_rng(0)
    return np.concatenate(
        [
            *(np.asarray(p, np.float32).reshape(-1, *shape) for p in warmup),
            np.zeros((1, *shape), np.float32),
            np.ones((1, *shape), np.float32),
            rng.random((6, *shape), dtype=np.float32),
        ]
    )
