"""``convserve convolve``: apply a kernel; and the convolution flags fit-kernel shares."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from convserve.client.commands.common import (
    EXIT_OK,
    Command,
    UsageError,
    connect,
    emit,
    ints,
    load_npy,
    matrix_text,
)
from convserve.client.errors import InputError
from convserve.client.images import load_grayscale
from convserve.v1.images import MAX_IMAGE_PIXELS, require_pillow

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _padding(text: str) -> str | list[int]:
    if text.lower() in ("valid", "same"):
        return text.lower()
    return ints(text, 4, "--padding (valid, same or top,bottom,left,right)")


def _pair(text: str, name: str) -> list[int]:
    values = ints(text, (1, 2), name)
    return values * 2 if len(values) == 1 else values


def add_convolution_options(parser: argparse.ArgumentParser) -> None:
    """--mode, --stride, --padding and --dilation (see `convolution_kwargs`)."""
    parser.add_argument(
        "--mode", choices=("cross-correlation", "convolution"), default="cross-correlation"
    )
    parser.add_argument("--stride", default="1", help="S or SH,SW (default 1)")
    parser.add_argument(
        "--padding", default="valid", help="valid, same, or top,bottom,left,right (default valid)"
    )
    parser.add_argument("--dilation", default="1", help="D or DH,DW (default 1)")


def convolution_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The client's convolution arguments from the flags of `add_convolution_options`."""
    return {
        "mode": args.mode,
        "strides": _pair(args.stride, "--stride"),
        "padding": _padding(args.padding),
        "dilations": _pair(args.dilation, "--dilation"),
    }


def _array_argument(text: str, name: str) -> np.ndarray:
    """A .npy file or a JSON literal such as '[[1,-1]]'."""
    if text.endswith(".npy"):
        return load_npy(Path(text))
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InputError(f"{name}: expected a JSON array such as [[1,-1]] or a .npy file") from None
    try:
        return np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise InputError(f"{name}: expected a rectangular array of numbers, got {text!r}") from None


def _load_input_array(text: str) -> np.ndarray:
    path = Path(text)
    if path.suffix.lower() == ".npy":
        return load_npy(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return (load_grayscale(path) / 255.0).astype(np.float32)
    raise InputError(f"{path}: expected a .npy array or a PNG/JPEG image")


def _save_png(array: np.ndarray, path: Path) -> None:
    """Gray levels scaled linearly from [min, max] to [0, 255]."""
    image = np.squeeze(array)
    if image.ndim != 2:
        raise InputError(
            f"{path}: a PNG holds one [H,W] map, the output has shape {list(array.shape)}; use .npy"
        )
    low, high = float(image.min()), float(image.max())
    scaled = (image - low) / (high - low) * 255.0 if high > low else np.zeros_like(image)
    require_pillow().fromarray(np.rint(scaled).astype(np.uint8)).save(path)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix.lower() not in (".npy", ".png"):
        raise UsageError(f"--output: expected a .npy or .png file name, got {args.output!r}")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent}: no such directory")
    x = _load_input_array(args.input)
    kernel = _array_argument(args.kernel, "--kernel")
    bias = _array_argument(args.bias, "--bias") if args.bias is not None else None
    kwargs = convolution_kwargs(args)
    with connect(args) as client:
        y = client.convolve(x, kernel, bias, **kwargs)
    if output.suffix.lower() == ".npy":
        np.save(output, y)
    else:
        _save_png(y, output)
    data: dict[str, Any] = {
        "output": str(output),
        "shape": list(y.shape),
        "dtype": y.dtype.name,
        "min": float(y.min()),
        "max": float(y.max()),
    }
    text = (
        f"output {list(y.shape)} {y.dtype.name}, values {_fmt(y.min())} to {_fmt(y.max())}, "
        f"written to {output}"
    )
    if y.size <= 400:
        data["values"] = y.tolist()
        text += "\n" + matrix_text(y)
    emit(args, data, text)
    return EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        required=True,
        help=f"PNG/JPEG (gray levels in [0,1]; at most {MAX_IMAGE_PIXELS:,} pixels) or .npy",
    )
    parser.add_argument("--kernel", required=True, help="JSON such as '[[1,-1]]', or a .npy file")
    parser.add_argument("--bias", help="a number, a JSON list (one per output channel), or .npy")
    add_convolution_options(parser)
    parser.add_argument("--output", required=True, help="OUT.npy (values) or OUT.png (rescaled)")


COMMAND = Command("convolve", "apply a kernel to an image or array", run, add_arguments)
