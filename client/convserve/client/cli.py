"""The ``convserve`` command line: talk to a convserve server and load-test it."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from convserve.client import bench_http, bench_metrics, bench_report, bench_requests, bench_sweep
from convserve.client.bench import HTTP_PROTOCOLS, PROTOCOLS, BenchConfig, Phase, SetupError
from convserve.client.channel import TlsConfig
from convserve.client.config import DEFAULT_MAX_BATCH_IMAGES, DEFAULT_TARGET
from convserve.client.errors import ConvServeError, InputError
from convserve.client.images import (
    MAX_IMAGE_PIXELS,
    ImageShape,
    image_batch,
    load_grayscale,
    prepare_image,
    require_pillow,
)
from convserve.client.results import ModelMetadata
from convserve.client.sync_client import ConvServeClient
from convserve.client.table import format_table

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_UNAVAILABLE = 4
EXIT_AUTH = 5

EXIT_CODES_HELP = """\
exit codes:
  0  success (health: the server is SERVING)
  1  any other failure
  2  usage error or unreadable / invalid input file
  3  the server rejected the request (INVALID_ARGUMENT, NOT_FOUND)
  4  the server is unavailable, not serving, or the deadline passed
     (UNAVAILABLE, DEADLINE_EXCEEDED)
  5  authentication failed (UNAUTHENTICATED, PERMISSION_DENIED)

environment: CONVSERVE_TARGET (default --target), CONVSERVE_TOKEN (default --token)
"""

_CODE_TO_EXIT = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_REJECTED,
    grpc.StatusCode.NOT_FOUND: EXIT_REJECTED,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class UsageError(Exception):
    """A flag value that argparse cannot check by itself."""


def exit_code_for(code: grpc.StatusCode) -> int:
    return _CODE_TO_EXIT.get(code, EXIT_OTHER)


# --- Parsing helpers ----------------------------------------------------------------


def _ints(text: str, count: int | tuple[int, ...], name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated integers, got {text!r}") from None
    counts = (count,) if isinstance(count, int) else count
    if len(values) not in counts:
        raise UsageError(f"{name}: expected {' or '.join(map(str, counts))} values, got {text!r}")
    return values


def _positive_list(text: str, name: str, kind: Callable[[str], Any]) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{name}: every value must be positive, got {text!r}")
    return values


def _padding(text: str) -> str | list[int]:
    if text.lower() in ("valid", "same"):
        return text.lower()
    return _ints(text, 4, "--padding (valid, same or top,bottom,left,right)")


def _pair(text: str, name: str) -> list[int]:
    values = _ints(text, (1, 2), name)
    return values * 2 if len(values) == 1 else values


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a numpy .npy file ({exc})") from exc


def _array_argument(text: str, name: str) -> np.ndarray:
    """A .npy file or a JSON literal such as '[[1,-1]]'."""
    if text.endswith(".npy"):
        return _load_npy(Path(text))
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InputError(f"{name}: expected a JSON array such as [[1,-1]] or a .npy file") from None
    try:
        return np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise InputError(f"{name}: expected a rectangular array of numbers, got {text!r}") from None


def _read_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise InputError(f"{args.token_file}: cannot read token ({exc.strerror})") from None
    return args.token or None


def _tls(args: argparse.Namespace) -> TlsConfig | None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key must be given together")
    wanted = args.tls or args.tls_ca or args.tls_cert or args.tls_server_name
    if not wanted:
        return None
    for path in (args.tls_ca, args.tls_cert, args.tls_key):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{path}: no such file")
    return TlsConfig(
        root_ca=args.tls_ca,
        client_cert=args.tls_cert,
        client_key=args.tls_key,
        server_name_override=args.tls_server_name,
    )


def _client(args: argparse.Namespace, **kwargs: Any) -> ConvServeClient:
    return ConvServeClient(
        args.target,
        timeout_s=args.timeout_s,
        tls=_tls(args) or False,
        token=_read_token(args),
        retries=args.retries,
        model_name=args.model,
        **kwargs,
    )


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _matrix_text(array: np.ndarray) -> str:
    return np.array2string(array, precision=4, suppress_small=True, max_line_width=100)


# --- predict ---------------------------------------------------------------------------


@dataclass
class _RawSource:
    """A file as read, before it is checked against the model's input shape."""

    name: str
    pixels: np.ndarray | None  # an array from .npy / .npz
    gray: np.ndarray | None  # a decoded image file, gray levels in [0, 255]
    labels: np.ndarray | None


