"""Typed results returned by the client's methods."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from convserve.client.errors import bad_response


@dataclass(frozen=True)
class Prediction:
    """One image's classification and the model version that made it."""

    class_index: int  # the most likely class (for MNIST, the digit)
    label: str  # its name, or the index as text when the model names no classes
    confidence: float
    probabilities: np.ndarray  # float32 [K], one per class
    model_name: str
    model_version: int

    @property
    def digit(self) -> int:
        """The class index under its MNIST name."""
        return self.class_index

    def top(self, k: int = 3) -> list[tuple[int, float]]:
        """The `k` most likely class indices with their probabilities, most likely first."""
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(int(d), float(self.probabilities[d])) for d in order]


@dataclass(frozen=True)
class PredictResult:
    """Predictions in the order of the input images.

    `model_name` / `model_version` are those of the first prediction; a large
    batch sent in several requests during a model reload can span versions,
    which each `Prediction` records.
    """

    predictions: tuple[Prediction, ...]
    model_name: str
    model_version: int

    def __len__(self) -> int:
        return len(self.predictions)

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.predictions)

    def __getitem__(self, index: int) -> Prediction:
        return self.predictions[index]

    @property
    def class_indices(self) -> np.ndarray:
        """int32 [N]: each image's most likely class."""
        return np.array([p.class_index for p in self.predictions], dtype=np.int32)

    @property
    def digits(self) -> np.ndarray:
        """int32 [N]: `class_indices` under its MNIST name."""
        return self.class_indices

    @property
    def labels(self) -> list[str]:
        """Each image's most likely class name (the index as text when the model names none)."""
        return [p.label for p in self.predictions]

    @property
    def confidences(self) -> np.ndarray:
        """float32 [N]."""
        return np.array([p.confidence for p in self.predictions], dtype=np.float32)

    @property
    def probabilities(self) -> np.ndarray:
        """float32 [N,K]."""
        if not self.predictions:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([p.probabilities for p in self.predictions])


@dataclass(frozen=True)
class FitKernelResult:
    kernel: np.ndarray  # float64, the requested kernel shape
    bias: np.ndarray | None  # float64 [F], or None without fit_bias
    loss: tuple[float, ...]  # before each step, then after the last
    steps: int
    stop_reason: str  # "converged", "max_steps" or "time_budget"


@dataclass(frozen=True)
class FeatureMapsResult:
    model_name: str
    model_version: int
    maps: dict[str, np.ndarray]  # layer name -> float32 [H,W,F], in the model's layer order


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtypes: tuple[str, ...]  # numpy names, e.g. "uint8", "float32"
    shape: tuple[int, ...]  # -1 for a dimension of any size


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    output_shape: tuple[int, ...]  # without the batch dimension
    parameters: int
    trainable: bool


@dataclass(frozen=True)
class TrainingRecord:
    dataset: str
    architecture: str
    hyperparameters: dict[str, str]
    test_accuracy: float
    train_examples: int
    test_examples: int
    training_time_s: float
    exported_at: str
    tensorflow_version: str
    fixed_kernel: str
    total_parameters: int
    # int64 [K,K]: test images by true class (rows) and predicted class
    # (columns); None when the export recorded none.
    confusion_matrix: np.ndarray | None = None


@dataclass(frozen=True)
class ModelMetadata:
    model_name: str
    loaded_versions: tuple[int, ...]
    serving_version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    layers: tuple[LayerInfo, ...]
    training: TrainingRecord
    device: str
    class_names: tuple[str, ...] = ()  # per class index; empty when the model names none

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image, from the first input's [-1,H,W,C]."""
        if not self.inputs:
            raise bad_response(f"model {self.model_name!r} declares no inputs")
        return image_shape_of(self.inputs[0].shape, self.model_name)


def image_shape_of(shape: tuple[int, ...], model_name: str) -> tuple[int, int, int]:
    """A declared [-1,H,W,C] (or [-1,H,W], one channel) as (H, W, C)."""
    if len(shape) in (3, 4) and shape[0] == -1 and all(d > 0 for d in shape[1:]):
        h, w, *c = shape[1:]
        return (h, w, c[0] if c else 1)
    raise bad_response(
        f"model {model_name!r} declares input shape {list(shape)}, expected [-1,H,W,C]"
    )


@dataclass(frozen=True)
class VersionStatus:
    """One version of a model and where it is in its life."""

    version: int
    state: str  # "LOADING", "AVAILABLE", "UNLOADING" or "END" (refused: see error)
    serving: bool  # requests without a pinned version get this one
    error: str  # why the version was refused; empty otherwise


@dataclass(frozen=True)
class ModelStatus:
    name: str
    ready: bool  # a version is serving and its engine is usable
    versions: tuple[VersionStatus, ...]  # ascending by version
    error: str = ""  # why no version serves; empty while one does (or is loading)
    memory_bytes: int = 0  # what the loaded versions' batch buffers are sized for
    # The version labels in effect, (label, version) by label: dict(labels) maps them.
    labels: tuple[tuple[str, int], ...] = ()
    # Why a configured version label is not in effect (one line per label).
    label_errors: tuple[str, ...] = ()

    @property
    def serving_version(self) -> int | None:
        """The version requests without a pinned version get, if any."""
        return next((v.version for v in self.versions if v.serving), None)


@dataclass(frozen=True)
class ModelList:
    """Every model a server is configured with, ascending by name."""

    models: tuple[ModelStatus, ...]
    default_model: str  # the model requests with an empty model name get

    def __len__(self) -> int:
        return len(self.models)

    def __iter__(self) -> Iterator[ModelStatus]:
        return iter(self.models)
