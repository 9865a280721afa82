"""Shared pieces for the runtime and model tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from convserve.server.metrics import Metrics
from convserve.server.runtime import Runtime
from convserve.server.settings import Settings


def make_settings(base: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_base_path": base,
        "device": "cpu",
        "poll_interval_s": 3600,  # tests poll explicitly with poll_once()
        "max_batch_size": 16,
        "batch_timeout_us": 1000,
        "max_queued_images": 256,
        "max_concurrent_batches": 2,
        "max_images_per_request": 64,
    }
    values.update(overrides)
    return Settings(**values)


def copy_base(source: Path, target: Path, versions: dict[int, int] | None = None) -> Path:
    """Copy `source`'s versions into `target` as {source version: new version}."""
    target.mkdir(parents=True, exist_ok=True)
    for old, new in (versions or {1: 1}).items():
        shutil.copytree(source / str(old), target / str(new))
    return target


async def started_runtime(settings: Settings) -> tuple[Runtime, Metrics]:
    metrics = Metrics()
    runtime = Runtime(settings, metrics)
    await runtime.start()
    return runtime, metrics


def saved_model_probabilities(version_dir: Path, images: np.ndarray) -> np.ndarray:
    """The SavedModel's own serving_default output for float32 [N,28,28,1] images."""
    module = tf.saved_model.load(str(version_dir))
    out = module.signatures["serving_default"](images=tf.constant(images, dtype=tf.float32))
    return np.asarray(out["probabilities"].numpy())


def float_digits(images_u8: np.ndarray) -> np.ndarray:
    return (images_u8.astype(np.float32) / np.float32(255.0)).reshape(-1, 28, 28, 1)