@dataclass
class _Source:
    name: str
    images: np.ndarray  # [n,H,W,C] uint8 or float32
    labels: np.ndarray | None  # expected class indices, from an .npz
    single: bool  # one image file: no index to show


def _read_source(path: Path) -> _RawSource:
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
        return _RawSource(path.name, raw, None, labels)
    if suffix == ".npy":
        return _RawSource(path.name, _load_npy(path), None, None)
    return _RawSource(path.name, None, load_grayscale(path), None)


def _source(raw: _RawSource, shape: ImageShape) -> _Source:
    """The file's images as the model takes them (`shape` is its (H, W, C))."""
    if raw.pixels is None:
        assert raw.gray is not None
        return _Source(raw.name, prepare_image(raw.gray, shape)[np.newaxis], None, True)
    try:
        images = image_batch(raw.pixels, shape)
    except InputError as exc:
        raise InputError(f"{raw.name}: {exc}") from None
    labels = raw.labels
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise InputError(f"{raw.name}: {labels.shape[0]} labels for {images.shape[0]} images")
    return _Source(raw.name, images, labels, False)


def _class_name(meta: ModelMetadata, index: int) -> str:
    names = meta.class_names
    return names[index] if 0 <= index < len(names) else str(index)


def _cmd_predict(args: argparse.Namespace) -> int:
    raws = [_read_source(Path(f)) for f in args.files]
    with _client(args, max_batch_images=args.batch_size) as client:
        # The input shape says how to read the files; the class names label the top 3.
        pin = _pin(args)
        meta = client.metadata(**pin)
        sources = [_source(raw, meta.input_shape) for raw in raws]
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
    _emit(args, data, text)
    return EXIT_OK


# --- convolve and fit-kernel -----------------------------------------------------------


def _convolution_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "mode": args.mode,
        "strides": _pair(args.stride, "--stride"),
        "padding": _padding(args.padding),
        "dilations": _pair(args.dilation, "--dilation"),
    }


def _load_input_array(text: str) -> np.ndarray:
    path = Path(text)
    if path.suffix.lower() == ".npy":
        return _load_npy(path)
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


def _cmd_convolve(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix.lower() not in (".npy", ".png"):
        raise UsageError(f"--output: expected a .npy or .png file name, got {args.output!r}")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent}: no such directory")
    x = _load_input_array(args.input)
    kernel = _array_argument(args.kernel, "--kernel")
    bias = _array_argument(args.bias, "--bias") if args.bias is not None else None
    kwargs = _convolution_kwargs(args)
    with _client(args) as client:
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
        text += "\n" + _matrix_text(y)
    _emit(args, data, text)
    return EXIT_OK


def _loss_points(steps: int) -> list[int]:
    """About ten indexes into the loss curve, denser at the start where it falls fastest."""
    if steps <= 10:
        return list(range(steps + 1))
    points = {0, steps}
    points.update(round(float(v)) for v in np.geomspace(1, steps, 9))
    return sorted(points)


