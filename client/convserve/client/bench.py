"""The load generator behind ``convserve bench``.

Two ways to load a server:

* Closed loop (`Phase.concurrency`): that many simulated users each send a
  request, wait for the answer, and send the next. Measures capacity at a
  given concurrency; a slow server slows the users down.
* Open loop (`Phase.rate`): requests go out on a fixed schedule, one every
  1/rate seconds, whether or not earlier ones have been answered, and each
  latency is measured from the request's *scheduled* send time. A server
  (or a generator) that stalls cannot hide the queueing it causes: every
  request that should have been sent during a stall is charged the wait
  (no coordinated omission).

Either way a request is one unary call, or (`BenchConfig.streams` > 0) one
message on a PredictStream stream, answered with its id: many small requests
then share a few HTTP/2 streams, which costs the server and the generator
less per request.

A phase is one continuous load: a warm-up, then consecutive measurement
windows cut out of it by timestamps, as Triton's perf_analyzer does (one
window of `BenchConfig.duration_s`, or as many as `WindowPlan` allows until
the caller has enough). The load never pauses between windows, so a queue
that builds up shows as latency growing from window to window. In a window,
the latency samples are those of the requests sent (scheduled) in it, each
awaited even when it ends after the window, so that no slow answer escapes;
the throughput is the successful answers *received* in it, which a
saturated server keeps at its capacity however much load is offered.

Each worker process runs one asyncio loop with grpc.aio (or, for the HTTP
protocols, one aiohttp session: see `bench_http`) and sends pre-serialized
requests (see `bench_requests`); `processes` > 1 spreads the load over
several processes on one common schedule, whose raw latency samples are
merged exactly, window by window. Nothing retries, so every answer of the
server is one request timed and counted.

This module runs phases (in this process, or in spawned worker processes);
`bench_config` holds what a run is asked to do, `bench_worker` one worker's
load and `bench_results` what was measured.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np

from convserve.client.bench_config import BenchConfig, Phase, SetupError, WindowPlan
from convserve.client.bench_results import PhaseResult, WorkerResult, merge
from convserve.client.bench_worker import PROGRESS_INTERVAL_S, STREAM_CLOSE_GRACE_S, run_worker
from convserve.client.errors import InputError, error_for

# Several processes start their common load this long after the last one is ready.
START_MARGIN_S = 0.05
SETUP_TIMEOUT_S = 60.0


class _ProcessLink:
    """A worker process's link to the parent: queue messages out, events in."""

    def __init__(
        self, index: int, results: Any, go: Any, start: Any, stop: Any, counters: Any
    ) -> None:
        self.index = index
        self.results = results
        self.go = go
        self.start = start
        self.stop = stop
        self.counters = counters

    def ready(self) -> float:
        self.results.put(("ready", self.index, None))
        if not self.go.wait(timeout=SETUP_TIMEOUT_S):
            raise SetupError("the other generator processes did not get ready in time")
        return float(self.start.value)

    def report(self, window: int, part: WorkerResult) -> None:
        self.results.put(("window", self.index, (window, part)))

    def stop_requested(self) -> bool:
        return bool(self.stop.is_set())

    def progress(self, done: int, failed: int) -> None:
        self.counters[2 * self.index] = done
        self.counters[2 * self.index + 1] = failed

    def finished(self, replicas: list[dict[str, int]]) -> None:
        self.results.put(("done", self.index, replicas))


def _process_main(
    config: BenchConfig, phase: Phase, plan: WindowPlan, index: int, link: _ProcessLink
) -> None:
    """Entry point of a worker process (spawned, so that no gRPC state is inherited)."""
    try:
        asyncio.run(run_worker(config, phase, index, plan, link))
    except BaseException as exc:  # reported to the parent, which decides what to do
        code = exc.code if isinstance(exc, SetupError) else None
        message = str(exc) if isinstance(exc, SetupError | InputError) else traceback.format_exc()
        link.results.put(("error", index, (message, code)))


