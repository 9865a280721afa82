"""The runtime's model registry: models added, changed and removed while it serves.

Real models (the shared MNIST export and an 8x8 digits export), real batchers
and engines in threads; the configuration is applied directly
(`Runtime.apply_config`), as the config file poller does after each read.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from convserve.server import errors, types
from convserve.server.metrics import Metrics
from convserve.server.model_config import ModelEntry
from convserve.server.runtime import Runtime
from convserve.server.served import Budget, budget_for
from tests.polling import until
from tests.server.runtime_helpers import make_settings, started_runtime
from tests.server.test_metrics import samples, value

pytestmark = pytest.mark.slow


# Loading a model on two cores, beside the others, can take a while.
LOAD_TIMEOUT_S = 120.0


def predict_input(shape: tuple[int, ...], model: str) -> types.PredictInput:
    images = np.random.default_rng(0).integers(0, 256, size=(2, *shape), dtype=np.uint8)
    return types.PredictInput(images, types.ModelRef(name=model))


@pytest.fixture
async def served(model_base_path: Path) -> AsyncIterator[tuple[Runtime, Metrics]]:
    """A started runtime serving the MNIST export as model "a"; stopped afterwards."""
    settings = make_settings(
        model_base_path, model_name="a", engine_workers="thread", poll_interval_s=0.1
    )
    runtime, metrics = await started_runtime(settings)
    try:
        yield runtime, metrics
    finally:
        await runtime.stop(5)


def test_the_worker_budget_is_shared_across_models() -> None:
    settings = make_settings(Path("/unused"), max_concurrent_batches=2)
    assert budget_for(settings, 1, cpus=2) == Budget(workers=2, threads=1)
    # Two models on two cores: one single-threaded worker each.
    assert budget_for(settings, 2, cpus=2) == Budget(workers=1, threads=1)
    assert budget_for(settings, 3, cpus=2) == Budget(workers=1, threads=1)
    assert budget_for(settings, 2, cpus=8) == Budget(workers=1, threads=4)
    pinned = make_settings(Path("/unused"), max_concurrent_batches=4, engine_threads=3)
    assert budget_for(pinned, 2, cpus=2) == Budget(workers=2, threads=3)


def all_ready(runtime: Runtime) -> bool:
    return all(model.ready for model in runtime.models())


async def configure(runtime: Runtime, *models: tuple[str, Path]) -> None:
    """Apply a configuration of (name, base path) pairs and wait until every model serves."""
    runtime.apply_config([ModelEntry(name, path) for name, path in models])
    await until(
        lambda: all_ready(runtime), what="every configured model ready", timeout_s=LOAD_TIMEOUT_S
    )


async def test_a_changed_base_path_serves_the_old_definition_until_the_new_one_loads(
    served: tuple[Runtime, Metrics], digits8_model_dir: Path
) -> None:
    runtime, _ = served
    runtime.apply_config([ModelEntry("a", digits8_model_dir)])
    # Still the MNIST definition while the new one loads.
    answer = await runtime.predict(predict_input((28, 28, 1), "a"), deadline=None)
    assert answer.probabilities.shape == (2, 10)
    await until(lambda: not runtime._loading, what="the new definition", timeout_s=LOAD_TIMEOUT_S)
    assert runtime.metadata(types.ModelRef("a")).inputs[0].shape == (-1, 8, 8, 1)
    answer = await runtime.predict(predict_input((8, 8, 1), "a"), deadline=None)
    assert answer.probabilities.shape == (2, 10)
    with pytest.raises(errors.InvalidArgument, match=r"\[N,8,8,1\]"):
        await runtime.predict(
            types.PredictInput(np.zeros((1, 28, 28), np.uint8), types.ModelRef("a")), deadline=None
        )


async def test_a_model_without_versions_yet_waits_while_the_others_serve(
    served: tuple[Runtime, Metrics],
    model_base_path: Path,
    digits8_model_dir: Path,
    tmp_path: Path,
) -> None:
    runtime, metrics = served
    later = tmp_path / "later"
    runtime.apply_config([ModelEntry("a", model_base_path), ModelEntry("b", later)])
    await asyncio.sleep(0)
    assert [(m.name, m.ready) for m in runtime.models()] == [("a", True), ("b", False)]
    assert runtime.ready  # by default: a model still loading leaves the replica ready
    await until(
        lambda: runtime.model_status("b").error == "the base path does not exist",
        what="b's error",
        timeout_s=LOAD_TIMEOUT_S,
    )
    assert value(metrics, "convserve_model_ready", model="a") == 1
    assert value(metrics, "convserve_model_ready", model="b") == 0
    with pytest.raises(errors.Unavailable, match="'b' has no version ready yet"):
        await runtime.predict(predict_input((8, 8, 1), "b"), deadline=None)
    answer = await runtime.predict(predict_input((28, 28, 1), "a"), deadline=None)
    assert answer.model_name == "a"
    shutil.copytree(digits8_model_dir / "1", later / "1")
    await until(lambda: all_ready(runtime), what="b ready", timeout_s=LOAD_TIMEOUT_S)
    answer = await runtime.predict(predict_input((8, 8, 1), "b"), deadline=None)
    assert (answer.model_name, answer.model_version) == ("b", 1)
    assert value(metrics, "convserve_model_ready", model="b") == 1
    assert runtime.default_model == "a"


async def test_a_removed_model_is_not_found_and_leaves_no_metrics_series(
    served: tuple[Runtime, Metrics], model_base_path: Path, digits8_model_dir: Path
) -> None:
    runtime, metrics = served
    await configure(runtime, ("a", model_base_path), ("b", digits8_model_dir))
    await runtime.predict(predict_input((8, 8, 1), "b"), deadline=None)
    assert any(s.labels.get("model") == "b" for s in samples(metrics))
    # b removed: it is gone at once, a stays the default.
    runtime.apply_config([ModelEntry("a", model_base_path)])
    with pytest.raises(errors.NotFound, match=r"'b' is not served here \(served: 'a'\)"):
        await runtime.predict(predict_input((8, 8, 1), "b"), deadline=None)
    assert runtime.model_label("b") == "_unknown"
    await until(lambda: not runtime._removing, what="b unloaded", timeout_s=LOAD_TIMEOUT_S)
    assert [s for s in samples(metrics) if s.labels.get("model") == "b"] == []
    answer = await runtime.predict(predict_input((28, 28, 1), ""), deadline=None)
    assert answer.model_name == "a"


async def test_configuration_order_decides_the_default_model(
    served: tuple[Runtime, Metrics], model_base_path: Path, digits8_model_dir: Path
) -> None:
    runtime, _ = served
    await configure(runtime, ("b", digits8_model_dir), ("a", model_base_path))
    assert runtime.default_model == "b"
    answer = await runtime.predict(predict_input((8, 8, 1), ""), deadline=None)
    assert answer.model_name == "b"
    # A later change elsewhere does not bring the old order back.
    await configure(
        runtime, ("b", digits8_model_dir), ("a", model_base_path), ("c", digits8_model_dir)
    )
    assert [m.name for m in runtime.models()] == ["a", "b", "c"]
    assert runtime.default_model == "b"


async def test_a_removed_default_model_is_not_replaced_by_another(
    served: tuple[Runtime, Metrics], model_base_path: Path, digits8_model_dir: Path
) -> None:
    runtime, _ = served
    await configure(runtime, ("a", model_base_path), ("b", digits8_model_dir))
    assert runtime.default_model == "a"
    runtime.apply_config([ModelEntry("b", digits8_model_dir)])
    # Unnamed requests were meant for "a": they are told so, not sent to "b".
    with pytest.raises(errors.NotFound, match=r"the default model 'a' was removed.*'b'"):
        await runtime.predict(predict_input((28, 28, 1), ""), deadline=None)
    assert runtime.model_label("") == "_unknown"
    answer = await runtime.predict(predict_input((8, 8, 1), "b"), deadline=None)
    assert answer.model_name == "b"
    # Once "a" is configured again, configuration order decides again: "b" comes first.
    await configure(runtime, ("b", digits8_model_dir), ("a", model_base_path))
    answer = await runtime.predict(predict_input((8, 8, 1), ""), deadline=None)
    assert answer.model_name == "b"