def _cmd_fit_kernel(args: argparse.Namespace) -> int:
    inputs = _load_npy(Path(args.inputs))
    targets = _load_npy(Path(args.targets))
    kernel_shape = _ints(args.kernel_shape, (2, 4), "--kernel-shape")
    with _client(args) as client:
        fit = client.fit_kernel(
            inputs,
            targets,
            kernel_shape,
            fit_bias=args.fit_bias,
            learning_rate=args.learning_rate,
            max_steps=args.steps,
            tolerance=args.tolerance,
            seed=args.seed,
            **_convolution_kwargs(args),
        )
    loss = list(fit.loss)
    data = {
        "kernel": fit.kernel.tolist(),
        "bias": fit.bias.tolist() if fit.bias is not None else None,
        "steps": fit.steps,
        "stop_reason": fit.stop_reason,
        "loss": loss,
    }
    lines = [f"kernel {list(fit.kernel.shape)}:", _matrix_text(fit.kernel)]
    if fit.bias is not None:
        lines.append(f"bias: {_matrix_text(fit.bias)}")
    lines.append(f"steps: {fit.steps} ({fit.stop_reason})")
    if loss:
        lines.append(f"loss: {loss[0]:.6g} -> {loss[-1]:.6g}")
        rows = [[i, f"{loss[i]:.6g}"] for i in _loss_points(len(loss) - 1)]
        lines.append(format_table(["step", "loss"], rows, right=(0, 1)))
    _emit(args, data, "\n".join(lines))
    return EXIT_OK


# --- feature-maps, metadata, health ---------------------------------------------------


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


def _single_image(raw: _RawSource, shape: ImageShape) -> np.ndarray:
    images = _source(raw, shape).images
    if images.shape[0] != 1:
        raise InputError(f"{raw.name}: expected one image, got {images.shape[0]}")
    return images


def _cmd_feature_maps(args: argparse.Namespace) -> int:
    Image = require_pillow()
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: not a directory")
    raw = _read_source(Path(args.image))
    layers = [name for name in args.layers.split(",") if name] if args.layers else []
    with _client(args) as client:
        pin = _pin(args)
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
    _emit(args, data, text)
    return EXIT_OK


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join("None" if d < 0 else str(d) for d in shape) + ")"


def _pin(args: argparse.Namespace) -> dict[str, Any]:
    """The version a command names: --model-version or --version-label (argparse allows
    one of the two)."""
    return {"model_version": args.model_version, "version_label": args.version_label}


def _cmd_metadata(args: argparse.Namespace) -> int:
    with _client(args) as client:
        meta = client.metadata(**_pin(args))
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
    _emit(args, data, "\n".join(lines))
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        listing = client.list_models()
    rows = []
    for model in listing:
        serving = model.serving_version
        rows.append(
            [
                model.name,
                "yes" if model.ready else "no",
                "-" if serving is None else serving,
                ", ".join(f"{v.version} {v.state}" for v in model.versions) or "-",
                " ".join(f"{label}={version}" for label, version in model.labels) or "-",
                _mib(model.memory_bytes),
                "; ".join(
                    ([model.error] if model.error else [])
                    + [f"{v.version}: {v.error}" for v in model.versions if v.error]
                    + list(model.label_errors)
                )
                or "-",
            ]
        )
    text = format_table(
        ["model", "ready", "serving", "versions", "labels", "memory", "errors"],
        rows,
        right=(2, 5),
    )
    text += f"\ndefault model: {listing.default_model or '-'}"
    data = {
        "default_model": listing.default_model,
        "models": [
            {
                "name": model.name,
                "ready": model.ready,
                "serving_version": model.serving_version,
                "error": model.error,
                "memory_bytes": model.memory_bytes,
                "versions": [asdict(v) for v in model.versions],
                "labels": dict(model.labels),
                "label_errors": list(model.label_errors),
            }
            for model in listing
        ],
    }
    _emit(args, data, text)
    return EXIT_OK


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count else "-"


def _cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.wait_s > 0:
            status = client.wait_for_serving(args.wait_s, service=args.service)
        else:
            status = client.health(args.service)
    _emit(args, {"target": args.target, "service": args.service, "status": status}, status)
    return EXIT_OK if status == "SERVING" else EXIT_UNAVAILABLE


# --- bench ------------------------------------------------------------------------------


_BENCH_PROTOCOLS = PROTOCOLS
# Where an HTTP protocol goes when neither --target nor $CONVSERVE_TARGET says:
# the server's default --rest-port.
DEFAULT_REST_TARGET = "localhost:8501"