class Progress:
    """One self-overwriting stderr line; silent when disabled."""

    def __init__(self, enabled: bool, total_s: float, label: str) -> None:
        self.enabled = enabled
        self.total_s = total_s
        self.label = label
        self.start = time.perf_counter()

    def show(self, done: int, failed: int) -> None:
        if not self.enabled:
            return
        elapsed = min(time.perf_counter() - self.start, self.total_s)
        filled = int(20 * elapsed / self.total_s) if self.total_s > 0 else 20
        bar = "#" * filled + "-" * (20 - filled)
        sys.stderr.write(
            f"\r{self.label:<16} [{bar}] {elapsed:5.1f}/{self.total_s:.1f} s "
            f"{done} requests, {failed} failed "
        )
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 79 + "\r")
            sys.stderr.flush()


def _setup_failure(message: str, code: grpc.StatusCode | None) -> Exception:
    if code is None:
        return SetupError(message)
    return error_for(code, message)


class _Collector:
    """Merges the processes' shares of each window, in order, and decides when to stop."""

    def __init__(
        self,
        config: BenchConfig,
        phase: Phase,
        plan: WindowPlan,
        enough: Callable[[Sequence[PhaseResult]], bool],
    ) -> None:
        self.config = config
        self.phase = phase
        self.plan = plan
        self.enough = enough
        self.parts: dict[int, dict[int, WorkerResult]] = {}
        self.measured: list[PhaseResult] = []
        self.decided = False

    def _merge(self, parts: dict[int, WorkerResult]) -> PhaseResult:
        ordered = [parts[i] for i in range(self.config.processes)]
        return merge(self.phase, self.plan.window_s, self.config.images_per_request, ordered)

    def add(self, index: int, window: int, part: WorkerResult) -> None:
        if self.decided:
            return  # a window begun after the decision: not measured
        self.parts.setdefault(window, {})[index] = part
        while not self.decided and len(self.parts.get(len(self.measured), ())) == (
            self.config.processes
        ):
            self.measured.append(self._merge(self.parts[len(self.measured)]))
            self.decided = len(self.measured) >= self.plan.max_windows or self.enough(self.measured)

    def windows(self, replicas: dict[int, list[dict[str, int]]]) -> list[PhaseResult]:
        """The measured windows, with each process's final replica counts (streams resolved)."""
        for k in range(len(self.measured)):
            for index, part in self.parts[k].items():
                final = replicas.get(index, [])
                if k < len(final):
                    part.replicas = final[k]
        return [self._merge(self.parts[k]) for k in range(len(self.measured))]


class _LocalLink:
    """The link of a worker running in this process, on this thread."""

    def __init__(
        self, collector: _Collector, bar: Progress, on_start: Callable[[float], None] | None
    ) -> None:
        self.collector = collector
        self.bar = bar
        self.on_start = on_start
        self.replicas: list[dict[str, int]] = []

    def ready(self) -> float:
        start = time.perf_counter()
        if self.on_start is not None:
            self.on_start(start + self.collector.config.warmup_s)
        return start

    def report(self, window: int, part: WorkerResult) -> None:
        self.collector.add(0, window, part)

    def stop_requested(self) -> bool:
        return self.collector.decided

    def progress(self, done: int, failed: int) -> None:
        self.bar.show(done, failed)

    def finished(self, replicas: list[dict[str, int]]) -> None:
        self.replicas = replicas


def _never_enough(measured: Sequence[PhaseResult]) -> bool:
    return False


