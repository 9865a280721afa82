"""Runtime with a real trained model: predictions, checks, limits, deadlines, swaps, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from convserve.server import convolution, errors, model_versions, models, types
from convserve.server.engines import litert_workers
from convserve.server.metrics import Metrics
from convserve.server.protocols.calls import deadline_of
from convserve.server.runtime import Runtime
from convserve.server.workers.pool import WorkerPool
from convserve.server.workers.worker import WorkerError
from tests import polling
from tests.server.runtime_helpers import (
    copy_base,
    float_digits,
    make_settings,
    saved_model_probabilities,
    started_runtime,
)
from tests.server.test_metrics import value

Digits = tuple[np.ndarray, np.ndarray]


# -- image checks (no model needed) ----------------------------------------------


@pytest.fixture
def unstarted(tmp_path: Path) -> Runtime:
    return Runtime(make_settings(tmp_path, max_images_per_request=8), Metrics())


async def test_work_before_start_is_unavailable(unstarted: Runtime) -> None:
    assert not unstarted.ready
    with pytest.raises(errors.Unavailable):
        await unstarted.predict(
            types.PredictInput(np.zeros((1, 28, 28, 1), np.uint8)), deadline=None
        )


async def test_start_without_a_loadable_version_is_unavailable_with_exit_on_load_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"broken")
    (tmp_path / ".export-2").mkdir()
    metrics = Metrics()
    runtime = Runtime(make_settings(tmp_path, exit_on_load_error=True), metrics)
    with pytest.raises(errors.Unavailable, match=r"no loadable version.*\[1\]"):
        await runtime.start()
    assert not runtime.ready
    assert value(metrics, "convserve_model_loads_total", model="mnist", result="failure") == 1
    await runtime.stop(1)


async def test_start_without_a_loadable_version_reports_it_and_keeps_looking(
    tmp_path: Path, model_base_path: Path
) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"broken")
    metrics = Metrics()
    runtime = Runtime(make_settings(tmp_path, poll_interval_s=0.1), metrics)
    await runtime.start()
    try:
        assert not runtime.ready  # its only model has no version
        status = runtime.model_status("mnist")
        assert not status.ready
        assert status.error.startswith("no version loads (version 1: cannot load the SavedModel")
        assert [(v.version, v.state) for v in status.versions] == [(1, "END")]
        assert value(metrics, "convserve_model_ready", model="mnist") == 0
        # A good version copied in later is found by the background retry.
        shutil.copytree(model_base_path / "1", tmp_path / "2")
        await polling.until(lambda: runtime.ready, what="the retried model", timeout_s=120)
        assert runtime.model_status("mnist").error == ""
        assert value(metrics, "convserve_model_ready", model="mnist") == 1
    finally:
        await runtime.stop(1)


class _Context:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def pool_of(model: models.LoadedModel) -> WorkerPool | None:
    """The version's worker processes, if its engine runs in them."""
    engine = model.engine
    return engine.pool if isinstance(engine, litert_workers.LiteRtWorkersEngine) else None


def test_deadline_of_is_absolute_monotonic_time() -> None:
    assert deadline_of(_Context(None)) is None
    before = time.monotonic()
    deadline = deadline_of(_Context(2.5))
    assert deadline is not None
    assert before + 2.5 <= deadline <= time.monotonic() + 2.5


