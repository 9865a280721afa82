"""Writing MNIST IDX files for loader tests."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from convserve.trainer.data import IDX_FILES, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """The IDX encoding of ``array``: big-endian magic, dimensions, then the bytes."""
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(
    directory: Path, arrays: dict[str, np.ndarray], gz: bool, dotted: bool = False
) -> dict[str, Path]:
    """The four MNIST IDX files of ``arrays`` (x_train, ...) in ``directory``; their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = {
        "train_images": "x_train",
        "train_labels": "y_train",
        "test_images": "x_test",
        "test_labels": "y_test",
    }
    paths = {}
    for part, stem in IDX_FILES.items():
        magic = IDX_IMAGES_MAGIC if part.endswith("images") else IDX_LABELS_MAGIC
        data = idx_bytes(arrays[keys[part]], magic)
        name = stem.replace("-idx", ".idx") if dotted else stem
        path = directory / (name + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(data) if gz else data)
        paths[part] = path
    return paths