def _bench_target(text: str, protocol: str, flag: str, tls: TlsConfig | None) -> tuple[str, str]:
    """(address, protocol) from ``[PROTOCOL@]ADDRESS``; the prefix wins over `protocol`.

    An HTTP protocol's address is ``HOST:PORT`` or an http(s):// URL; a URL
    for a gRPC protocol is refused.
    """
    prefix, at, address = text.partition("@")
    if at and prefix in _BENCH_PROTOCOLS:
        if not address:
            raise UsageError(f"{flag}: expected [PROTOCOL@]HOST:PORT, got {text!r}")
        text, protocol = address, prefix
    if protocol in HTTP_PROTOCOLS:
        try:
            bench_http.base_url(text, tls)
        except InputError as exc:
            raise UsageError(f"{flag}: {exc}") from None
    elif text.startswith(("http://", "https://")):
        raise UsageError(
            f"{flag}: {text!r} is an HTTP URL, and {protocol} runs over gRPC: give "
            f"rest@{text} or oip-http@{text} (or --protocol rest / oip-http)"
        )
    return text, protocol


def _bench_phases(args: argparse.Namespace) -> list[Phase]:
    if args.concurrency_range is not None:
        levels = bench_sweep.parse_range(args.concurrency_range, "--concurrency-range", int)
        return [Phase(concurrency=c) for c in levels]
    if args.rate_range is not None:
        rates = bench_sweep.parse_range(args.rate_range, "--rate-range", float)
        return [Phase(rate=r) for r in rates]
    if args.rate is not None:
        return [Phase(rate=r) for r in _positive_list(args.rate, "--rate", float)]
    levels = _positive_list(args.concurrency, "--concurrency", int)
    return [Phase(concurrency=c) for c in levels]


def _bench_windows(args: argparse.Namespace) -> bench_sweep.Windows | None:
    if args.window_s is None:
        for flag, value in (
            ("--stability-percent", args.stability_percent),
            ("--max-windows", args.max_windows),
        ):
            if value is not None:
                raise UsageError(f"{flag} needs --window-s (stable measurement windows)")
        return None
    if args.duration_s is not None:
        raise UsageError(
            "--duration-s and --window-s exclude each other: with --window-s a level "
            "lasts as many windows as it needs (up to --max-windows)"
        )
    return bench_sweep.Windows(
        window_s=args.window_s,
        stability_percent=10.0 if args.stability_percent is None else args.stability_percent,
        max_windows=10 if args.max_windows is None else args.max_windows,
    )


def _bench_single_target(args: argparse.Namespace) -> None:
    """Refuse --target given twice with different values: argparse keeps the last."""
    given = list(dict.fromkeys(getattr(args, "targets_given", [])))
    if len(given) > 1:
        raise UsageError(
            f"--target given more than once ({', '.join(given)}); to compare two targets "
            f"give the second with --compare, e.g. --target {given[0]} bench --compare {given[1]}"
        )


def _bench_oip_input(
    text: str | None, protocol: str, flag: str, target_flag: str, images: np.ndarray
) -> bench_requests.OipInput | None:
    """The parsed --input / --compare-input, checked against its target and the images."""
    if text is None:
        return None
    if protocol not in ("oip", "oip-http"):
        protocol_flag = "--protocol" if target_flag == "--target" else "--compare-protocol"
        raise UsageError(
            f"{flag} applies only to an oip or oip-http target: give {target_flag} "
            f"oip@HOST:PORT (or {protocol_flag} oip)"
        )
    spec = bench_requests.parse_oip_input(text, flag)
    bench_requests.check_oip_input(spec, images)
    return spec