# -- with the trained model --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine_workers", "inline_max_images"), [("process", 16), ("thread", 0), ("thread", 16)]
)
async def test_predict_equals_the_saved_model(
    model_base_path: Path, sample_digits: Digits, engine_workers: str, inline_max_images: int
) -> None:
    images, labels = sample_digits
    settings = make_settings(
        model_base_path, engine_workers=engine_workers, inline_max_images=inline_max_images
    )
    runtime, metrics = await started_runtime(settings)
    workers = pool_of(runtime.manager.resolve(types.ModelRef()))
    pids = workers.pids if workers is not None else []
    try:
        assert runtime.ready
        assert runtime.device == "/CPU:0"
        if engine_workers == "process":
            assert workers is not None
            # One spare beyond the batches that compute at once (see ServedModel).
            assert len(workers.pids) == settings.max_concurrent_batches + 1
        else:
            assert workers is None
        # The loaded model's objects are exempt from the garbage collector's full passes.
        assert gc.get_freeze_count() > 10_000
        expected = saved_model_probabilities(model_base_path / "1", float_digits(images))
        out = await runtime.predict(types.PredictInput(images), deadline=None)
        assert out.model_name == "mnist"
        assert out.model_version == 1
        assert out.probabilities.shape == (len(images), 10)
        np.testing.assert_allclose(out.probabilities, expected, rtol=1e-5, atol=1e-6)
        assert np.mean(out.digits == labels) >= 0.8
        # float32 input gives the same answer as uint8.
        as_float = await runtime.predict(
            types.PredictInput(float_digits(images)), deadline=time.monotonic() + 30
        )
        np.testing.assert_allclose(as_float.probabilities, expected, rtol=1e-5, atol=1e-6)

        # Concurrent requests of mixed dtypes and sizes each get their own rows back.
        before = value(metrics, "convserve_batch_size_count", rpc="Predict")
        rng = np.random.default_rng(1)
        picks = [rng.choice(len(images), size=int(rng.integers(1, 6))) for _ in range(40)]
        inputs = [images[p] if i % 2 else float_digits(images[p]) for i, p in enumerate(picks)]
        results = await asyncio.gather(
            *(runtime.predict(types.PredictInput(x), deadline=None) for x in inputs)
        )
        for pick, result in zip(picks, results, strict=True):
            np.testing.assert_allclose(result.probabilities, expected[pick], rtol=1e-5, atol=1e-6)
        batches = value(metrics, "convserve_batch_size_count", rpc="Predict") - before
        if engine_workers == "thread" and inline_max_images:
            # Started back to back on one loop, each small request found the model
            # idle and ran inline at once, alone.
            assert batches == len(picks)
        else:
            assert batches < len(picks), "concurrent requests were not merged into batches"
        assert value(metrics, "convserve_images_processed_total", rpc="Predict") == 2 * len(
            images
        ) + sum(len(p) for p in picks)
        assert value(metrics, "convserve_queued_images", rpc="Predict") == 0
    finally:
        await runtime.stop(5)
    assert not runtime.ready
    with pytest.raises(errors.Unavailable, match="shutting down"):
        await runtime.predict(types.PredictInput(float_digits(images[:1])), deadline=None)
    if workers is not None:
        # Released with the model: every worker process exits.
        assert await asyncio.to_thread(workers.wait_closed, 10.0)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


