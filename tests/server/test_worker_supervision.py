"""Model worker supervision: hung and dead workers are found and replaced, batches end
by their deadline or the hang timeout, health follows the usable workers, and closing
never waits for a stuck worker.

The workers are real processes running a tiny LiteRT model (softmax of one dense
layer) built here, so that a test starts in about a second. A worker is hung
deterministically by stopping it (SIGSTOP) before it is handed a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from convserve.server import errors
from convserve.server.workers.pool import WorkerPool
from convserve.server.workers.worker import WorkerError

# How long a test waits for something that takes well under a second on an idle
# machine (a worker starting, a heartbeat round): generous, for two busy cores.
PATIENCE_S = 30.0

# What the tiny model takes and answers: [N,28,28,1] in, [N,10] out.
MNIST_IO: dict[str, Any] = {"image_shape": (28, 28, 1), "classes": 10}


@dataclass(frozen=True)
class TinyModel:
    flatbuffer: bytes
    weights: np.ndarray

    def expected(self, images_u8: np.ndarray) -> np.ndarray:
        logits = (images_u8.reshape(-1, 784).astype(np.float64) / 255.0) @ self.weights
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    import tensorflow as tf

    weights = np.random.default_rng(0).normal(0.0, 0.05, size=(784, 10)).astype(np.float32)

    class Dense(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32)])
        def __call__(self, x: Any) -> Any:
            return tf.nn.softmax(tf.reshape(x, [-1, 784]) @ tf.constant(weights))

    module = Dense()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.__call__.get_concrete_function()], module
    )
    return TinyModel(bytes(converter.convert()), weights.astype(np.float64))


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(4, 28, 28, 1), dtype=np.uint8)


@dataclass
class Watched:
    """A pool serving on the test's loop, and what it reported."""

    pool: WorkerPool
    exits: int = 0
    health: list[bool] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)

    def stop(self, pid: int) -> None:
        """SIGSTOP a worker: it neither answers nor reads the end of its input."""
        self.stopped.append(pid)
        os.kill(pid, signal.SIGSTOP)