def _cmd_bench(args: argparse.Namespace) -> int:
    _bench_single_target(args)
    phases = _bench_phases(args)
    windows = _bench_windows(args)
    if args.latency_threshold_ms is not None and not args.latency_threshold_ms > 0:
        raise UsageError(
            f"--latency-threshold-ms: expected milliseconds > 0, got {args.latency_threshold_ms}"
        )
    for flag, path in (("--csv", args.csv), ("--plot", args.plot)):
        if path is not None:
            bench_report.check_writable(path, flag)
    if args.plot is not None:
        if not args.plot.lower().endswith(".png"):
            raise UsageError(f"--plot: expected a FILE.png, got {args.plot!r}")
        from convserve.client import bench_plot

        bench_plot.check_available()
    if args.images:
        images = bench_requests.load_images(args.images)
    else:
        images, _ = bench_requests.synthetic_digits(256)
    tls, token = _tls(args), _read_token(args)
    target = args.target
    if args.protocol in HTTP_PROTOCOLS and not args.targets_given:
        target = os.environ.get("CONVSERVE_TARGET", DEFAULT_REST_TARGET)
    address, protocol = _bench_target(target, args.protocol, "--target", tls)
    specs = [
        (
            address,
            protocol,
            args.model,
            _bench_oip_input(args.input, protocol, "--input", "--target", images),
        )
    ]
    if args.compare is not None:
        other, other_protocol = _bench_target(
            args.compare, args.compare_protocol or protocol, "--compare", tls
        )
        other_model = args.model if args.compare_model is None else args.compare_model
        other_input = _bench_oip_input(
            args.compare_input, other_protocol, "--compare-input", "--compare", images
        )
        specs.append((other, other_protocol, other_model, other_input))
    else:
        for flag, value in (
            ("--compare-protocol", args.compare_protocol),
            ("--compare-model", args.compare_model),
            ("--compare-input", args.compare_input),
        ):
            if value is not None:
                raise UsageError(f"{flag} needs --compare TARGET")
    urls = [bench_metrics.check_url(u) for u in args.metrics_url or []]
    if len(urls) not in (0, 1, len(specs)):
        raise UsageError(
            f"--metrics-url: expected one URL (for every target) or one per target "
            f"({len(specs)}), got {len(urls)}"
        )
    if len(urls) == 1:
        urls *= len(specs)
    # A missing extra fails now, not in the middle of a sweep.
    for _, target_protocol, _, _ in specs:
        if target_protocol in HTTP_PROTOCOLS:
            bench_http.import_http(target_protocol)
    duration_s = 10.0 if args.duration_s is None else args.duration_s
    configs = [
        BenchConfig(
            target=target,
            images=images,
            protocol=target_protocol,
            rpc=args.rpc,
            model_name=model,
            images_per_request=args.images_per_request,
            duration_s=duration_s,
            warmup_s=args.warmup_s,
            processes=args.processes,
            streams=args.streams,
            timeout_s=args.timeout_s,
            tls=tls,
            token=token,
            oip_input=spec,
        )
        for target, target_protocol, model, spec in specs
    ]
    # A URL that cannot be read at all fails now; one that fails later costs only
    # that level its server figures.
    for url in dict.fromkeys(urls):
        try:
            bench_metrics.scrape(url)
        except bench_metrics.MetricsError as exc:
            raise SetupError(str(exc)) from exc
    show_progress = not args.json and not args.no_progress and sys.stderr.isatty()
    result = bench_sweep.sweep(
        configs,
        phases,
        windows=windows,
        threshold_ms=args.latency_threshold_ms,
        metrics_urls=urls,
        show_progress=show_progress,
    )
    if args.csv is not None:
        bench_report.write_csv(result, args.csv)
    if args.plot is not None:
        from convserve.client import bench_plot

        bench_plot.plot(result, args.plot)
    _emit(args, bench_report.report_dict(result), bench_report.report_text(result))
    return EXIT_OK if all(not level.result.errors for level in result.levels) else EXIT_OTHER


# --- The parser -------------------------------------------------------------------------

