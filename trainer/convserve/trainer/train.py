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

from convserve.trainer.augment import AUGMENTATIONS, augment, check_label_preserving
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
    verbose: bool = True


@dataclass(frozen=True)
class TrainResult:
    """What training produced: the model, its held-out accuracy and confusion matrix."""

    model: keras.Model
    test_accuracy: float
    confusion: np.ndarray
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


class AugmentedImages(keras.utils.PyDataset):
    """Training batches whose images are augmented anew every epoch.

    Small data sets overfit quickly; label-preserving distortions (shifts, elastic
    warps, mirrored clothes) show the model new images every epoch. The order and the
    distortions come from a seeded generator, so a fixed seed gives the same model.
    ``labels`` are class indices [n] or, with label smoothing, one-hot rows [n, classes].
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        seed: int,
        policy: str,
    ):
        super().__init__()
        self._images, self._labels, self._batch_size = images, labels, batch_size
        self._policy = AUGMENTATIONS[policy]
        self._rng = np.random.default_rng(seed)
        self._new_epoch()

    def _new_epoch(self) -> None:
        order = self._rng.permutation(len(self._images))
        self._x = as_model_input(augment(self._images[order], self._policy, self._rng))
        self._y = self._labels[order]

    def __len__(self) -> int:
        return -(-len(self._images) // self._batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        batch = slice(index * self._batch_size, (index + 1) * self._batch_size)
        return self._x[batch], self._y[batch]

    def on_epoch_end(self) -> None:
        self._new_epoch()


def train(
    model: keras.Model, data: Dataset, config: TrainConfig, say: Callable[[str], None]
) -> TrainResult:
    """Fit ``model`` on the training split and evaluate it on the test split."""
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
    if config.augment not in AUGMENTATIONS:
        raise ValueError(f"--augment must be one of {', '.join(AUGMENTATIONS)}")
    check_label_preserving(AUGMENTATIONS[config.augment], data.mirror_symmetric, data.image_shape)
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
    x_test = as_model_input(data.x_test)
    say(
        f"training {config.arch} on {len(data.x_train)} images of {data.name}: "
        f"{config.epochs} epoch(s), "
        f"batch {config.batch_size}, {config.optimizer} lr={config.learning_rate:g} "
        f"({config.lr_schedule}), augmentation {config.augment}, "
        f"label smoothing {config.label_smoothing:g}, seed {config.seed}"
    )
    verbose = 1 if config.verbose else 0
    started = time.perf_counter()
    if config.augment != "none":
        batches = AugmentedImages(
            data.x_train, labels, config.batch_size, config.seed, config.augment
        )
        model.fit(batches, epochs=config.epochs, verbose=verbose)
    else:
        model.fit(
            as_model_input(data.x_train),
            labels,
            epochs=config.epochs,
            batch_size=config.batch_size,
            shuffle=True,
            verbose=verbose,
        )
    elapsed = time.perf_counter() - started
    probabilities = model.predict(x_test, batch_size=256, verbose=0)
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
) -> dict[str, Any]:
    """The assets.extra/training_record.json document."""
    model = result.model
    hyperparameters = {
        "epochs": str(config.epochs),
        "batch_size": str(config.batch_size),
        "optimizer": config.optimizer,
        "learning_rate": f"{config.learning_rate:g}",
        "seed": str(config.seed),
        "lr_schedule": config.lr_schedule,
        "augment": config.augment,
        "label_smoothing": f"{config.label_smoothing:g}",
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
        "train_examples": len(data.x_train),
        "test_examples": len(data.x_test),
        "training_time_s": round(result.training_time_s, 3),
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
        },
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
    "TrainConfig",
    "TrainResult",
    "confusion_matrix",
    "deterministic",
    "format_confusion",
    "held_out_samples",
    "layer_table",
    "train",
    "training_record",
]
