"""Atomic, versioned SavedModel export with the serving signatures and assets.extra files.

Layout (the contract the server reads)::

    <base>/<version>/saved_model.pb, variables/
    <base>/<version>/assets.extra/training_record.json
    <base>/<version>/assets.extra/tf_serving_warmup_requests

The version is written into a hidden temporary directory under ``<base>`` and
renamed into place, so a poller never sees a half-written version.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from convserve.trainer.models import feature_model

SIGNATURE_FLOAT = "serving_default"
SIGNATURE_UINT8 = "predict_uint8"
SIGNATURE_FEATURES = "feature_maps"
ASSETS_EXTRA = "assets.extra"
TRAINING_RECORD = "training_record.json"
WARMUP_FILE = "tf_serving_warmup_requests"
# Warm-up batches of several sizes, so the first real requests of these sizes are not slow.
WARMUP_BATCH_SIZES = (1, 2, 4, 8)


class ExportError(Exception):
    """The model could not be exported (e.g. the requested version already exists)."""


def existing_versions(base: Path) -> list[int]:
    """Positive integer directory names under ``base``, sorted."""
    if not base.is_dir():
        return []
    versions = []
    for entry in base.iterdir():
        if entry.is_dir() and entry.name.isdigit() and int(entry.name) > 0:
            versions.append(int(entry.name))
    return sorted(versions)


def next_version(base: Path) -> int:
    """One more than the highest existing version, or 1."""
    versions = existing_versions(base)
    return versions[-1] + 1 if versions else 1


def _check_free(base: Path, version: int) -> None:
    target = base / str(version)
    if target.exists():
        raise ExportError(f"{target} already exists; choose another --version or omit it")


def model_image_shape(model: keras.Model) -> tuple[int, int]:
    """(height, width) of the single-channel images ``model`` takes."""
    _, height, width, channels = model.input.shape
    if height is None or width is None or channels != 1:
        raise ExportError(
            f"the model must take images [None, height, width, 1], got {list(model.input.shape)}"
        )
    return int(height), int(width)


def write_signatures(model: keras.Model, directory: Path, average_mirrored: bool = False) -> None:
    """Write the SavedModel with serving_default, predict_uint8 and feature_maps.

    ``average_mirrored``: the probabilities are the mean of the image's and its
    left-right mirror image's (feature maps stay those of the image itself).
    """
    features = feature_model(model)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(features)

    # The signatures take whatever image shape the model was built for (e.g. [None, 8, 8, 1]).
    shape = [None, *model_image_shape(model), 1]
    float_spec = tf.TensorSpec(shape, tf.float32, name="images")
    uint8_spec = tf.TensorSpec(shape, tf.uint8, name="images")

    def probabilities(images: tf.Tensor) -> tf.Tensor:
        result = model(images, training=False)
        if average_mirrored:
            mirrored = model(tf.reverse(images, axis=[2]), training=False)
            result = (result + mirrored) / 2.0
        return result

    def predict_float(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": probabilities(images)}

    def predict_uint8(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": probabilities(tf.cast(images, tf.float32) / 255.0)}

    def feature_maps(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return dict(features(images, training=False))

    archive.add_endpoint(SIGNATURE_FLOAT, predict_float, input_signature=[float_spec])
    archive.add_endpoint(SIGNATURE_UINT8, predict_uint8, input_signature=[uint8_spec])
    archive.add_endpoint(SIGNATURE_FEATURES, feature_maps, input_signature=[float_spec])
    archive.write_out(str(directory), verbose=False)


def write_warmup(path: Path, model_name: str, images: np.ndarray) -> int:
    """TF Serving warm-up records (PredictionLog) of held-out uint8 images [n,height,width].

    Returns the number of records written.
    """
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    if images.ndim != 3:
        raise ExportError(f"warm-up images must be [n, height, width], got {list(images.shape)}")
    scaled = images[..., None].astype(np.float32) / 255.0
    count = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        start = 0
        for size in WARMUP_BATCH_SIZES:
            batch = scaled[start : start + size]
            if len(batch) < size:
                break
            start += size
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE_FLOAT)
            )
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.float32))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
            count += 1
    return count


def export_model(
    model: keras.Model,
    base: str | os.PathLike[str],
    record: dict[str, Any],
    warmup_images: np.ndarray,
    version: int | None = None,
    average_mirrored: bool = False,
) -> Path:
    """Export ``model`` as ``<base>/<version>`` atomically; returns the version directory.

    ``version`` None picks the next integer. An existing version is never overwritten.
    ``average_mirrored``: see :func:`write_signatures`.
    """
    base_path = Path(base)
    if version is not None and version <= 0:
        raise ExportError(f"--version must be a positive integer, got {version}")
    check_finite(model)
    try:
        base_path.mkdir(parents=True, exist_ok=True)
        chosen = version if version is not None else next_version(base_path)
        _check_free(base_path, chosen)
        tmp = Path(tempfile.mkdtemp(prefix=f".export-{chosen}-", dir=base_path))
    except OSError as exc:
        raise ExportError(
            f"--model-base-path: cannot write to {base_path}: {exc.strerror or exc}"
        ) from exc
    try:
        write_signatures(model, tmp, average_mirrored)
        extra = tmp / ASSETS_EXTRA
        extra.mkdir(exist_ok=True)
        write_warmup(extra / WARMUP_FILE, str(record.get("model_name", "mnist")), warmup_images)
        with (extra / TRAINING_RECORD).open("w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
        # mkdtemp makes the directory private; a server running as another user must read it.
        os.chmod(tmp, 0o755)
        if version is None:
            # Another exporter may have taken the number meanwhile: move on to the next free one.
            chosen = max(chosen, next_version(base_path))
        _check_free(base_path, chosen)
        target = base_path / str(chosen)
        try:
            os.rename(tmp, target)
        except OSError as exc:
            raise ExportError(f"cannot move the export into {target}: {exc}") from exc
    except (OSError, tf.errors.OpError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # TensorFlow's messages can run on with op details; the first line says what failed.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(
            f"--model-base-path: cannot write the export under {base_path}: {reason}"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def check_finite(model: keras.Model) -> None:
    """ExportError unless every weight of ``model`` is finite.

    A diverged training run (too high a learning rate) leaves NaN or infinite
    weights; served, such a model answers NaN for every image.
    """
    for weight in model.weights:
        if not np.all(np.isfinite(keras.ops.convert_to_numpy(weight))):
            raise ExportError(
                f"weight {weight.path} is not finite (NaN or infinity): training diverged, "
                "nothing was exported; try a smaller --learning-rate"
            )