BENCH_EXAMPLES = """\
examples:
  convserve bench --concurrency-range 1:64:8 --window-s 2 --latency-threshold-ms 50
  convserve bench --rate-range 100:1000:100 --latency-threshold-ms 20 --plot sweep.png
  convserve --target H:8500 bench --compare oip@H:8500 --model mnist --concurrency 1,8,32
  convserve --target oip@H:8081 bench --model m --input images:FP32:-1,28,28,1
  convserve --target rest@H:8501 bench --model mnist --compare convserve@H:8500 --concurrency 16
  convserve --target https://H:8501 bench --protocol oip-http --model mnist --images-per-request 32
  convserve bench --concurrency 1,8 --metrics-url http://H:8502/metrics --csv out.csv
"""


class _TargetAction(argparse.Action):
    """Stores --target and records every value given, before and after the command, in
    a list both parsers share: argparse keeps only the last, and bench refuses two."""

    def __init__(self, option_strings: Sequence[str], dest: str, given: list[str], **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.given = given

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        self.given.append(values)
        setattr(namespace, self.dest, values)


def _common_options(
    *, with_defaults: bool, targets_given: list[str] | None = None
) -> argparse.ArgumentParser:
    """The connection flags and --json, accepted before and after the command.

    The top-level parser holds the defaults; a command's parser leaves a flag
    unset unless it is given there (argparse.SUPPRESS), so that
    ``convserve --json bench`` and ``convserve bench --json`` mean the same and
    a flag after the command wins over the same flag before it.
    """

    def default(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--target",
        action=_TargetAction,
        given=[] if targets_given is None else targets_given,
        default=default(os.environ.get("CONVSERVE_TARGET", DEFAULT_TARGET)),
        help="host:port, or dns:///name:port to balance over every address "
        f"(default: $CONVSERVE_TARGET or {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="use TLS (implied by the --tls-* flags)",
    )
    group.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=default(None),
        help="CA certificate(s) to verify the server",
    )
    group.add_argument(
        "--tls-cert", metavar="PEM", default=default(None), help="client certificate (mutual TLS)"
    )
    group.add_argument(
        "--tls-key", metavar="PEM", default=default(None), help="client private key (mutual TLS)"
    )
    group.add_argument(
        "--tls-server-name", metavar="NAME", default=default(None), help="expected server name"
    )
    tokens = group.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token",
        default=default(os.environ.get("CONVSERVE_TOKEN")),
        help="bearer token (default: $CONVSERVE_TOKEN)",
    )
    tokens.add_argument(
        "--token-file",
        metavar="FILE",
        default=default(None),
        help="read the bearer token from FILE",
    )
    group.add_argument(
        "--timeout-s",
        type=float,
        default=default(30.0),
        help="deadline per command (default 30)",
    )
    group.add_argument(
        "--retries",
        type=int,
        default=default(3),
        help="retries on UNAVAILABLE and RESOURCE_EXHAUSTED (default 3)",
    )
    group.add_argument(
        "--model",
        metavar="NAME",
        default=default(""),
        help="the model to call (default: the server's default model; see 'convserve models'); "
        "bench with another protocol than convserve needs it: the model's name there",
    )
    common.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON instead of a table"
    )
    return common


def _version_options(p: argparse.ArgumentParser) -> None:
    """--model-version and --version-label: a version other than the serving one."""
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--model-version", type=int, help="pin a loaded model version")
    pin.add_argument(
        "--version-label",
        help="pin the version a label of the server's model config file names (e.g. canary)",
    )


def _conv_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode", choices=("cross-correlation", "convolution"), default="cross-correlation"
    )
    parser.add_argument("--stride", default="1", help="S or SH,SW (default 1)")
    parser.add_argument(
        "--padding", default="valid", help="valid, same, or top,bottom,left,right (default valid)"
    )
    parser.add_argument("--dilation", default="1", help="D or DH,DW (default 1)")


