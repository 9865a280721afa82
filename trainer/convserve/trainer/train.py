"""Training, evaluation and the training record."""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

# The public API can switch op determinism on but neither query nor reset it.
from tensorflow.python.framework import config as tf_config

from convserve.trainer.augment import (
    AUGMENTATIONS,
    Augmentation,
    augment,
    check_label_preserving,
    check_mirror_average,
)
from convserve.trainer.data import NUM_CLASSES, Dataset
from convserve.trainer.models import conv_layer_names

OPTIMIZERS = ("rmsprop", "adam", "sgd", "adamw", "nadam", "adagrad")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run."""

    arch: str = "keras"
    epochs: int = 5
    batch_size: int = 64
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-3
    seed: int = 0
    lr_schedule: str = "constant"
    augment: str = "none"
    label_smoothing: float = 0.0
    # Predict the mean of an image's and its left-right mirror image's probabilities
    # (only for classes that look the same mirrored).
    average_mirrored: bool = False


@dataclass(frozen=True)
class TrainResult:
    """What training produced: the model, its held-out accuracy and confusion matrix."""

    model: keras.Model
    test_accuracy: float
    confusion: np.ndarray
    training_time_s: float


@dataclass(frozen=True)
class Refit:
    """The exported model of a refit: the recipe trained again, on the training and
    test images together, after the evaluation."""

    model: keras.Model
    train_examples: int
    training_time_s: float


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Same seed, same model: seeds Python, NumPy and TF and makes TF ops deterministic.

    Op determinism is a process-wide switch; it is turned off again on exit unless it
    was on before, so a process that trains and then serves keeps its usual kernels.
    """
    keras.utils.set_random_seed(seed)
    was_enabled = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if not was_enabled:
            tf_config.disable_op_determinism()


def make_optimizer(
    name: str, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule
) -> keras.optimizers.Optimizer:
    classes: dict[str, type[keras.optimizers.Optimizer]] = {
        "rmsprop": keras.optimizers.RMSprop,
        "adam": keras.optimizers.Adam,
        "sgd": keras.optimizers.SGD,
        "adamw": keras.optimizers.AdamW,
        "nadam": keras.optimizers.Nadam,
        "adagrad": keras.optimizers.Adagrad,
    }
    if name not in classes:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return classes[name](learning_rate=learning_rate)


def as_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 [n,height,width] -> float32 [n,height,width,1] in [0, 1]."""
    return (images.astype(np.float32) / 255.0)[..., None]


def predict_probabilities(
    model: keras.Model, images: np.ndarray, average_mirrored: bool = False
) -> np.ndarray:
    """Class probabilities [n, classes] of float32 images [n, height, width, 1].

    With ``average_mirrored``, the mean of each image's and its left-right mirror
    image's probabilities: what the exported signatures compute for such a model.
    """
    probabilities = _predict(model, images)
    if average_mirrored:
        probabilities = (probabilities + _predict(model, images[:, :, ::-1])) / 2
    return probabilities


def _predict(model: keras.Model, images: np.ndarray) -> np.ndarray:
    # Batched here for the reason given in fit().
    batches = tf.data.Dataset.from_tensor_slices(np.ascontiguousarray(images)).batch(256)
    return np.asarray(model.predict(batches, verbose=0))


def confusion_matrix(
    labels: np.ndarray, predicted: np.ndarray, num_classes: int = NUM_CLASSES
) -> np.ndarray:
    """num_classes x num_classes counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return matrix


def format_confusion(matrix: np.ndarray, class_names: Sequence[str] = ()) -> str:
    """The confusion matrix as a text table (rows true, columns predicted, by class index).

    With ``class_names``, each row ends with its class's name.
    """
    classes = len(matrix)
    width = max(5, len(str(int(matrix.max()))) + 1)
    header = "true\\pred" + "".join(f"{d:>{width}}" for d in range(classes)) + "   recall"
    lines = [header, "-" * len(header)]
    for label in range(classes):
        row = matrix[label]
        total = int(row.sum())
        recall = f"{row[label] / total:8.3f}" if total else "       -"
        cells = "".join(f"{int(v):>{width}}" for v in row)
        # Digits are their own names; other names are worth a column.
        name = class_names[label] if label < len(class_names) else ""
        suffix = f"  {name}" if name and name != str(label) else ""
        lines.append(f"{label:>9}{cells} {recall}{suffix}")
    return "\n".join(lines)


