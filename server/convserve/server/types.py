"""Typed internal values: what servicers hand to the runtime and get back.

Servicers (one per protocol) translate wire messages into these and back;
nothing below them sees protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Padding = Literal["VALID", "SAME", "EXPLICIT"]
Mode = Literal["CROSS_CORRELATION", "CONVOLUTION"]
# The `protocol` label of every request: the gRPC APIs, then their HTTP counterparts.
Protocol = Literal["convserve", "oip", "tfserving", "convserve-http", "oip-http", "tfserving-rest"]


@dataclass(frozen=True)
class ModelRef:
    """A model name (None: the default model) and an optional pinned version, given by
    number or by a version label of the model config file (at most one of the two)."""

    name: str | None = None
    version: int | None = None
    label: str | None = None


# The server's default model, newest version.
DEFAULT_MODEL = ModelRef()


@dataclass(frozen=True)
class PredictInput:
    """Images to classify, as decoded from the request: not yet checked or reshaped.

    The runtime checks them against the input of the model version it leases
    for the request (`inputs.check_images`: uint8 in [0, 255] or float32 in
    [0, 1], one of the model's accepted shapes) and reshapes them to its
    [N,H,W,C]. Its errors name `field`, the request field that carried the
    images in the caller's protocol (e.g. "images", "inputs[images]").
    """

    images: np.ndarray
    model: ModelRef = ModelRef()
    field: str = "images"


@dataclass(frozen=True)
class PredictOutput:
    model_name: str
    model_version: int
    probabilities: np.ndarray  # float32 [N,K]
    # The name of each class index (empty: the model names none).
    class_names: tuple[str, ...] = ()

    @property
    def digits(self) -> np.ndarray:
        """The most likely class index per image (for MNIST models, the digit)."""
        return np.argmax(self.probabilities, axis=1).astype(np.int32)

    @property
    def labels(self) -> list[str]:
        """The most likely class's name per image (its index as text when unnamed)."""
        return class_labels(self.digits, self.class_names)

    @property
    def confidences(self) -> np.ndarray:
        return np.max(self.probabilities, axis=1).astype(np.float32)


@dataclass(frozen=True)
class StreamFailure:
    """How one message of a request stream failed: a gRPC status code number and text."""

    code: int
    message: str


@dataclass(frozen=True)
class ConvolutionOptions:
    strides: tuple[int, int] = (1, 1)
    padding: Padding = "VALID"
    # (top, bottom, left, right); only with padding == "EXPLICIT".
    explicit_padding: tuple[int, int, int, int] | None = None
    dilations: tuple[int, int] = (1, 1)
    mode: Mode = "CROSS_CORRELATION"


@dataclass(frozen=True)
class ConvolveInput:
    """input [H,W] or [N,H,W,C]; kernel [kh,kw] or [kh,kw,C,F]; bias [F] or None.

    Shapes and dtypes are as decoded from the wire; `convolution.convolve` checks
    that they fit together and raises InvalidArgument naming the field.
    """

    input: np.ndarray
    kernel: np.ndarray
    bias: np.ndarray | None = None
    options: ConvolutionOptions = ConvolutionOptions()


@dataclass(frozen=True)
class ConvolveOutput:
    output: np.ndarray  # same dtype as input; [H',W'] or [N,H',W',F]


@dataclass(frozen=True)
class FitKernelInput:
    inputs: np.ndarray
    targets: np.ndarray
    kernel_shape: tuple[int, ...]
    fit_bias: bool = False
    options: ConvolutionOptions = ConvolutionOptions()
    learning_rate: float | None = None  # None: the server's default
    max_steps: int | None = None  # None: the server's default
    tolerance: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class FitKernelOutput:
    kernel: np.ndarray  # float64, kernel_shape
    bias: np.ndarray | None  # float64 [F] or None
    loss: list[float]
    steps: int
    stop_reason: Literal["converged", "max_steps", "time_budget"]


@dataclass(frozen=True)
class FeatureMapsInput:
    image: np.ndarray  # [1,H,W,C] (the model's input shape), uint8 or float32
    layers: tuple[str, ...] = ()
    model: ModelRef = ModelRef()


@dataclass(frozen=True)
class FeatureMapsOutput:
    model_name: str
    model_version: int
    maps: list[tuple[str, np.ndarray]]  # (layer name, float32 [H,W,F])


@dataclass(frozen=True)
class TensorSpecInfo:
    name: str
    dtypes: tuple[str, ...]  # numpy names: "uint8", "float32"
    shape: tuple[int, ...]  # -1 for any size


@dataclass(frozen=True)
class LayerRow:
    name: str
    type: str
    output_shape: tuple[int, ...]
    parameters: int
    trainable: bool = True


@dataclass(frozen=True)
class ModelMetadata:
    model_name: str
    loaded_versions: tuple[int, ...]
    serving_version: int
    inputs: tuple[TensorSpecInfo, ...]
    outputs: tuple[TensorSpecInfo, ...]
    layers: tuple[LayerRow, ...]
    training: dict[str, object] = field(default_factory=dict)  # the trainer's training_record.json
    device: str = "/CPU:0"
    class_names: tuple[str, ...] = ()


VersionState = Literal["LOADING", "AVAILABLE", "UNLOADING", "END"]

# The training record's fields that travel typed (convserve.v1 TrainingRecord), and the
# Python type each is read as from training_record.json; checked when a version loads.
TRAINING_FIELDS: dict[str, type] = {
    "dataset": str,
    "architecture": str,
    "test_accuracy": float,
    "train_examples": int,
    "test_examples": int,
    "training_time_s": float,
    "exported_at": str,
    "tensorflow_version": str,
    "fixed_kernel": str,
    "total_parameters": int,
}


@dataclass(frozen=True)
class VersionStatus:
    """One version of a model: TF Serving's state, whether it is the default, why it failed."""

    version: int
    state: VersionState
    serving: bool = False
    error: str = ""


@dataclass(frozen=True)
class ModelStatus:
    """A configured model: ready when a version serves and its engine is usable.

    `error` says why no version serves (empty while one does); `memory_bytes` is
    what its loaded versions' buffers are sized for (see `models.MemoryPlan`).
    """

    name: str
    ready: bool
    versions: tuple[VersionStatus, ...] = ()
    error: str = ""
    memory_bytes: int = 0
    # The version labels in effect (label -> version), by label name.
    labels: tuple[tuple[str, int], ...] = ()
    # Why a configured label is not in effect (one line per refused label).
    label_errors: tuple[str, ...] = ()


def class_labels(indices: np.ndarray, class_names: tuple[str, ...]) -> list[str]:
    """The name of each class index (the index as text where there is no name)."""
    count = len(class_names)
    return [class_names[i] if 0 <= i < count else str(int(i)) for i in indices.tolist()]
