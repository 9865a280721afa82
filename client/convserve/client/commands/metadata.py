"""``convserve metadata``: a model's layers, classes and training record."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict

from convserve.client.commands.common import (
    EXIT_OK,
    Command,
    add_version_options,
    connect,
    emit,
    version_pin,
)
from convserve.client.table import format_table


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join("None" if d < 0 else str(d) for d in shape) + ")"


def run(args: argparse.Namespace) -> int:
    with connect(args) as client:
        meta = client.metadata(**version_pin(args))
    layer_rows = [
        [
            f"{layer.name} ({layer.type})",
            _shape_text((-1, *layer.output_shape)),
            f"{layer.parameters:,}",
            "yes" if layer.trainable else "no",
        ]
        for layer in meta.layers
    ]
    t = meta.training
    lines = [
        f"model {meta.model_name}, serving version {meta.serving_version} "
        f"(loaded: {', '.join(map(str, meta.loaded_versions))}) on {meta.device}",
    ]
    for kind, specs in (("input", meta.inputs), ("output", meta.outputs)):
        for spec in specs:
            lines.append(f"{kind} {spec.name}: {'|'.join(spec.dtypes)} {_shape_text(spec.shape)}")
    lines += [
        "",
        format_table(
            ["Layer (type)", "Output Shape", "Param #", "Trainable"], layer_rows, right=(2,)
        ),
        f"Total params: {t.total_parameters:,}",
        "",
        f"trained on {t.dataset} ({t.train_examples} examples, architecture {t.architecture}) "
        f"in {t.training_time_s:.1f} s with TensorFlow {t.tensorflow_version}",
        f"test accuracy {t.test_accuracy:.4f} on {t.test_examples} examples; "
        f"exported {t.exported_at}",
    ]
    if t.fixed_kernel:
        lines.append(f"fixed first-layer kernel: {t.fixed_kernel}")
    if t.hyperparameters:
        lines.append(
            "hyperparameters: " + ", ".join(f"{k}={v}" for k, v in t.hyperparameters.items())
        )
    if meta.class_names:
        lines.append(
            "classes: " + ", ".join(f"{i} {name}" for i, name in enumerate(meta.class_names))
        )
    if t.confusion_matrix is not None:
        matrix = t.confusion_matrix
        size = matrix.shape[0]
        lines += [
            "",
            "confusion matrix (rows: true class, columns: predicted class):",
            format_table(
                ["", *range(size)],
                [[i, *matrix[i].tolist()] for i in range(size)],
                right=range(size + 1),
            ),
        ]
    data = asdict(meta)
    matrix_or_none = t.confusion_matrix
    data["training"]["confusion_matrix"] = (
        matrix_or_none.tolist() if matrix_or_none is not None else None
    )
    emit(args, data, "\n".join(lines))
    return EXIT_OK


COMMAND = Command(
    "metadata",
    "show the model's layers, classes and training record",
    run,
    add_version_options,
)