def epoch_images(
    images: np.ndarray, policy: Augmentation, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's training images: a fresh order and, under ``policy``, fresh distortions.

    Returns (order [n], float32 model input [n, height, width, 1]); the caller takes
    its labels in the same order.
    """
    order = rng.permutation(len(images))
    chosen = images[order]
    if policy.enabled:
        chosen = augment(chosen, policy, rng)
    return order, as_model_input(chosen)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``: short enough for a line per epoch."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def epoch_line(
    epoch: int, epochs: int, epoch_s: float, elapsed_s: float, logs: dict[str, float]
) -> str:
    """The progress line printed after each epoch: its time, the loss, the ETA."""
    remaining = elapsed_s / epoch * (epochs - epoch)
    width = len(str(epochs))
    return (
        f"epoch {epoch:>{width}}/{epochs}: {epoch_s:5.1f} s, "
        f"loss {logs.get('loss', float('nan')):.4f}, "
        f"accuracy {logs.get('accuracy', float('nan')):.4f} (training images); "
        f"{format_duration(elapsed_s)} elapsed, ETA {format_duration(remaining)}"
    )


def fit(
    model: keras.Model, data: Dataset, config: TrainConfig, say: Callable[[str], None]
) -> float:
    """Fit ``model`` on the training split of ``data``; returns the training time in s.

    Each epoch is one ``fit`` call on images made for it (the order, and the distortions
    of an augmentation policy, drawn from a generator seeded with ``config.seed``):
    Keras reads them at about twice the rate of a ``PyDataset`` of the same batches.
    The optimizer, and with it the learning-rate schedule, carries on across the calls.
    """
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
    if config.augment not in AUGMENTATIONS:
        raise ValueError(f"--augment must be one of {', '.join(AUGMENTATIONS)}")
    policy = AUGMENTATIONS[config.augment]
    check_label_preserving(policy, data.mirror_symmetric, data.image_shape)
    if config.average_mirrored:
        check_mirror_average(data.mirror_symmetric)
    steps_per_epoch = -(-len(data.x_train) // config.batch_size)
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = config.learning_rate
    if config.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            config.learning_rate, decay_steps=config.epochs * steps_per_epoch
        )
    labels = data.y_train
    loss: str | keras.losses.Loss = "sparse_categorical_crossentropy"
    if config.label_smoothing > 0:
        # Keras smooths only one-hot targets.
        labels = keras.utils.to_categorical(data.y_train, data.num_classes)
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    model.compile(
        optimizer=make_optimizer(config.optimizer, learning_rate),
        loss=loss,
        metrics=["accuracy"],
    )
    say(
        f"training {config.arch} on {len(data.x_train)} images of {data.name}: "
        f"{config.epochs} epoch(s), "
        f"batch {config.batch_size}, {config.optimizer} lr={config.learning_rate:g} "
        f"({config.lr_schedule}), augmentation {config.augment}, "
        f"label smoothing {config.label_smoothing:g}, seed {config.seed}"
        + (", predictions averaged with the mirror image's" if config.average_mirrored else "")
    )
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        began = time.perf_counter()
        order, images = epoch_images(data.x_train, policy, rng)
        # Batched here rather than by Keras: Keras' own pipeline for arrays logs an
        # error line (an attribute unknown to this TensorFlow's kernels) every epoch
        # under op determinism, and is no faster.
        batches = tf.data.Dataset.from_tensor_slices((images, labels[order]))
        history = model.fit(batches.batch(config.batch_size), shuffle=False, verbose=0)
        now = time.perf_counter()
        logs = {name: float(values[-1]) for name, values in history.history.items()}
        say(epoch_line(epoch, config.epochs, now - began, now - started, logs))
    return time.perf_counter() - started


def train(
    model: keras.Model, data: Dataset, config: TrainConfig, say: Callable[[str], None]
) -> TrainResult:
    """Fit ``model`` on the training split (see :func:`fit`) and evaluate it on the test
    split."""
    elapsed = fit(model, data, config, say)
    x_test = as_model_input(data.x_test)
    probabilities = predict_probabilities(model, x_test, config.average_mirrored)
    predicted = np.argmax(probabilities, axis=1)
    accuracy = float(np.mean(predicted == data.y_test))
    confusion = confusion_matrix(data.y_test, predicted, data.num_classes)
    return TrainResult(model, accuracy, confusion, elapsed)


def layer_table(model: keras.Model) -> list[dict[str, Any]]:
    """One row per layer, like ``model.summary()``: name, type, output shape, parameters."""
    rows = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        shape = layer.output.shape
        rows.append(
            {
                "name": layer.name,
                "type": type(layer).__name__,
                "output_shape": [int(d) for d in shape[1:]],
                "parameters": int(layer.count_params()),
                "trainable": bool(layer.trainable),
            }
        )
    return rows


def training_record(
    *,
    model_name: str,
    data: Dataset,
    config: TrainConfig,
    result: TrainResult,
    fixed_kernel: str,
    limit_train: int | None,
    refit: Refit | None = None,
) -> dict[str, Any]:
    """The assets.extra/training_record.json document.

    With ``refit``, the record describes the refit model (its layers, parameters and
    training examples) while the test figures stay those of ``result``, the same
    recipe trained on the training split alone; ``refit`` and the model card say so.
    """
    model = result.model if refit is None else refit.model
    hyperparameters = {
        "epochs": str(config.epochs),
        "batch_size": str(config.batch_size),
        "optimizer": config.optimizer,
        "learning_rate": f"{config.learning_rate:g}",
        "seed": str(config.seed),
        "lr_schedule": config.lr_schedule,
        "augment": config.augment,
        "label_smoothing": f"{config.label_smoothing:g}",
        "average_mirrored": "true" if config.average_mirrored else "false",
        "refit": "true" if refit else "false",
        "limit_train": "" if limit_train is None else str(limit_train),
        "fixed_kernel": fixed_kernel,
    }
    exported_at = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    confusion = result.confusion.astype(int).tolist()
    return {
        "model_name": model_name,
        "dataset": data.name,
        "architecture": config.arch,
        "hyperparameters": hyperparameters,
        "test_accuracy": result.test_accuracy,
        # What the exported model trained on.
        "train_examples": len(data.x_train) if refit is None else refit.train_examples,
        "test_examples": len(data.x_test),
        "training_time_s": round(result.training_time_s, 3),
        "refit": None if refit is None else _refit_document(refit),
        "exported_at": exported_at.isoformat().replace("+00:00", "Z"),
        "tensorflow_version": tf.__version__,
        "fixed_kernel": fixed_kernel,
        "total_parameters": int(model.count_params()),
        "seed": config.seed,
        "layers": layer_table(model),
        "feature_map_layers": conv_layer_names(model),
        "confusion_matrix": confusion,
        "class_names": list(data.class_names),
        "model_card": {
            "dataset": data.name,
            "source": data.source,
            "image_shape": [*data.image_shape, 1],
            "train_examples": len(data.x_train),
            "test_examples": len(data.x_test),
            "test_split": data.test_split,
            "test_accuracy": result.test_accuracy,
            "confusion_matrix": confusion,
            "architecture": config.arch,
            "parameters": int(model.count_params()),
            "training_time_s": round(result.training_time_s, 3),
            "prediction": (
                "mean of the image's and its left-right mirror image's probabilities"
                if config.average_mirrored
                else "the network's probabilities"
            ),
            "exported_model": (
                "the model evaluated here"
                if refit is None
                else f"the same recipe and seed trained again on the {len(data.x_train):,} "
                f"training and {len(data.x_test):,} test images together after this "
                "evaluation; the test figures are of the model trained without the test "
                "images"
            ),
        },
    }


def _refit_document(refit: Refit) -> dict[str, Any]:
    return {
        "train_examples": refit.train_examples,
        "training_time_s": round(refit.training_time_s, 3),
    }


def held_out_samples(data: Dataset, per_class: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A few held-out images, ``per_class`` of each class, interleaved 0..9, 0..9, ..."""
    picks: list[int] = []
    for round_ in range(per_class):
        for label in range(data.num_classes):
            members = np.flatnonzero(data.y_test == label)
            if round_ < len(members):
                picks.append(int(members[round_]))
    index = np.asarray(picks, dtype=np.int64)
    return data.x_test[index], data.y_test[index]


__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "Refit",
    "TrainConfig",
    "TrainResult",
    "confusion_matrix",
    "deterministic",
    "epoch_images",
    "epoch_line",
    "fit",
    "format_confusion",
    "held_out_samples",
    "layer_table",
    "predict_probabilities",
    "train",
    "training_record",
]
