"""A stand-in runtime and metrics with the real ones' method signatures.

They let the protocol servicers be tested over the wire without a trained
model: predictions are a fixed function of the pixels, convolutions are the
real `ops.convolve`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convserve.server import ops, types
from tests.server.wire_helpers import stand_in_check_images, stand_in_version


def fake_probabilities(images: np.ndarray) -> np.ndarray:
    """One-hot on (sum of pixels scaled to 0..255) mod 10, per image."""
    scaled = images.astype(np.float64) * (255.0 if images.dtype == np.float32 else 1.0)
    digits = np.rint(scaled.reshape(len(images), -1).sum(axis=1)).astype(np.int64) % 10
    return np.eye(10, dtype=np.float32)[digits]


@dataclass
class FakeRuntime:
    model_name: str = "mnist"
    versions: tuple[int, ...] = (1, 2)
    max_images: int = 64
    ready: bool = True
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def check_images(self, images: np.ndarray, field: str) -> np.ndarray:
        return stand_in_check_images(images, field, self.max_images)

    def _version(self, ref: types.ModelRef) -> int:
        return stand_in_version(ref, self.model_name, self.versions)

    async def predict(
        self, value: types.PredictInput, *, deadline: float | None, protocol: str
    ) -> types.PredictOutput:
        self.calls.append(("predict", (protocol, deadline, value.images.shape)))
        version = self._version(value.model)
        return types.PredictOutput(self.model_name, version, fake_probabilities(value.images))

    async def convolve(
        self, value: types.ConvolveInput, *, deadline: float | None
    ) -> types.ConvolveOutput:
        self.calls.append(("convolve", deadline))
        return ops.convolve(value)

    def metadata(self, ref: types.ModelRef) -> types.ModelMetadata:
        version = self._version(ref)
        return types.ModelMetadata(
            model_name=self.model_name,
            loaded_versions=self.versions,
            serving_version=version if ref.version is None else max(self.versions),
            inputs=(types.TensorSpecInfo("images", ("uint8", "float32"), (-1, 28, 28, 1)),),
            outputs=(types.TensorSpecInfo("probabilities", ("float32",), (-1, 10)),),
            layers=(),
        )


@dataclass
class FakeMetrics:
    started: list[tuple[str, str]] = field(default_factory=list)
    finished: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request_started(self, protocol: str, rpc: str) -> None:
        with self.lock:
            self.started.append((protocol, rpc))

    def request_finished(self, protocol: str, rpc: str, code: str, seconds: float) -> None:
        assert seconds >= 0
        with self.lock:
            self.finished.append((protocol, rpc, code))
