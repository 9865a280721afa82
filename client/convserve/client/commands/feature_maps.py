"""``convserve feature-maps``: save the convolution layers' activations as PNG grids."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from convserve.client.commands.common import (
    EXIT_OK,
    Command,
    add_version_options,
    connect,
    emit,
    version_pin,
)
from convserve.client.commands.predict import RawSource, read_images, read_source
from convserve.client.errors import InputError
from convserve.client.table import format_table
from convserve.v1.images import ImageShape, require_pillow


def _grid(maps: np.ndarray, scale: int) -> np.ndarray:
    """[H,W,F] activations -> one uint8 mosaic, each map scaled to its own range."""
    height, width, count = maps.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    gap = 1
    canvas = np.full((rows * (height + gap) - gap, cols * (width + gap) - gap), 64, dtype=np.uint8)
    for f in range(count):
        tile = maps[:, :, f].astype(np.float64)
        low, high = tile.min(), tile.max()
        tile = (tile - low) / (high - low) * 255.0 if high > low else np.zeros_like(tile)
        r, c = divmod(f, cols)
        y, x = r * (height + gap), c * (width + gap)
        canvas[y : y + height, x : x + width] = np.rint(tile).astype(np.uint8)
    return np.kron(canvas, np.ones((scale, scale), dtype=np.uint8))


def _single_image(raw: RawSource, shape: ImageShape) -> np.ndarray:
    images = read_images(raw, shape).images
    if images.shape[0] != 1:
        raise InputError(f"{raw.name}: expected one image, got {images.shape[0]}")
    return images


def run(args: argparse.Namespace) -> int:
    Image = require_pillow()
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: not a directory")
    raw = read_source(Path(args.image))
    layers = [name for name in args.layers.split(",") if name] if args.layers else []
    with connect(args) as client:
        pin = version_pin(args)
        meta = client.metadata(**pin)
        image = _single_image(raw, meta.input_shape)
        result = client.feature_maps(image, layers=layers, **pin)
    output.mkdir(parents=True, exist_ok=True)
    rows, records = [], []
    for i, (layer, maps) in enumerate(result.maps.items()):
        path = output / f"{i:02d}_{layer}.png"
        Image.fromarray(_grid(maps, args.scale)).save(path)
        rows.append([layer, "x".join(map(str, maps.shape)), path])
        records.append({"layer": layer, "shape": list(maps.shape), "file": str(path)})
    text = format_table(["layer", "shape (HxWxF)", "file"], rows)
    text += f"\nmodel {result.model_name} version {result.model_version}"
    data = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "feature_maps": records,
    }
    emit(args, data, text)
    return EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "image", metavar="IMG", help="PNG/JPEG image or .npy array of one image for the model"
    )
    parser.add_argument("--output", required=True, help="directory for one PNG grid per layer")
    parser.add_argument("--layers", help="comma-separated layer names (default: all)")
    parser.add_argument("--scale", type=int, default=4, help="pixel size of the grids (default 4)")
    add_version_options(parser)


COMMAND = Command("feature-maps", "save the convolution layers' activations", run, add_arguments)
