"""LiteRT in worker processes: same answers as in-process, on and off the event loop,
and a worker that dies costs one batch, not the pool."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convserve.server import errors, models
from convserve.server.engines.litert import LiteRtEngine
from convserve.server.workers.pool import WorkerPool
from convserve.server.workers.worker import WorkerError

Digits = tuple[np.ndarray, np.ndarray]

# What the MNIST model takes and answers: [N,28,28,1] in, [N,10] out.
MNIST_IO: dict[str, Any] = {"image_shape": (28, 28, 1), "classes": 10}


@pytest.fixture(scope="module")
def litert(model_base_path: Path) -> LiteRtEngine:
    model = models.load_model("mnist", 1, model_base_path / "1", "/CPU:0", engine="litert")
    assert isinstance(model.engine, LiteRtEngine)
    return model.engine


@pytest.fixture
def pool(litert: LiteRtEngine) -> Iterator[WorkerPool]:
    # No heartbeats: a test that stops a worker wants its batch, not a heartbeat, to find it
    # (tests/server/test_worker_supervision.py covers the heartbeats).
    pool = WorkerPool(
        litert.flatbuffer,
        **MNIST_IO,
        threads=1,
        workers=2,
        name="test",
        heartbeat_interval_s=3600.0,
    )
    try:
        yield pool
    finally:
        pool.close()
        assert pool.wait_closed(10.0)


def in_process(litert: LiteRtEngine, images_u8: np.ndarray) -> np.ndarray:
    return litert.predict((images_u8.astype(np.float32) / np.float32(255.0)).reshape(-1, 28, 28, 1))


@pytest.mark.slow
def test_blocking_calls_match_the_in_process_engine(
    pool: WorkerPool, litert: LiteRtEngine, sample_digits: Digits
) -> None:
    images = sample_digits[0][:16]
    expected = in_process(litert, images)
    # uint8 pixels are scaled in the worker exactly as the server scales them.
    np.testing.assert_array_equal(pool(images.reshape(-1, 28, 28, 1)), expected)
    as_float = (images.astype(np.float32) / np.float32(255.0)).reshape(-1, 28, 28, 1)
    np.testing.assert_array_equal(pool(as_float), expected)
    # Each size gets its own interpreter in the worker; sizes may come in any order.
    for size in (1, 5, 16, 2, 5):
        np.testing.assert_array_equal(pool(images[:size]), expected[:size])
    with pytest.raises(ValueError, match=r"uint8 or float32 images of 784 pixels expected"):
        pool(np.zeros((2, 28, 28), np.float64))


@pytest.mark.slow
@pytest.mark.parametrize("max_rows", [0, 4])
def test_batches_through_the_socket_match_those_through_shared_memory(
    max_rows: int, litert: LiteRtEngine, sample_digits: Digits
) -> None:
    """max_rows=0: every batch in the socket; 4: batches of up to 4 images in the shared
    region, larger ones in the socket. Either way, the same answers bit for bit."""
    images = sample_digits[0][:9].reshape(-1, 28, 28, 1)
    expected = in_process(litert, images)
    pool = WorkerPool(
        litert.flatbuffer, **MNIST_IO, threads=1, workers=1, name="wire", max_rows=max_rows
    )
    try:
        for size in (1, 4, 5, 9, 3):
            np.testing.assert_array_equal(pool(images[:size]), expected[:size])
            as_float = images[:size].astype(np.float32) / np.float32(255.0)
            np.testing.assert_array_equal(pool(as_float), expected[:size])
    finally:
        pool.close()
        assert pool.wait_closed(10.0)


@pytest.mark.slow
async def test_concurrent_batches_on_the_event_loop_get_their_own_rows(
    pool: WorkerPool, litert: LiteRtEngine, sample_digits: Digits
) -> None:
    images = sample_digits[0]
    expected = in_process(litert, images)
    pool.serve()
    with pytest.raises(RuntimeError, match="use run"):
        pool(images[:1])
    rng = np.random.default_rng(0)
    picks = [rng.choice(len(images), size=int(rng.integers(1, 9))) for _ in range(30)]
    # More batches than workers: the rest wait for an idle worker.
    results = await asyncio.gather(*(pool.run(images[p]) for p in picks))
    for pick, result in zip(picks, results, strict=True):
        np.testing.assert_array_equal(result, expected[pick])


@pytest.mark.slow
async def test_a_worker_that_dies_fails_its_batch_and_is_replaced(
    pool: WorkerPool, litert: LiteRtEngine, sample_digits: Digits
) -> None:
    images = sample_digits[0][:4]
    expected = in_process(litert, images)
    pool.serve()
    exits: list[int] = []
    pool.on_worker_exit = lambda: exits.append(1)
    first, second = pool.pids
    # Stopped, the worker takes a batch but never answers it; killed then, it dies
    # holding the batch. (Killed while idle, it would be replaced before any batch.)
    os.kill(first, signal.SIGSTOP)
    try:
        calls = [asyncio.ensure_future(pool.run(images)) for _ in range(2)]
        await asyncio.sleep(0)  # each takes one of the two idle workers
    finally:
        os.kill(first, signal.SIGKILL)
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    # The batch the dead worker took fails with a clear error; the other is answered.
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert len(failed) == 1, outcomes
    assert isinstance(failed[0], errors.Internal)
    assert f"pid {first}" in str(failed[0])
    assert "restarted" in str(failed[0])
    assert exits == [1]
    for outcome in outcomes:
        if not isinstance(outcome, Exception):
            np.testing.assert_array_equal(outcome, expected)
    # A new worker takes the dead one's place; meanwhile the survivor serves alone.
    for _ in range(600):
        if len(pool.pids) == 2:
            break
        np.testing.assert_array_equal(await pool.run(images), expected)
        await asyncio.sleep(0.05)
    assert len(pool.pids) == 2
    assert second in pool.pids
    assert first not in pool.pids
    results = await asyncio.gather(*(pool.run(images) for _ in range(6)))
    for result in results:
        np.testing.assert_array_equal(result, expected)


@pytest.mark.slow
async def test_closing_stops_the_workers_and_refuses_calls(
    litert: LiteRtEngine, sample_digits: Digits
) -> None:
    pool = WorkerPool(litert.flatbuffer, **MNIST_IO, threads=1, workers=1, name="closing")
    pool.serve()
    pids = pool.pids
    assert (await pool.run(sample_digits[0][:1])).shape == (1, 10)
    pool.close()
    with pytest.raises(errors.Unavailable, match="released"):
        await pool.run(sample_digits[0][:1])
    assert await asyncio.to_thread(pool.wait_closed, 10.0)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
@pytest.mark.parametrize("niceness", [0, 7])
def test_workers_step_back_for_the_event_loop(litert: LiteRtEngine, niceness: int) -> None:
    pool = WorkerPool(
        litert.flatbuffer,
        **MNIST_IO,
        threads=1,
        workers=1,
        name="nice",
        niceness=niceness,
    )
    try:
        (pid,) = pool.pids
        policy = os.SCHED_BATCH if niceness else os.sched_getscheduler(0)
        assert os.sched_getscheduler(pid) == policy
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, ours + niceness)
    finally:
        pool.close()
        assert pool.wait_closed(10.0)


def test_a_model_the_worker_cannot_load_is_refused_at_once() -> None:
    with pytest.raises(WorkerError, match=r"broken worker 0: cannot load the model"):
        WorkerPool(
            b"not a flatbuffer",
            **MNIST_IO,
            threads=1,
            workers=2,
            name="broken",
        )
    with pytest.raises(ValueError, match="workers must be at least 1"):
        WorkerPool(b"", **MNIST_IO, threads=1, workers=0, name="none")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "four integers; started by the server"),
        (["a", "1", "0", "-1"], "four integers; started by the server"),
        (["987", "1", "0", "-1"], "FD 987 is not a socket"),
    ],
)
def test_the_worker_entry_point_explains_bad_arguments(argv: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "convserve.server.workers.child", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
