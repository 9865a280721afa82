"""``convserve predict``: classify image files and arrays, and read the files it takes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convserve.client.commands.common import (
    EXIT_OK,
    Command,
    add_version_options,
    connect,
    emit,
    load_npy,
    version_pin,
)
from convserve.client.config import DEFAULT_MAX_BATCH_IMAGES
from convserve.client.errors import InputError
from convserve.client.images import image_batch, load_grayscale, prepare_image
from convserve.client.results import ModelMetadata
from convserve.client.table import format_table
from convserve.v1.images import MAX_IMAGE_PIXELS, ImageShape


@dataclass
class RawSource:
    """A file as read, before it is checked against the model's input shape."""

    name: str
    pixels: np.ndarray | None  # an array from .npy / .npz
    gray: np.ndarray | None  # a decoded image file, gray levels in [0, 255]
    labels: np.ndarray | None


@dataclass
class Source:
    name: str
    images: np.ndarray  # [n,H,W,C] uint8 or float32
    labels: np.ndarray | None  # expected class indices, from an .npz
    single: bool  # one image file: no index to show


def read_source(path: Path) -> RawSource:
    """Read a file; needs no server, so unreadable files fail before any call."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as loaded:
                files = list(loaded.files)
                if "images" not in files:
                    raise InputError(f"{path}: no 'images' array (found {', '.join(files)})")
                raw, labels = loaded["images"], loaded["labels"] if "labels" in files else None
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a numpy .npz file ({exc})") from exc
        return RawSource(path.name, raw, None, labels)
    if suffix == ".npy":
        return RawSource(path.name, load_npy(path), None, None)
    return RawSource(path.name, None, load_grayscale(path), None)


def read_images(raw: RawSource, shape: ImageShape) -> Source:
    """The file's images as the model takes them (`shape` is its (H, W, C))."""
    if raw.pixels is None:
        assert raw.gray is not None
        return Source(raw.name, prepare_image(raw.gray, shape)[np.newaxis], None, True)
    try:
        images = image_batch(raw.pixels, shape)
    except InputError as exc:
        raise InputError(f"{raw.name}: {exc}") from None
    labels = raw.labels
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise InputError(f"{raw.name}: {labels.shape[0]} labels for {images.shape[0]} images")
    return Source(raw.name, images, labels, False)


def _class_name(meta: ModelMetadata, index: int) -> str:
    names = meta.class_names
    return names[index] if 0 <= index < len(names) else str(index)


def run(args: argparse.Namespace) -> int:
    raws = [read_source(Path(f)) for f in args.files]
    with connect(args, max_batch_images=args.batch_size) as client:
        # The input shape says how to read the files; the class names label the top 3.
        pin = version_pin(args)
        meta = client.metadata(**pin)
        sources = [read_images(raw, meta.input_shape) for raw in raws]
        result = client.predict([s.images for s in sources], **pin)
    with_labels = any(s.labels is not None for s in sources)
    rows: list[list[object]] = []
    records: list[dict[str, Any]] = []
    correct = labelled = 0
    position = 0
    for source in sources:
        for i in range(source.images.shape[0]):
            prediction = result[position]
            position += 1
            top = [(c, _class_name(meta, c), p) for c, p in prediction.top(3)]
            record: dict[str, Any] = {
                "file": source.name,
                "index": i,
                "class_index": prediction.class_index,
                "digit": prediction.class_index,
                "label": prediction.label,
                "confidence": round(prediction.confidence, 6),
                "top3": [
                    {"class_index": c, "label": name, "probability": round(p, 6)}
                    for c, name, p in top
                ],
            }
            row: list[object] = [
                source.name,
                "-" if source.single else i,
                prediction.class_index,
                prediction.label,
                f"{prediction.confidence:.4f}",
                "  ".join(f"{name}:{p:.3f}" for _, name, p in top),
            ]
            if source.labels is not None:
                expected = int(source.labels[i])
                match = expected == prediction.class_index
                correct += match
                labelled += 1
                record.update(expected=expected, match=match)
                row += [expected, "yes" if match else "NO"]
            elif with_labels:
                row += ["-", "-"]
            records.append(record)
            rows.append(row)
    headers = ["file", "index", "class", "label", "confidence", "top-3"]
    if with_labels:
        headers += ["expected", "match"]
    text = format_table(headers, rows, right=(1, 2, 4, 6))
    text += f"\nmodel {result.model_name} version {result.model_version}"
    if labelled:
        text += f"; {correct}/{labelled} correct ({100.0 * correct / labelled:.1f}%)"
    data: dict[str, Any] = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "predictions": records,
    }
    if labelled:
        data["accuracy"] = correct / labelled
    emit(args, data, text)
    return EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="image files (prepared the MNIST way at the model's input size; at most "
        f"{MAX_IMAGE_PIXELS:,} pixels), .npy arrays shaped as the model's input, or .npz "
        "files with 'images' (and optional 'labels', the expected class indices, then the "
        "match is shown)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_IMAGES,
        help="images per request; larger inputs are split (default %(default)s)",
    )
    add_version_options(parser)


COMMAND = Command(
    "predict",
    "classify PNG/JPEG images or .npy/.npz arrays with a model",
    run,
    add_arguments,
)
