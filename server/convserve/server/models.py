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
is released only after its last request has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from convserve.server import errors, types
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


def discover_versions(base_path: Path) -> list[int]:
    """The version numbers under `base_path`, ascending.

    Only directories named by a positive integer that fits int64 count (TF
    Serving's version numbers are int64, and so are every protocol's version
    fields); anything else is ignored, as TF Serving ignores it.
    """
    try:
        entries = list(base_path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:  # e.g. no permission: nothing loadable, and say why
        log.warning("cannot list %s: %s", base_path, exc)
        return []
    versions = []
    for entry in entries:
        name = entry.name
        if not name.isascii() or not name.isdigit() or not entry.is_dir():
            continue
        # Compared as text first: int() of a name of thousands of digits is slow.
        if len(name.lstrip("0")) > len(str(MAX_VERSION)):
            continue
        number = int(name)
        if 0 < number <= MAX_VERSION:
            versions.append(number)
    return sorted(versions)


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """A change marker for a version dir: a failed version is retried once it changes.

    Every entry below it counts (path, mtime, size), not saved_model.pb
    alone: a version refused because it was read while still being copied
    in becomes eligible again once any of its files changes. At most
    `SIGNATURE_MAX_ENTRIES` entries are read.
    """
    entries: list[tuple[str, int, int]] = []
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            full = os.path.join(root, name)
            try:
                stat = os.lstat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, path), stat.st_mtime_ns, stat.st_size))
            if len(entries) >= SIGNATURE_MAX_ENTRIES:
                return tuple(sorted(entries))
    return tuple(sorted(entries))


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
    """The training record's class names if they name each of `classes` classes, else ()."""
    names = record.get("class_names")
    if not isinstance(names, list) or len(names) != classes:
        if names is not None:
            log.warning("training record: %d class_names expected, ignoring %r", classes, names)
        return ()
    return tuple(str(n) for n in names)


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
        if isinstance(names, list) and set(names) == set(outputs):
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


def _read_record(path: Path) -> dict[str, Any]:
    record_path = path / TRAINING_RECORD
    if not record_path.exists():
        return {}  # a SavedModel from elsewhere: served without a training record
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {TRAINING_RECORD}: {exc}") from exc
    if not isinstance(record, dict):
        raise ModelLoadError(f"{TRAINING_RECORD} must hold a JSON object")
    return record


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
    Raises ModelLoadError when the SavedModel cannot be loaded, lacks a
    required signature, or any warm-up request fails or gives a wrong result.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    record = _read_record(path)
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
    )
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
        else:
            key = signature.input_name
            probe = [v[key] for s, v in warmup if s == SERVING_SIGNATURE and key in v]
            _use_litert(model, probe, threads=engine_threads, copies=engine_copies)
    for size in sorted(set(warm_batch_sizes)):
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


def _use_litert(model: LoadedModel, probe: list[np.ndarray], *, threads: int, copies: int) -> None:
    """Switch `model.predict` to LiteRT if the converted graph agrees with the SavedModel."""
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
        candidate = LiteRtEngine(convert_to_litert(model.module), threads=threads, copies=copies)
        difference = float(np.max(np.abs(candidate(images) - model.predict_tensorflow(images))))
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


class ModelManager:
    """Serves the newest good version under `base_path`; loads new ones in the background.

    Without a `policy`, the newest version that loads serves and the
    `keep_versions` newest loaded stay pinnable (a new version is loaded only
    when it is newer than the serving one). With a `model_config.VersionPolicy`
    (TF Serving's latest N / all / specific), exactly the versions it selects
    among those on disk are loaded; the newest loaded one serves.
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
        # Versions that failed, with the marker of the files that failed, and why.
        self._failed: dict[int, tuple[tuple[str, int, int], ...]] = {}
        self._errors: dict[int, str] = {}
        self._loading: int | None = None
        self._closed = False
        # Retired versions some request still holds.
        self._unloading: dict[int, LoadedModel] = {}
        self._poll_lock = asyncio.Lock()
        self._state_lock = threading.Lock()

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

    def _known_bad(self, version: int) -> bool:
        failed = self._failed.get(version)
        return failed is not None and failed == _signature(self.base_path / str(version))

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
        counted; the serving version is untouched by them.
        """
        async with self._poll_lock:
            if self._closed:
                return None
            swapped: int | None = None
            # Listed once per poll (every decision below sees the same versions), and
            # off the event loop, as are the change markers.
            available = await asyncio.to_thread(discover_versions, self.base_path)
            for version in await asyncio.to_thread(self._candidates, available):
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
            return swapped

    async def _load(self, version: int) -> LoadedModel | None:
        """Load one version (None: refused, logged and counted)."""
        path = self.base_path / str(version)
        marker = await asyncio.to_thread(_signature, path)
        self._loading = version
        # A thread cannot be stopped: if this poll is cancelled, the load runs on and
        # its result is released when it ends.
        loading = asyncio.ensure_future(
            asyncio.to_thread(self._loader, self.name, version, path, self.device)
        )
        try:
            model = await asyncio.shield(loading)
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
        """The loaded version `ref` names (the serving one when unpinned).

        Raises errors.NotFound for another model name or a version not loaded,
        errors.Unavailable when nothing serves yet.
        """
        if ref.name not in (None, "", self.name):
            raise errors.NotFound(
                f"model_spec.name: model {errors.shown(ref.name)} is not served here "
                f"(this serves {self.name!r})"
            )
        if ref.version is None or ref.version == 0:
            model = self._serving
            if model is None:
                raise errors.Unavailable(f"model {self.name!r} has no version ready yet")
            return model
        pinned = self._loaded.get(ref.version)
        if pinned is None:
            raise errors.NotFound(
                f"model {self.name!r} version {ref.version} is not loaded "
                f"(loaded versions: {list(self.loaded_versions)})"
            )
        return pinned

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