def run_windows(
    config: BenchConfig,
    phase: Phase,
    plan: WindowPlan,
    enough: Callable[[Sequence[PhaseResult]], bool] = _never_enough,
    *,
    on_start: Callable[[float], None] | None = None,
    show_progress: bool = False,
) -> list[PhaseResult]:
    """Load the server with one continuous load and measure it in consecutive windows.

    After `config.warmup_s`, windows of `plan.window_s` follow one another without
    a pause, until `enough(the windows so far)` or `plan.max_windows`; returns
    the windows measured, in order. `on_start(t)` is called in this process with
    the `time.perf_counter()` time the first window starts (every process is
    ready then). Raises ConvServeError / SetupError if the load cannot start.
    """
    collector = _Collector(config, phase, plan, enough)
    total_s = config.warmup_s + plan.max_windows * plan.window_s
    bar = Progress(show_progress, total_s, phase.label)
    if config.processes == 1:
        link = _LocalLink(collector, bar, on_start)
        try:
            asyncio.run(run_worker(config, phase, 0, plan, link))
        except SetupError as exc:
            raise _setup_failure(str(exc), exc.code) from exc
        finally:
            bar.finish()
        return collector.windows({0: link.replicas})

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    go, stop = context.Event(), context.Event()
    start = context.Value("d", 0.0, lock=False)
    counters = context.Array("q", 2 * config.processes, lock=False)
    workers = [
        context.Process(
            target=_process_main,
            args=(config, phase, plan, i, _ProcessLink(i, results, go, start, stop, counters)),
            daemon=True,
        )
        for i in range(config.processes)
    ]
    for worker in workers:
        worker.start()
    ready: set[int] = set()
    finished: dict[int, list[dict[str, int]]] = {}
    failure: tuple[str, grpc.StatusCode | None] | None = None
    limit = time.monotonic() + SETUP_TIMEOUT_S
    try:
        while len(finished) < config.processes and failure is None:
            if time.monotonic() > limit:
                failure = ("worker processes did not finish in time", None)
                break
            try:
                kind, index, body = results.get(timeout=PROGRESS_INTERVAL_S)
            except queue.Empty:
                bar.show(sum(counters[0::2]), sum(counters[1::2]))
                crashed = [
                    i
                    for i, w in enumerate(workers)
                    if w.exitcode not in (None, 0) and i not in finished
                ]
                if crashed:
                    code = workers[crashed[0]].exitcode
                    failure = (f"worker process {crashed[0]} died (exit code {code})", None)
                continue
            if kind == "ready":
                ready.add(index)
                if len(ready) == config.processes:
                    # A moment ahead, so that every process starts on the same schedule.
                    start.value = time.perf_counter() + START_MARGIN_S
                    go.set()
                    if on_start is not None:
                        on_start(start.value + config.warmup_s)
                    limit = time.monotonic() + START_MARGIN_S + total_s + 2 * config.timeout_s
                    limit += STREAM_CLOSE_GRACE_S + SETUP_TIMEOUT_S
            elif kind == "window":
                collector.add(index, *body)
                if collector.decided:
                    stop.set()
            elif kind == "done":
                finished[index] = body
            else:
                failure = body
    finally:
        stop.set()
        bar.finish()
        for worker in workers:
            worker.join(timeout=5.0 if failure is None else 0.5)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    if failure is not None:
        raise _setup_failure(*failure)
    return collector.windows(finished)


def run_phase(config: BenchConfig, phase: Phase, *, show_progress: bool = False) -> PhaseResult:
    """Load the server for warm-up + duration and measure the duration as one window."""
    (window,) = run_windows(
        config, phase, WindowPlan(config.duration_s, 1), show_progress=show_progress
    )
    return window


def run(
    config: BenchConfig, phases: Sequence[Phase], *, show_progress: bool = False
) -> list[PhaseResult]:
    return [run_phase(config, phase, show_progress=show_progress) for phase in phases]


def measure(
    target: str,
    protocol: str,
    model: str,
    images: np.ndarray,
    concurrency: int,
    seconds: float,
    **options: Any,
) -> PhaseResult:
    """One closed-loop phase of `concurrency` users for `seconds` (after the warm-up).

    `protocol` is one of `PROTOCOLS` (the HTTP ones take ``HOST:PORT`` or an
    http(s):// URL as `target`); `options` are further `BenchConfig` fields
    (``images_per_request``, ``warmup_s``, ``token``, ``tls``, ...).
    """
    config = BenchConfig(
        target=target,
        images=images,
        protocol=protocol,
        model_name=model,
        duration_s=seconds,
        **options,
    )
    return run_phase(config, Phase(concurrency=concurrency))
