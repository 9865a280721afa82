"""Engines: every one computes what the SavedModel computes, and adding one is one module.

The parity tests run for every engine (TensorFlow in-process on the CPU included),
at every batch size the batcher pads to, from uint8 and float32 images. The toy
engine (`tests/server/toy_engine.py`) is registered with one line and served end
to end, which is the how-to of `convserve.server.engines` done.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from convserve.server import engines, models, types
from convserve.server.batcher import default_pad_sizes
from convserve.server.served import as_float
from tests.server import toy_engine
from tests.server.runtime_helpers import (
    float_digits,
    make_settings,
    saved_model_probabilities,
    started_runtime,
)

Digits = tuple[np.ndarray, np.ndarray]
MAX_ROWS = 16
# (engine name, in worker processes): every way a version can be computed here.
ENGINE_CASES = [("tensorflow", False), ("litert", False), ("litert", True)]


@pytest.fixture(params=ENGINE_CASES, ids=lambda case: f"{case[0]}{'-workers' if case[1] else ''}")
def loaded(request: pytest.FixtureRequest, model_base_path: Path) -> Iterator[models.LoadedModel]:
    name, in_workers = request.param
    model = models.load_model(
        "mnist",
        1,
        model_base_path / "1",
        "/CPU:0",
        default_pad_sizes(MAX_ROWS),
        engine=name,
        engine_copies=2,
        memory=models.MemoryLimits(1 << 40, MAX_ROWS, engine_copies=2),
        workers=toy_engine.TWO_WORKERS if in_workers else None,
    )
    assert model.engine.name == name
    assert model.engine.capabilities.worker_processes == in_workers
    yield model
    model.engine.close()
    assert model.engine.wait_closed(10)


@pytest.mark.slow
async def test_every_engine_computes_the_savedmodels_probabilities_at_every_batch_size(
    loaded: models.LoadedModel, sample_digits: Digits
) -> None:
    engine = loaded.engine
    engine.serve()
    pixels = sample_digits[0][:MAX_ROWS].reshape(-1, 28, 28, 1)
    for rows in range(1, MAX_ROWS + 1):
        for images in (pixels[:rows], as_float(pixels[:rows])):
            expected = loaded.predict_tensorflow(as_float(images))
            got = engine.predict(as_float(images))
            assert got.dtype == np.float32
            assert got.shape == (rows, 10)
            assert np.max(np.abs(got - expected)) <= engines.PARITY_TOLERANCE, (rows, images.dtype)
            if engine.capabilities.worker_processes:
                # Worker processes take the rows as they came, uint8 or float32.
                remote = await engine.run(images, None)
                assert np.max(np.abs(remote - expected)) <= engines.PARITY_TOLERANCE
    assert engine.healthy


def test_the_chain_of_engines_follows_device_and_workers() -> None:
    def context(device: str, workers: bool) -> engines.EngineContext:
        return toy_engine.context_for((28, 28, 1), 10, device=device, workers=workers)

    package = "convserve.server.engines."
    assert engines.fallbacks("litert", context("/CPU:0", True)) == [
        package + "litert_workers",
        package + "litert",
        package + "tensorflow",
    ]
    assert engines.fallbacks("litert", context("/CPU:0", False)) == [
        package + "litert",
        package + "tensorflow",
    ]
    # LiteRT does not run on GPUs, and TensorFlow has no worker processes.
    assert engines.fallbacks("litert", context("/GPU:0", True)) == [package + "tensorflow"]
    assert engines.fallbacks("tensorflow", context("/CPU:0", True)) == [package + "tensorflow"]
    with pytest.raises(ValueError, match="engine must be one of"):
        engines.build("onnx", context("/CPU:0", False))


@pytest.fixture
def toy_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The one registry line a new engine adds.
    monkeypatch.setitem(engines.ENGINES, "toy", engines.EngineKind("tests.server.toy_engine"))
    toy_engine.BUILT.clear()
    toy_engine.REFUSE.clear()
    yield
    toy_engine.REFUSE.clear()


@pytest.mark.slow
@pytest.mark.usefixtures("toy_registered")
async def test_a_registered_engine_is_served_end_to_end(
    model_base_path: Path, sample_digits: Digits
) -> None:
    settings = make_settings(model_base_path, cpu_engine="toy", inline_max_images=16)
    runtime, metrics = await started_runtime(settings)
    try:
        images = sample_digits[0][:5]
        output = await runtime.predict(types.PredictInput(images), deadline=None)
    finally:
        await runtime.stop(5.0)
    toy = toy_engine.BUILT[-1]
    expected = saved_model_probabilities(model_base_path / "1", float_digits(images))
    assert np.max(np.abs(output.probabilities - expected)) <= engines.PARITY_TOLERANCE
    # Warm-up calls, then the request's: all in the batcher's threads, none on the loop
    # (the toy engine does not declare itself cheap to run inline).
    assert toy.calls > len(default_pad_sizes(settings.max_batch_size))
    assert "MainThread" not in toy.threads
    text = generate_latest(metrics.registry).decode()
    assert 'convserve_model_info{device="/CPU:0",engine="toy",model="mnist"' in text


@pytest.mark.slow
@pytest.mark.usefixtures("toy_registered")
def test_an_engine_that_cannot_serve_a_version_hands_it_to_tensorflow(
    model_base_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    toy_engine.REFUSE.append("op not supported")
    with caplog.at_level(logging.WARNING, logger=engines.__name__):
        model = models.load_model("mnist", 1, model_base_path / "1", "/CPU:0", engine="toy")
    assert model.engine.name == "tensorflow"
    assert "mnist version 1: toy_engine cannot serve it, falling back: op not supported" in (
        caplog.text
    )
    assert model.predict(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)