@pytest.mark.slow
async def test_worker_processes_that_fail_to_start_leave_the_server_process_serving(
    model_base_path: Path,
    sample_digits: Digits,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise WorkerError("no processes here")

    monkeypatch.setattr(litert_workers, "WorkerPool", refuse)
    runtime, _ = await started_runtime(make_settings(model_base_path))
    try:
        model = runtime.manager.resolve(types.ModelRef())
        assert model.engine.name == "litert"
        assert not model.engine.capabilities.worker_processes
        assert "mnist version 1: litert_workers cannot serve it, falling back: its worker " \
            "processes failed: no processes here" in caplog.text  # fmt: skip
        images = sample_digits[0][:5]
        expected = saved_model_probabilities(model_base_path / "1", float_digits(images))
        out = await runtime.predict(types.PredictInput(images), deadline=None)
        np.testing.assert_allclose(out.probabilities, expected, rtol=1e-5, atol=1e-6)
    finally:
        await runtime.stop(5)


async def test_readiness_follows_the_model_workers(
    model_base_path: Path, sample_digits: Digits
) -> None:
    import signal

    runtime, _ = await started_runtime(make_settings(model_base_path))
    seen: list[bool] = []
    back = asyncio.Event()

    def listen(ready: bool) -> None:
        seen.append(ready)
        if seen[-2:] == [False, True]:
            back.set()

    runtime.add_ready_listener(listen)
    stopped: list[int] = []
    try:
        workers = pool_of(runtime.manager.resolve(types.ModelRef()))
        assert workers is not None
        assert runtime.ready
        # Every worker hangs while idle: the heartbeats find them, readiness goes, and
        # comes back once replacements answer.
        for pid in workers.pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        await asyncio.wait_for(back.wait(), 60)
        assert seen[-2:] == [False, True], seen
        assert runtime.ready
        assert not set(workers.pids) & set(stopped)
        images = sample_digits[0][:3]
        out = await runtime.predict(types.PredictInput(images), deadline=time.monotonic() + 30)
        assert out.probabilities.shape == (3, 10)
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await runtime.stop(5)


@pytest.mark.slow
async def test_operations_metadata_and_feature_maps(
    model_base_path: Path, sample_digits: Digits
) -> None:
    images, _ = sample_digits
    runtime, metrics = await started_runtime(make_settings(model_base_path))
    try:
        x = np.arange(9, dtype=np.float32).reshape(3, 3)
        k = np.array([[0, 1], [2, 3]], np.float32)
        out = await runtime.convolve(types.ConvolveInput(x, k), deadline=None)
        np.testing.assert_array_equal(out.output, [[19, 25], [37, 43]])
        flipped = await runtime.convolve(
            types.ConvolveInput(x, k, options=types.ConvolutionOptions(mode="CONVOLUTION")),
            deadline=time.monotonic() + 30,
        )
        np.testing.assert_array_equal(flipped.output, [[5, 11], [23, 29]])
        with pytest.raises(errors.InvalidArgument, match=r"^kernel: "):
            await runtime.convolve(types.ConvolveInput(x, k.astype(np.float64)), deadline=None)
        assert value(metrics, "convserve_images_processed_total", rpc="Convolve") == 2

        edges = np.ones((6, 8), np.float32)
        edges[:, 2:6] = 0
        target = (
            await runtime.convolve(
                types.ConvolveInput(edges, np.array([[1, -1]], np.float32)), deadline=None
            )
        ).output
        fit = await runtime.fit_kernel(
            types.FitKernelInput(edges, target, (1, 2), learning_rate=0.1, tolerance=1e-6),
            deadline=time.monotonic() + 60,
        )
        np.testing.assert_allclose(fit.kernel, [[1, -1]], atol=0.05)
        assert fit.stop_reason == "converged"

        meta = runtime.metadata(types.ModelRef())
        assert meta.model_name == "mnist"
        assert meta.serving_version == 1
        assert meta.loaded_versions == (1,)
        assert meta.training["feature_map_layers"] == ["conv1", "conv2", "conv3"]
        assert [row.name for row in meta.layers][:1] == ["conv1"]
        with pytest.raises(errors.NotFound):
            runtime.metadata(types.ModelRef(version=2))
        with pytest.raises(errors.NotFound):
            runtime.metadata(types.ModelRef(name="cifar"))

        image = images[:1]
        maps = await runtime.feature_maps(types.FeatureMapsInput(image), deadline=None)
        assert [(name, m.shape) for name, m in maps.maps] == [
            ("conv1", (28, 28, 32)),
            ("conv2", (14, 14, 64)),
            ("conv3", (7, 7, 64)),
        ]
        chosen = await runtime.feature_maps(
            types.FeatureMapsInput(image, layers=("conv3", "conv1")), deadline=None
        )
        assert [name for name, _ in chosen.maps] == ["conv3", "conv1"]
        np.testing.assert_allclose(chosen.maps[1][1], maps.maps[0][1], rtol=1e-6)
        with pytest.raises(errors.InvalidArgument, match=r"^layers: .*\['dense'\]"):
            await runtime.feature_maps(
                types.FeatureMapsInput(image, layers=("conv1", "dense")), deadline=None
            )
    finally:
        await runtime.stop(5)


@pytest.mark.slow
async def test_concurrent_convolutions_merge_and_each_gets_its_own_result(
    model_base_path: Path,
) -> None:
    runtime, metrics = await started_runtime(make_settings(model_base_path))
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    bias = rng.normal(size=(4,)).astype(np.float32)
    options = types.ConvolutionOptions(padding="SAME", strides=(1, 2))
    same = [
        types.ConvolveInput(
            rng.random((int(rng.integers(1, 4)), 10, 12, 2), np.float32), kernel, bias, options
        )
        for _ in range(12)
    ]
    image = rng.random((7, 9), np.float32)
    others = [
        types.ConvolveInput(image, np.ones((2, 2), np.float32)),  # 2-D, its own group
        types.ConvolveInput(image, np.ones((2, 2), np.float32), np.ones((1,), np.float32)),
        types.ConvolveInput(same[0].input, kernel[::-1].copy(), bias, options),
    ]
    try:
        results = await asyncio.gather(
            *(runtime.convolve(v, deadline=time.monotonic() + 60) for v in same + others)
        )
        for request, result in zip(same + others, results, strict=True):
            alone = convolution.convolve(request)
            np.testing.assert_allclose(result.output, alone.output, rtol=1e-5, atol=1e-5)
            assert result.output.dtype == np.float32
        calls = value(metrics, "convserve_batch_size_count", rpc="Convolve")
        assert calls < len(same) + len(others), "same-kernel requests were not merged"
        assert (
            value(metrics, "convserve_images_processed_total", rpc="Convolve")
            == sum(v.input.shape[0] for v in same) + 2 + same[0].input.shape[0]
        )
        assert value(metrics, "convserve_queued_images", rpc="Convolve") == 0
        # A bad request in a group is refused alone; its group-mates are unaffected.
        bad = types.ConvolveInput(
            np.full((1, 10, 12, 2), np.nan, np.float32), kernel, bias, options
        )
        mixed = await asyncio.gather(
            runtime.convolve(same[1], deadline=None),
            runtime.convolve(bad, deadline=None),
            return_exceptions=True,
        )
        assert isinstance(mixed[0], types.ConvolveOutput)
        assert isinstance(mixed[1], errors.InvalidArgument)
        assert str(mixed[1]).startswith("input: ")
    finally:
        await runtime.stop(5)


@pytest.mark.slow
async def test_queue_limits_and_deadlines(model_base_path: Path, sample_digits: Digits) -> None:
    images, _ = sample_digits
    settings = make_settings(
        model_base_path,
        max_batch_size=8,
        max_queued_images=16,
        max_concurrent_batches=1,
        max_conv_elements=64,
        # Queueing needs a busy model: small batches must not run inline and at once.
        inline_max_images=0,
    )
    runtime, metrics = await started_runtime(settings)
    eight = types.PredictInput(np.concatenate([images[:8]]))
    try:
        # More images than the queue can ever hold: refused at once.
        with pytest.raises(errors.ResourceExhausted, match="is full"):
            await runtime.predict(types.PredictInput(images[:17]), deadline=None)
        # The first request runs at once, the second (a full batch waiting behind it) in the
        # spare worker, the next two fill the queue, the rest are refused.
        results = await asyncio.gather(
            *(runtime.predict(eight, deadline=None) for _ in range(7)), return_exceptions=True
        )
        ok = [r for r in results if isinstance(r, types.PredictOutput)]
        refused = [r for r in results if isinstance(r, errors.ResourceExhausted)]
        assert len(ok) == 4, results
        assert len(refused) == 3, results
        assert all(r.probabilities.shape == (8, 10) for r in ok)
        # Nothing was lost: the queue is empty again and accepts work.
        assert value(metrics, "convserve_queued_images", rpc="Predict") == 0
        assert (await runtime.predict(eight, deadline=None)).probabilities.shape == (8, 10)

        # Convolutions: inputs queued or computing are bounded (4 x max_conv_elements
        # values), the rest are refused at once.
        x = np.arange(64, dtype=np.float32).reshape(8, 8)
        k = np.ones((3, 3), np.float32)
        outcomes = await asyncio.gather(
            *(runtime.convolve(types.ConvolveInput(x, k), deadline=None) for _ in range(8)),
            return_exceptions=True,
        )
        assert all(isinstance(o, types.ConvolveOutput) for o in outcomes[:4]), outcomes
        assert all(isinstance(o, errors.ResourceExhausted) for o in outcomes[4:]), outcomes
        first = outcomes[0]
        assert isinstance(first, types.ConvolveOutput)
        np.testing.assert_allclose(first.output[0, 0], x[:3, :3].sum())
        # Kernel fits: one runs, waiting ones are bounded the same way.
        fits = await asyncio.gather(
            *(
                runtime.fit_kernel(
                    types.FitKernelInput(x, x[:6, :6], (3, 3), max_steps=1), deadline=None
                )
                for _ in range(8)
            ),
            return_exceptions=True,
        )
        assert all(isinstance(o, types.FitKernelOutput) for o in fits[:5]), fits
        assert all(isinstance(o, errors.ResourceExhausted) for o in fits[5:]), fits
        with pytest.raises(errors.InvalidArgument, match="max_conv_elements"):
            await runtime.convolve(
                types.ConvolveInput(np.zeros((9, 9), np.float32), k), deadline=None
            )

        past = time.monotonic() - 0.001
        for call in (
            runtime.predict(eight, deadline=past),
            runtime.convolve(
                types.ConvolveInput(np.ones((4, 4), np.float32), np.ones((2, 2), np.float32)),
                deadline=past,
            ),
            runtime.feature_maps(types.FeatureMapsInput(eight.images[:1]), deadline=past),
        ):
            with pytest.raises(errors.DeadlineExceeded):
                await call
    finally:
        await runtime.stop(5)


@pytest.mark.slow
async def test_stop_finishes_accepted_requests(
    model_base_path: Path, sample_digits: Digits
) -> None:
    images, _ = sample_digits
    runtime, _ = await started_runtime(make_settings(model_base_path, max_batch_size=4))
    value_in = types.PredictInput(images[:3])
    calls = [asyncio.ensure_future(runtime.predict(value_in, deadline=None)) for _ in range(20)]
    await asyncio.sleep(0)  # let every call enqueue
    await runtime.stop(30)
    results = await asyncio.gather(*calls)
    assert all(r.probabilities.shape == (3, 10) for r in results)
    assert not runtime.ready


@pytest.mark.slow
async def test_new_versions_swap_in_under_load_and_corrupt_ones_are_refused(
    model_base_path: Path, sample_digits: Digits, tmp_path: Path
) -> None:
    images, _ = sample_digits
    base = copy_base(model_base_path, tmp_path / "mnist")
    runtime, metrics = await started_runtime(make_settings(base))
    expected = saved_model_probabilities(base / "1", float_digits(images))
    request = types.PredictInput(images)
    seen: list[int] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    started: list[tuple[float, int]] = []  # (when a request started, the version serving it)

    async def client() -> None:
        while not stop.is_set():
            begun = time.monotonic()
            try:
                out = await runtime.predict(request, deadline=begun + 60)
            except Exception as exc:  # every failure is reported below
                failures.append(exc)
                return
            np.testing.assert_allclose(out.probabilities, expected, rtol=1e-5, atol=1e-6)
            seen.append(out.model_version)
            started.append((begun, out.model_version))

    async def until(what: str, check: Callable[[], bool]) -> None:
        def no_failure_and_check() -> bool:
            assert not failures, failures  # a failed call ends the wait at once
            return check()

        await polling.until(no_failure_and_check, what=what, timeout_s=120)

    clients = [asyncio.create_task(client()) for _ in range(8)]
    try:
        await until("traffic on version 1", lambda: len(seen) >= 8)
        first_model = runtime.manager.serving
        assert first_model is not None
        assert first_model.version == 1
        # An atomic export: written under a hidden name, then renamed.
        shutil.copytree(base / "1", base / ".export-2")
        (base / ".export-2").rename(base / "2")
        assert await runtime.poll_once() == 2
        assert runtime.ready
        await until("traffic on version 2", lambda: seen.count(2) >= 8)
        assert runtime.metadata(types.ModelRef()).loaded_versions == (1, 2)
        pinned = await runtime.predict(
            types.PredictInput(request.images, types.ModelRef(version=1)), deadline=None
        )
        assert pinned.model_version == 1

        # A corrupt version 3 is refused; version 2 keeps serving.
        shutil.copytree(base / "1", base / "3")
        (base / "3" / "saved_model.pb").write_bytes(b"\x00 corrupt")
        assert await runtime.poll_once() is None
        assert await runtime.poll_once() is None  # counted once, not retried
        assert value(metrics, "convserve_model_loads_total", model="mnist", result="failure") == 1
        before = len(seen)
        await until("more traffic on version 2", lambda: len(seen) >= before + 8)
        assert runtime.manager.serving is not None
        assert runtime.manager.serving.version == 2

        # Version 4 retires version 1 (two versions are kept loaded) once its requests end.
        shutil.copytree(base / "1", base / "4")
        assert await runtime.poll_once() == 4
        swapped_at = time.monotonic()
        await until("traffic on version 4", lambda: seen.count(4) >= 8)
        assert runtime.metadata(types.ModelRef()).loaded_versions == (2, 4)
        assert first_model.retired
        assert first_model.leases == 0
        with pytest.raises(errors.NotFound, match="version 1 is not loaded"):
            await runtime.predict(
                types.PredictInput(request.images, types.ModelRef(version=1)), deadline=None
            )
    finally:
        stop.set()
        await asyncio.gather(*clients)
        await runtime.stop(10)
    assert not failures, failures
    assert seen[0] == 1
    # Every request that started after the swap to version 4 was served by it (one
    # that started before may finish last, on version 2).
    assert {version for begun, version in started if begun > swapped_at} == {4}
    # Once version 2 was serving, no new request went back to version 1.
    assert 1 not in seen[seen.index(4) :]
    assert value(metrics, "convserve_model_loads_total", model="mnist", result="success") == 3
    info = value(
        metrics,
        "convserve_model_info",
        model="mnist",
        version="4",
        device="/CPU:0",
        engine="litert",
    )
    assert info == 1
    assert model_versions.discover_versions(base) == [1, 2, 3, 4]


async def test_expensive_work_is_admitted_by_its_estimate_and_stops_at_its_deadline(
    model_base_path: Path,
) -> None:
    runtime, metrics = await started_runtime(
        make_settings(model_base_path, max_request_cpu_s=30.0, max_concurrent_batches=1)
    )
    rng = np.random.default_rng(5)
    # Seconds of work (float64, a large kernel with stride and dilation: the direct
    # route at its slowest), computed in tiles of about 50 ms.
    big = types.ConvolveInput(
        rng.random((1, 1024, 1024, 1)),
        rng.random((31, 31, 1, 1)),
        None,
        types.ConvolutionOptions(strides=(2, 2), dilations=(2, 2)),
    )
    plan = convolution.validate_convolve(big, max_cpu_s=30.0)
    assert convolution.convolve_cost_s(plan) > 1.0
    assert len(convolution.plan_tiles(plan, fft=False)) > 10
    try:
        too_big = types.ConvolveInput(
            rng.random((1, 2048, 2048, 1)),
            rng.random((63, 63, 1, 1)),
            None,
            types.ConvolutionOptions(strides=(2, 2), dilations=(2, 2)),
        )
        with pytest.raises(errors.InvalidArgument, match="max_request_cpu_s") as refused:
            await runtime.convolve(too_big, deadline=None)
        assert refused.value.field == "input"
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            await runtime.convolve(big, deadline=started + 0.3)
        # The thread stops at its next tile: within a few units, not after the whole.
        assert await runtime.operations._work.drain(30)
        stopped_after = time.monotonic() - started
        assert (
            value(metrics, "convserve_work_stopped_total", rpc="Convolve", reason="deadline") == 1
        )
        assert value(metrics, "convserve_admitted_work_cpu_seconds", rpc="Convolve") == 0
        # Generous: the 0.3 s deadline, then one tile of about 50 ms of CPU, on a
        # shared 2-core machine (the whole would take several seconds).
        assert stopped_after < 0.3 + 2.0, stopped_after
        # The slot is free again: a small request is answered.
        small = types.ConvolveInput(np.ones((3, 3), np.float32), np.array([[1, -1]], np.float32))
        out = await runtime.convolve(small, deadline=time.monotonic() + 10)
        np.testing.assert_array_equal(out.output, np.zeros((3, 2), np.float32))
    finally:
        await runtime.stop(5)


async def test_a_fit_stops_at_max_request_cpu_s(model_base_path: Path) -> None:
    runtime, _ = await started_runtime(
        make_settings(model_base_path, max_request_cpu_s=0.5, fit_time_budget_s=30)
    )
    x = np.random.default_rng(6).random((64, 64), np.float32)
    # A target no 3x3 kernel reaches, and steps too small to diverge: only time stops it.
    y = np.ones((62, 62), np.float32) + x[1:-1, 1:-1] ** 2
    try:
        started = time.monotonic()
        fit = await runtime.fit_kernel(
            types.FitKernelInput(x, y, (3, 3), max_steps=10**6, learning_rate=1e-6),
            deadline=None,
        )
        assert fit.stop_reason == "time_budget"
        assert time.monotonic() - started < 0.5 + 5.0  # generous on a shared machine
    finally:
        await runtime.stop(5)