def build_parser() -> argparse.ArgumentParser:
    targets_given: list[str] = []
    common = _common_options(with_defaults=False, targets_given=targets_given)
    parser = argparse.ArgumentParser(
        prog="convserve",
        parents=[_common_options(with_defaults=True, targets_given=targets_given)],
        description="Image classification and 2-D convolution on a convserve server, "
        "and load tests.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(targets_given=targets_given)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = sub.add_parser(
            name,
            parents=[common],
            help=help,
            description=help,
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        return p

    p = command(
        "predict", _cmd_predict, "classify PNG/JPEG images or .npy/.npz arrays with a model"
    )
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="image files (prepared the MNIST way at the model's input size; at most "
        f"{MAX_IMAGE_PIXELS:,} pixels), .npy arrays shaped as the model's input, or .npz "
        "files with 'images' (and optional 'labels', the expected class indices, then the "
        "match is shown)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_IMAGES,
        help="images per request; larger inputs are split (default %(default)s)",
    )
    _version_options(p)

    p = command("convolve", _cmd_convolve, "apply a kernel to an image or array")
    p.add_argument(
        "--input",
        required=True,
        help=f"PNG/JPEG (gray levels in [0,1]; at most {MAX_IMAGE_PIXELS:,} pixels) or .npy",
    )
    p.add_argument("--kernel", required=True, help="JSON such as '[[1,-1]]', or a .npy file")
    p.add_argument("--bias", help="a number, a JSON list (one per output channel), or .npy")
    _conv_options(p)
    p.add_argument("--output", required=True, help="OUT.npy (values) or OUT.png (rescaled)")

    p = command("fit-kernel", _cmd_fit_kernel, "learn a kernel from input/target arrays")
    p.add_argument("--inputs", required=True, help=".npy: [H,W], [N,H,W] or [N,H,W,C]")
    p.add_argument("--targets", required=True, help=".npy: the matching outputs")
    p.add_argument("--kernel-shape", required=True, help="KH,KW or KH,KW,C,F")
    p.add_argument("--fit-bias", action="store_true", help="also learn a bias")
    p.add_argument("--steps", type=int, help="maximum steps (default: the server's)")
    p.add_argument("--learning-rate", type=float, help="step size (default: the server's)")
    p.add_argument("--tolerance", type=float, default=0.0, help="stop at this loss")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial kernel")
    _conv_options(p)

    p = command("feature-maps", _cmd_feature_maps, "save the convolution layers' activations")
    p.add_argument(
        "image", metavar="IMG", help="PNG/JPEG image or .npy array of one image for the model"
    )
    p.add_argument("--output", required=True, help="directory for one PNG grid per layer")
    p.add_argument("--layers", help="comma-separated layer names (default: all)")
    p.add_argument("--scale", type=int, default=4, help="pixel size of the grids (default 4)")
    _version_options(p)

    p = command("metadata", _cmd_metadata, "show the model's layers, classes and training record")
    _version_options(p)

    p = command(
        "models", _cmd_models, "list the server's models, their versions and which one serves"
    )

    p = command("health", _cmd_health, "check the server's health (exit 0 when SERVING)")
    p.add_argument(
        "--wait-s", type=float, default=0.0, help="poll up to this long for SERVING (default 0)"
    )
    p.add_argument("--service", default="", help="service name to check (default: the server)")

    p = command(
        "bench",
        _cmd_bench,
        "load-test the server (closed or open loop; sweeps, a latency threshold, two targets)",
    )
    p.epilog = BENCH_EXAMPLES + "\n" + EXIT_CODES_HELP
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        default="1",
        help="closed loop: comma-separated concurrency levels, one phase each (default 1)",
    )
    load.add_argument(
        "--rate",
        help="open loop: requests/s (comma-separated for several phases); latency counts "
        "from each request's scheduled send time",
    )
    load.add_argument(
        "--concurrency-range",
        metavar="START:END[:STEP]",
        help="closed loop at concurrency START, START+STEP, ... up to END (STEP default 1)",
    )
    load.add_argument(
        "--rate-range",
        metavar="START:END[:STEP]",
        help="open loop at START, START+STEP, ... up to END requests/s (STEP default 1)",
    )
    p.add_argument(
        "--latency-threshold-ms",
        type=float,
        metavar="MS",
        help="stop a target's sweep after the first level whose p99 exceeds MS; the knee is "
        "the last level under it",
    )
    p.add_argument(
        "--window-s",
        type=float,
        metavar="S",
        help="measure each level's one continuous load in consecutive windows of S seconds "
        "until the last 3 agree (instead of one --duration-s window)",
    )
    p.add_argument(
        "--stability-percent",
        type=float,
        metavar="P",
        help="with --window-s: windows agree when each one's req/s and p99 are within P%% of "
        "their mean (default 10)",
    )
    p.add_argument(
        "--max-windows",
        type=int,
        metavar="N",
        help="with --window-s: at most N windows per level, then it is marked UNSTABLE "
        "(default 10)",
    )
    p.add_argument(
        "--protocol",
        choices=_BENCH_PROTOCOLS,
        default="convserve",
        help="protocol of --target (or prefix it: --target oip@HOST:PORT): convserve or oip "
        "over gRPC; rest (TF Serving's REST API, JSON) or oip-http (KServe v2 over HTTP, binary "
        "tensors), whose target is HOST:PORT or an http(s):// URL (default "
        f"{DEFAULT_REST_TARGET}) and which need the http extra: pip install 'convserve[http]'",
    )
    p.add_argument(
        "--input",
        metavar="NAME:DTYPE:SHAPE",
        help="with --protocol oip or oip-http: the input to send, e.g. images:FP32:-1,28,28,1 (for "
        "servers whose model metadata declares no inputs, such as MLServer's default)",
    )
    p.add_argument(
        "--compare",
        metavar="[PROTOCOL@]TARGET",
        help="a second target: levels alternate between --target and it (A1 B1 A2 B2 ...) "
        "and the table gains the ratio B/A of req/s",
    )
    p.add_argument(
        "--compare-protocol",
        choices=_BENCH_PROTOCOLS,
        help="protocol of --compare (default: that of --target)",
    )
    p.add_argument("--compare-model", metavar="NAME", help="model of --compare (default --model)")
    p.add_argument("--compare-input", metavar="NAME:DTYPE:SHAPE", help="--input of --compare")
    p.add_argument(
        "--metrics-url",
        action="append",
        metavar="URL",
        help="the server's Prometheus /metrics, scraped at every window boundary for "
        "server-side requests, batch size, queue wait and model time over the same windows "
        "as the client's figures; once for every target or once per target",
    )
    p.add_argument("--csv", metavar="FILE", help="also write one row per target and level")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw p50/p90/p99 latency against throughput (needs the plot extra: "
        "pip install 'convserve[plot]')",
    )
    p.add_argument("--rpc", choices=("predict", "convolve"), default="predict")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument(
        "--duration-s", type=float, help="measured time per phase (default 10; see --window-s)"
    )
    p.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured time before it")
    p.add_argument("--processes", type=int, default=1, help="generator processes (default 1)")
    p.add_argument(
        "--streams",
        type=int,
        default=0,
        help="send over this many PredictStream streams per process instead of one unary "
        "call per request (default 0: unary)",
    )
    p.add_argument("--images", metavar="FILE", help=".npz with 'images' (default: synthetic)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    as_json = bool(getattr(args, "json", False))

    def fail(code: int, message: str, status: str | None = None) -> int:
        print(f"convserve {args.command}: error: {message}", file=sys.stderr)
        if as_json:
            print(json.dumps({"error": {"code": status, "message": message}, "exit_code": code}))
        return code

    try:
        return int(args.handler(args))
    except UsageError as exc:
        return fail(EXIT_USAGE, str(exc))
    except InputError as exc:
        return fail(EXIT_USAGE, str(exc))
    except ConvServeError as exc:
        return fail(exit_code_for(exc.code), f"{exc.code.name}: {exc.details}", exc.code.name)
    except SetupError as exc:
        return fail(EXIT_OTHER, str(exc))
    except ImportError as exc:
        return fail(EXIT_OTHER, str(exc))
    except ValueError as exc:  # e.g. unreadable TLS files found while building credentials
        return fail(EXIT_USAGE, str(exc))
    except KeyboardInterrupt:
        return 130