@pytest.fixture
async def supervised(tiny: TinyModel) -> AsyncIterator[Callable[..., Watched]]:
    """Starts pools of the tiny model on the test's loop; always ends their workers."""
    started: list[Watched] = []

    def start(**options: Any) -> Watched:
        settings: dict[str, Any] = {
            "threads": 1,
            "workers": 1,
            "name": "tiny",
            "batch_timeout_s": 0.5,
            # No heartbeat unless a test asks for one: a heartbeat in flight when
            # a test stops a worker would find it before the test's batch does.
            "heartbeat_interval_s": 3600.0,
        }
        settings.update(options)
        pool = WorkerPool(tiny.flatbuffer, **MNIST_IO, **settings)
        watched = Watched(pool)
        started.append(watched)

        def exited() -> None:
            watched.exits += 1

        pool.on_worker_exit = exited
        pool.on_health_change = watched.health.append
        pool.serve()
        return watched

    try:
        yield start
    finally:
        exited = []
        for watched in started:
            watched.pool.close()  # on the loop, as the server does
            exited.append(await asyncio.to_thread(watched.pool.wait_closed, 10.0))
            for pid in watched.stopped:  # in case the test failed before its worker was killed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert all(exited), "a worker outlived wait_closed"


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` (state the pool changes in the background) for up to PATIENCE_S."""
    give_up = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"gave up waiting: {what}")
        await asyncio.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_batch_on_a_hung_worker_fails_by_the_hang_timeout_and_the_worker_is_replaced(
    supervised: Callable[..., Watched], tiny: TinyModel, images: np.ndarray
) -> None:
    watched = supervised(workers=1, batch_timeout_s=0.5)
    pool = watched.pool
    expected = await pool.run(images)
    np.testing.assert_allclose(expected, tiny.expected(images), rtol=1e-5, atol=1e-6)
    (old,) = pool.pids
    watched.stop(old)
    started = time.monotonic()
    with pytest.raises(errors.Internal, match=rf"pid {old}.*within 0.5 s: it hung"):
        await pool.run(images)
    elapsed = time.monotonic() - started
    # Not before the hang timeout (0.5 s), and long before anything a caller would
    # notice as "forever" (10 s: slack for two busy cores).
    assert 0.4 <= elapsed < 10.0, elapsed
    assert watched.exits == 1
    # Killed at once (SIGKILL also ends a stopped process), and replaced: the next
    # batch waits for the new worker and gets the same answer.
    await until(lambda: gone(old), f"worker {old} to be killed")
    np.testing.assert_array_equal(await pool.run(images), expected)
    (new,) = pool.pids
    assert new != old
    assert pool.healthy
    # One worker: none was usable until the new one arrived.
    assert watched.health == [False, True]
    results = await asyncio.gather(*(pool.run(images[: n + 1]) for n in range(4)))
    for n, result in enumerate(results):
        np.testing.assert_array_equal(result, expected[: n + 1])


async def test_a_worker_that_dies_while_idle_is_replaced_before_any_request_needs_it(
    supervised: Callable[..., Watched], images: np.ndarray
) -> None:
    watched = supervised(workers=2)
    pool = watched.pool
    expected = await pool.run(images)
    victim, survivor = pool.pids
    os.kill(victim, signal.SIGKILL)
    # No request is made: the pool notices the death by itself.
    await until(lambda: victim not in pool.pids and len(pool.pids) == 2, "a replacement")
    assert survivor in pool.pids
    assert watched.exits == 1
    # The survivor kept serving throughout: health never flipped.
    assert watched.health == []
    results = await asyncio.gather(*(pool.run(images) for _ in range(6)))
    for result in results:
        np.testing.assert_array_equal(result, expected)


async def test_a_worker_that_hangs_while_idle_is_replaced_by_the_heartbeat(
    supervised: Callable[..., Watched], images: np.ndarray
) -> None:
    watched = supervised(workers=1, heartbeat_interval_s=0.2)
    pool = watched.pool
    expected = await pool.run(images)
    (old,) = pool.pids
    watched.stop(old)
    # The heartbeat goes unanswered for max(1 s, 2 * 0.2 s): the only worker is
    # retired, so no worker is usable until its replacement is ready.
    await until(lambda: bool(watched.health), "health to change")
    assert watched.health[0] is False
    assert watched.exits == 1
    assert old not in pool.pids
    # A batch arriving meanwhile waits for the replacement (within its deadline).
    result = await pool.run(images, time.monotonic() + PATIENCE_S)
    np.testing.assert_array_equal(result, expected)
    assert watched.health == [False, True]
    assert pool.healthy
    await until(lambda: gone(old), f"worker {old} to be killed")


async def test_heartbeats_leave_healthy_workers_serving(
    supervised: Callable[..., Watched], tiny: TinyModel
) -> None:
    watched = supervised(workers=2, heartbeat_interval_s=0.05)
    pool = watched.pool
    pids = pool.pids
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 256, size=(int(n), 28, 28), dtype=np.uint8) for n in range(1, 9)]
    # Batches keep coming while heartbeats go out every 50 ms (bound: 1 s); each
    # gets its own rows back, and no worker is mistaken for a hung one.
    finish = time.monotonic() + 1.5
    while time.monotonic() < finish:
        results = await asyncio.gather(*(pool.run(b) for b in batches))
        for batch, result in zip(batches, results, strict=True):
            np.testing.assert_allclose(result, tiny.expected(batch), rtol=1e-5, atol=1e-6)
        await asyncio.sleep(0.1)  # idle spells, when the workers get heartbeats
    assert pool.pids == pids
    assert watched.exits == 0
    assert watched.health == []


async def test_deadlines_bound_the_wait_for_a_worker_and_the_batch(
    supervised: Callable[..., Watched], images: np.ndarray
) -> None:
    watched = supervised(workers=1, batch_timeout_s=0.5)
    pool = watched.pool
    expected = await pool.run(images)
    (old,) = pool.pids
    with pytest.raises(errors.DeadlineExceeded, match="waited for a model worker"):
        await pool.run(images, time.monotonic() - 1.0)
    assert pool.pids == [old]  # a late batch never reaches a worker
    watched.stop(old)
    hung = asyncio.ensure_future(pool.run(images))
    await asyncio.sleep(0)  # it takes the only worker
    # Another batch waits for a worker, but only until its deadline.
    with pytest.raises(errors.DeadlineExceeded, match="waited for a model worker"):
        await pool.run(images, time.monotonic() + 0.1)
    assert not hung.done()
    with pytest.raises(errors.Internal, match="hung"):
        await hung
    assert watched.exits == 1
    np.testing.assert_array_equal(await pool.run(images, time.monotonic() + PATIENCE_S), expected)


@pytest.mark.parametrize("abandoned_by", ["deadline", "cancel"])
async def test_a_batch_abandoned_mid_call_leaves_the_worker_serving(
    supervised: Callable[..., Watched], images: np.ndarray, abandoned_by: str
) -> None:
    """Its deadline passed (it fails at once, far ahead of the hang timeout) or its caller
    went away: either way the worker was slow, not lost, and serves on once it answers."""
    watched = supervised(workers=1, batch_timeout_s=PATIENCE_S)
    pool = watched.pool
    expected = await pool.run(images)
    (pid,) = pool.pids
    watched.stop(pid)
    started = time.monotonic()
    if abandoned_by == "deadline":
        with pytest.raises(errors.DeadlineExceeded, match="while the model computed the batch"):
            await pool.run(images[:1], started + 0.2)
        # By the deadline (0.2 s), far ahead of the hang timeout (30 s).
        assert time.monotonic() - started < 10.0
    else:
        abandoned = asyncio.ensure_future(pool.run(images[:1]))
        await asyncio.sleep(0)  # it takes the only worker and sends its batch
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
    # The next batch waits while the worker still owes the abandoned one's answer...
    following = asyncio.ensure_future(pool.run(images))
    await asyncio.sleep(0.05)
    assert not following.done()
    os.kill(pid, signal.SIGCONT)
    # ...then gets its own rows, not the abandoned batch's, from the same worker.
    np.testing.assert_array_equal(await asyncio.wait_for(following, PATIENCE_S), expected)
    assert pool.pids == [pid]
    assert watched.exits == 0


async def test_a_worker_still_hung_after_its_abandoned_batch_is_replaced(
    supervised: Callable[..., Watched], images: np.ndarray
) -> None:
    watched = supervised(workers=1, batch_timeout_s=0.5)
    pool = watched.pool
    expected = await pool.run(images)
    (old,) = pool.pids
    watched.stop(old)
    with pytest.raises(errors.DeadlineExceeded, match="while the model computed the batch"):
        await pool.run(images, time.monotonic() + 0.1)
    # The hang timeout still runs for the batch nobody waits for any more.
    await until(lambda: watched.exits == 1, "the hung worker to be given up")
    await until(lambda: gone(old), f"worker {old} to be killed")
    np.testing.assert_array_equal(await pool.run(images), expected)
    assert pool.pids != [old]


async def test_closing_fails_a_batch_held_by_a_stopped_worker_and_kills_it(
    supervised: Callable[..., Watched],
) -> None:
    watched = supervised(workers=1, batch_timeout_s=PATIENCE_S)
    pool = watched.pool
    (pid,) = pool.pids
    watched.stop(pid)
    # Larger than the socket's buffer: the stopped worker never takes all of it.
    large = np.zeros((512, 28, 28, 1), np.float32)
    held = asyncio.ensure_future(pool.run(large))
    waiting = asyncio.ensure_future(pool.run(large[:1]))
    await asyncio.sleep(0)
    pool.close()
    with pytest.raises(errors.Unavailable, match="released"):
        await held
    with pytest.raises(errors.Unavailable, match="released"):
        await waiting
    # A stopped worker never reads the end of its input: wait_closed kills it
    # shortly before its bound (2 s) rather than waiting for it.
    started = time.monotonic()
    assert await asyncio.to_thread(pool.wait_closed, 2.0)
    assert time.monotonic() - started < 10.0
    assert gone(pid)
    # Closing does not report the model unhealthy: it was released, not lost.
    assert watched.health == []
    assert watched.exits == 0


async def test_a_model_whose_workers_cannot_restart_refuses_batches_and_reports_it(
    supervised: Callable[..., Watched], images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    watched = supervised(workers=1)
    pool = watched.pool
    (pid,) = pool.pids
    monkeypatch.setattr(pool, "_flatbuffer", b"not a flatbuffer")
    os.kill(pid, signal.SIGKILL)
    await until(lambda: watched.health == [False], "health to turn False")
    # Waits for the restart under way to fail, then learns there is no worker.
    with pytest.raises(errors.Unavailable, match="no model worker is running"):
        await pool.run(images, time.monotonic() + PATIENCE_S)
    assert not pool.healthy
    assert watched.health == [False]


def test_a_worker_that_fails_a_blocking_call_is_dropped(
    tiny: TinyModel, images: np.ndarray
) -> None:
    pool = WorkerPool(tiny.flatbuffer, **MNIST_IO, threads=1, workers=2, name="blocking")
    try:
        first, second = pool.pids
        expected = pool(images)
        np.testing.assert_array_equal(pool(images), expected)
        os.kill(first, signal.SIGKILL)
        # Round robin (each worker has had a call): the dead worker is next. Its
        # failure is reported, and it is never handed a call again (a stuck one
        # fails the same way after START_TIMEOUT_S).
        with pytest.raises(WorkerError, match=rf"blocking worker 0 \(pid {first}\) failed"):
            pool(images)
        assert pool.pids == [second]
        for _ in range(3):
            np.testing.assert_array_equal(pool(images), expected)
        os.kill(second, signal.SIGKILL)
        with pytest.raises(WorkerError, match="failed"):
            pool(images)
        with pytest.raises(WorkerError, match="no worker is left"):
            pool(images)
    finally:
        pool.close()
        assert pool.wait_closed(10.0)
    assert gone(first)
    assert gone(second)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("batch_timeout_s", 0.0, "batch_timeout_s must be positive"),
        ("heartbeat_interval_s", -1.0, "heartbeat_interval_s must be positive"),
    ],
)
def test_rejects_bad_supervision_settings(option: str, value: float, message: str) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(ValueError, match=message):
        WorkerPool(b"", **MNIST_IO, threads=1, workers=1, name="bad", **options)
