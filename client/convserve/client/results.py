"""Typed results returned by the client's methods."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Prediction:
    """One image's classification and the model version that made it."""

    digit: int
    confidence: float
    probabilities: np.ndarray  # float32 [10]
    model_name: str
    model_version: int

    def top(self, k: int = 3) -> list[tuple[int, float]]:
        """The `k` most likely digits with their probabilities, most likely first."""
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
    def digits(self) -> np.ndarray:
        """int32 [N]."""
        return np.array([p.digit for p in self.predictions], dtype=np.int32)

    @property
    def confidences(self) -> np.ndarray:
        """float32 [N]."""
        return np.array([p.confidence for p in self.predictions], dtype=np.float32)

    @property
    def probabilities(self) -> np.ndarray:
        """float32 [N,10]."""
        if not self.predictions:
            return np.zeros((0, 10), dtype=np.float32)
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
