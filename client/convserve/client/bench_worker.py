"""One ``convserve bench`` worker: an asyncio loop in one process that sets up its
requests, sends the load of one phase and cuts it into measurement windows.

See `convserve.client.bench` for the design; `run_worker` is the entry point,
and `WorkerLink` how a worker reports to whoever runs the phase.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
import numpy as np

from convserve.client import bench_requests, convert
from convserve.client.bench_config import HTTP_PROTOCOLS, BenchConfig, Phase, SetupError, WindowPlan
from convserve.client.bench_results import WorkerResult
from convserve.client.channel import aio_channel, auth_metadata, channel_options
from convserve.client.errors import ConvServeError
from convserve.v1 import convserve_pb2

PROGRESS_INTERVAL_S = 0.25
# How often a worker checks whether a window has settled or it should stop.
SETTLE_POLL_S = 0.01
# How long a stream may take to end after the load stops (its replica comes with its end).
STREAM_CLOSE_GRACE_S = 2.0
# The trailing metadata key a convserve server names its replica with.
REPLICA_METADATA_KEY = "convserve-replica"


# What a sender returns: the status, and who answered: a replica name, None
# (not named), or the stream whose replica is known once the stream has ended.
Answer = tuple[grpc.StatusCode, "str | _Stream | None"]


def _replica_of(metadata: Any) -> str | None:
    """The ``convserve-replica`` value of a call's trailing metadata, if any."""
    for key, value in metadata or ():
        if key == REPLICA_METADATA_KEY:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


async def _setup_call(rpc: str, model: str, call: Awaitable[Any]) -> Any:
    """``await call``; a failure becomes a SetupError naming the RPC and the model."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise SetupError(
            f"{rpc} for model {model!r} failed: {exc.code().name}: {exc.details()}", exc.code()
        ) from exc


async def _convserve_input_shape(
    channel: grpc.aio.Channel, config: BenchConfig, metadata: tuple[tuple[str, str], ...]
) -> tuple[int, int, int]:
    """The model's (H, W, C) from GetModelMetadata."""
    call = channel.unary_unary(
        bench_requests.METADATA_METHOD,
        request_serializer=convserve_pb2.GetModelMetadataRequest.SerializeToString,
        response_deserializer=convserve_pb2.GetModelMetadataResponse.FromString,
    )
    request = convert.metadata_request(convert.model_spec(config.model_name))
    response = await _setup_call(
        "GetModelMetadata",
        config.model_name,
        call(request, timeout=config.timeout_s, metadata=metadata),
    )
    try:
        return convert.metadata_result(response).input_shape
    except ConvServeError as exc:
        raise SetupError(exc.details, exc.code) from exc


async def _prepare(
    channel: grpc.aio.Channel, config: BenchConfig, metadata: tuple[tuple[str, str], ...]
) -> tuple[str, list[bytes]]:
    if config.protocol == "convserve":
        shape = None
        if config.rpc == "predict":
            shape = await _convserve_input_shape(channel, config, metadata)
        return bench_requests.convserve_requests(
            config.rpc, config.images, config.images_per_request, config.model_name, shape
        )
    service_pb2, service_pb2_grpc = bench_requests.import_oip()
    if config.oip_input is not None:
        # Given on the command line: the metadata may declare nothing (MLServer's default).
        return bench_requests.oip_requests(
            config.model_name, config.oip_input, config.images, config.images_per_request
        )
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    response = await _setup_call(
        "ModelMetadata",
        config.model_name,
        stub.ModelMetadata(
            service_pb2.ModelMetadataRequest(name=config.model_name),
            timeout=config.timeout_s,
            metadata=metadata,
        ),
    )
    spec = bench_requests.oip_input(response)
    return bench_requests.oip_requests(
        config.model_name, spec, config.images, config.images_per_request
    )


async def _send(
    call: grpc.aio.UnaryUnaryMultiCallable,
    request: bytes,
    timeout_s: float,
    metadata: tuple[tuple[str, str], ...],
) -> Answer:
    pending = call(request, timeout=timeout_s, metadata=metadata)
    try:
        await pending
    except grpc.aio.AioRpcError as exc:
        return exc.code(), _replica_of(exc.trailing_metadata())
    return grpc.StatusCode.OK, _replica_of(await pending.trailing_metadata())


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Stream:
    """One PredictStream call that many users share: a request's answer wakes its sender."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: tuple[tuple[str, str], ...],
        timeout_s: float,
    ) -> None:
        from convserve.v1 import convserve_pb2 as pb

        self._id_message = pb.PredictStreamRequest
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[grpc.StatusCode]] = {}
        self._next_id = 0
        # The replica that served the stream, from its trailing metadata at the end.
        self.replica: str | None = None
        method = channel.stream_stream(
            bench_requests.PREDICT_STREAM_METHOD,
            response_deserializer=pb.PredictStreamResponse.FromString,
        )
        self._call = method(self._requests(), timeout=timeout_s, metadata=metadata)
        self._reader = asyncio.create_task(self._read())

    async def _requests(self) -> Any:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        code = grpc.StatusCode.UNAVAILABLE
        try:
            async for answer in self._call:
                waiter = self._waiting.pop(answer.id, None)
                if waiter is None or waiter.done():
                    continue
                if answer.HasField("response"):
                    waiter.set_result(grpc.StatusCode.OK)
                else:
                    waiter.set_result(_CODES.get(answer.error.code, grpc.StatusCode.UNKNOWN))
            self.replica = _replica_of(await self._call.trailing_metadata())
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            self.replica = _replica_of(exc.trailing_metadata())
        # The stream ended: whoever still waits gets its status (or UNAVAILABLE).
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_result(code)
        self._waiting.clear()

    async def send(self, request: bytes) -> Answer:
        """Send a serialized id-less PredictStreamRequest and wait for its answer's status."""
        if self._reader.done():
            return grpc.StatusCode.UNAVAILABLE, None
        request_id = self._next_id
        self._next_id += 1
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = waiter
        self._outbox.put_nowait(self._id_message(id=request_id).SerializeToString() + request)
        return await waiter, self

    async def close(self, grace_s: float) -> None:
        """End the stream; cancel it if the server has not answered every message by `grace_s`.

        Ending it lets the server send its trailing metadata (the replica).
        """
        self._outbox.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), grace_s)
        except TimeoutError:
            self._call.cancel()
            await self._reader


def _round_robin(
    senders: list[Callable[[bytes], Awaitable[Answer]]],
) -> Callable[[bytes], Awaitable[Answer]]:
    """A sender that hands each request to the next of `senders` in turn."""
    turn = itertools.cycle(senders)

    def send(request: bytes) -> Awaitable[Answer]:
        return next(turn)(request)

    return send


class _Window:
    """What one process saw in one window."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.codes: Counter[str] = Counter()
        self.answered_by: Counter[str | _Stream] = Counter()
        self.completed = 0  # successful answers received in the window
        self.in_flight = 0  # requests sent in the window and not yet answered
        self.scheduled = 0
        self.sent_by_end = 0


class _Recorder:
    """Cuts one continuous load into windows by timestamps.

    A request belongs to the window it was sent (open loop: scheduled) in; a
    successful answer also counts towards the throughput of the window it
    arrives in. A window is settled once it has ended, every request of it has
    gone out and been answered, and its end's CPU time has been read.
    """

    def __init__(self, first_start: float, plan: WindowPlan, open_loop: bool) -> None:
        self.first_start = first_start
        self.plan = plan
        self.open_loop = open_loop
        self.windows = [_Window() for _ in range(plan.max_windows)]
        self.end = self.boundary(plan.max_windows)  # no request is sent after it
        # Open loop: every request scheduled before this time has been sent.
        self.issued_until = math.inf if not open_loop else first_start
        # (wall, CPU) when each boundary was reached: window k spans marks k and k + 1.
        self.marks: list[tuple[float, float]] = []
        self.done = 0
        self.failed = 0

    def boundary(self, k: int) -> float:
        return self.first_start + k * self.plan.window_s

    def window_of(self, at: float) -> int | None:
        k = math.floor((at - self.first_start) / self.plan.window_s)
        return k if 0 <= k < len(self.windows) else None

    def sent(self, at: float) -> int | None:
        """A request sent (scheduled) at `at`: its window, or None outside every window."""
        k = self.window_of(at)
        if k is not None:
            self.windows[k].in_flight += 1
        return k

    def answered(self, k: int | None, latency_s: float, answer: Answer, at: float) -> None:
        code, replica = answer
        self.done += 1
        self.failed += code != grpc.StatusCode.OK
        if code == grpc.StatusCode.OK:
            arrived_in = self.window_of(at)
            if arrived_in is not None:
                self.windows[arrived_in].completed += 1
        if k is None:
            return
        window = self.windows[k]
        window.in_flight -= 1
        window.codes[code.name] += 1
        if code == grpc.StatusCode.OK:
            window.latencies.append(latency_s)
            if replica is not None:
                window.answered_by[replica] += 1

    async def mark_boundaries(self) -> None:
        for k in range(len(self.windows) + 1):
            await asyncio.sleep(max(0.0, self.boundary(k) - time.perf_counter()))
            self.marks.append((time.perf_counter(), time.process_time()))

    def settled(self, k: int) -> bool:
        return (
            len(self.marks) > k + 1
            and self.issued_until >= self.boundary(k + 1)
            and self.windows[k].in_flight == 0
        )

    def replicas(self, k: int) -> dict[str, int]:
        """Window k's successful requests per replica name, as far as known now.

        A stream's replica is known once the stream has ended.
        """
        counts: Counter[str] = Counter()
        for who, n in self.windows[k].answered_by.items():
            name = who if isinstance(who, str) else who.replica
            if name is not None:
                counts[name] += n
        return dict(counts)

    def result(self, k: int) -> WorkerResult:
        window = self.windows[k]
        (wall0, cpu0), (wall1, cpu1) = self.marks[k], self.marks[k + 1]
        return WorkerResult(
            latencies_s=np.array(window.latencies, dtype=np.float64),
            codes=dict(window.codes),
            completed=window.completed,
            cpu_s=cpu1 - cpu0,
            wall_s=wall1 - wall0,
            replicas=self.replicas(k),
            scheduled=window.scheduled if self.open_loop else None,
            sent_by_end=window.sent_by_end if self.open_loop else None,
        )


class WorkerLink(Protocol):
    """How a worker talks to whoever runs the phase (this process, or the parent)."""

    def ready(self) -> float:
        """Setup done; blocks until every worker is, and returns the common start time."""

    def report(self, window: int, part: WorkerResult) -> None:
        """Window `window` has settled."""

    def stop_requested(self) -> bool:
        """The phase has enough windows: stop loading."""

    def progress(self, done: int, failed: int) -> None:
        """Requests answered so far, and how many failed."""

    def finished(self, replicas: list[dict[str, int]]) -> None:
        """The load has stopped; per reported window, its requests per replica (final)."""


async def _closed_loop(
    send: Callable[[bytes], Awaitable[Answer]],
    requests: list[bytes],
    users: int,
    first_user: int,
    recorder: _Recorder,
) -> None:
    async def user(n: int) -> None:
        i = n
        while (start := time.perf_counter()) < recorder.end:
            k = recorder.sent(start)
            answer = await send(requests[i % len(requests)])
            done = time.perf_counter()
            recorder.answered(k, done - start, answer, done)
            i += 1

    await asyncio.gather(*(user(first_user + n) for n in range(users)))


async def _open_loop(
    send: Callable[[bytes], Awaitable[Answer]],
    requests: list[bytes],
    schedule: tuple[float, float],
    recorder: _Recorder,
    pending: set[asyncio.Task[None]],
) -> None:
    """Send on schedule until the last window ends; answers are awaited by their tasks."""
    first, interval = schedule

    async def timed(request: bytes, scheduled: float, k: int | None) -> None:
        answer = await send(request)
        done = time.perf_counter()
        recorder.answered(k, done - scheduled, answer, done)

    i = 0
    while (scheduled := first + i * interval) < recorder.end:
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        k = recorder.sent(scheduled)
        if k is not None:
            window = recorder.windows[k]
            window.scheduled += 1
            # A generator that cannot keep up sends late, and after the window's end
            # catches up on what it owed: those requests were not sent when they should.
            window.sent_by_end += time.perf_counter() < recorder.boundary(k + 1)
        # Sent even when late: the lateness is part of the latency measured.
        task = asyncio.create_task(timed(requests[i % len(requests)], scheduled, k))
        pending.add(task)
        task.add_done_callback(pending.discard)
        i += 1
        recorder.issued_until = first + i * interval
    recorder.issued_until = math.inf


async def _measure(recorder: _Recorder, link: WorkerLink) -> int:
    """Report each window once settled, until told to stop or the last one; returns how many."""
    for k in range(len(recorder.windows)):
        while not recorder.settled(k):
            if link.stop_requested():
                return k
            await asyncio.sleep(SETTLE_POLL_S)
        link.report(k, recorder.result(k))
        if link.stop_requested():
            return k + 1
    return len(recorder.windows)


def _users(concurrency: int, processes: int, index: int) -> tuple[int, int]:
    """(users, first user's number) of process `index` in a closed loop of `concurrency`."""
    share, extra = divmod(concurrency, processes)
    return share + (index < extra), index * share + min(index, extra)


async def run_worker(
    config: BenchConfig, phase: Phase, index: int, plan: WindowPlan, link: WorkerLink
) -> None:
    """Run worker `index` of `config.processes` for one phase: set up, then one
    continuous load (warm-up, then the windows of `plan`) until `link` says stop."""
    if config.protocol in HTTP_PROTOCOLS:
        from convserve.client import bench_http

        # One connection per user; an open loop sends whenever its schedule says.
        connections = 0
        if phase.concurrency is not None:
            connections, _ = _users(phase.concurrency, config.processes, index)
        async with bench_http.open_load(config, connections) as (send, requests):
            await _load(config, phase, index, plan, link, send, requests)
        return

    metadata = auth_metadata(config.token)
    # No retry policy: every answer the server sends is a request of its own,
    # timed and counted as such (a retried call would hide a CANCELLED answer).
    options = channel_options(tls=config.tls, retries=False)
    async with aio_channel(config.target, config.tls, options) as channel:
        method, requests = await _prepare(channel, config, metadata)
        call = channel.unary_unary(method)

        async def unary(request: bytes) -> Answer:
            return await _send(call, request, config.timeout_s, metadata)

        # One request first: a server that is down or rejects the request
        # fails the run now, not with a table of errors.
        try:
            await call(requests[0], timeout=config.timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise SetupError(
                f"the first request failed: {exc.code().name}: {exc.details()}", exc.code()
            ) from exc

        def streams(lifetime_s: float) -> list[_Stream]:
            return [_Stream(channel, metadata, lifetime_s) for _ in range(config.streams)]

        await _load(config, phase, index, plan, link, unary, requests, streams)


async def _load(
    config: BenchConfig,
    phase: Phase,
    index: int,
    plan: WindowPlan,
    link: WorkerLink,
    send: Callable[[bytes], Awaitable[Answer]],
    requests: list[bytes],
    open_streams: Callable[[float], list[_Stream]] | None = None,
) -> None:
    """The load of a worker that is set up: `send` takes one of `requests` and answers
    its status; with `config.streams`, `open_streams(lifetime_s)` opens the streams."""
    start = link.ready()
    recorder = _Recorder(start + config.warmup_s, plan, open_loop=phase.rate is not None)

    streams: list[_Stream] = []
    if config.streams and open_streams is not None:
        # The whole load on each stream; a request's own wait is bounded by the stream's.
        streams = open_streams(recorder.end - time.perf_counter() + 2 * config.timeout_s)
        requests = bench_requests.stream_requests(requests)
        send = _round_robin([stream.send for stream in streams])

    pending: set[asyncio.Task[None]] = set()
    if phase.concurrency is not None:
        users, first_user = _users(phase.concurrency, config.processes, index)
        load = _closed_loop(send, requests, users, first_user, recorder)
    else:
        assert phase.rate is not None
        # Process p sends requests p, p+P, p+2P, ... of one global schedule.
        schedule = (start + index / phase.rate, config.processes / phase.rate)
        load = _open_loop(send, requests, schedule, recorder, pending)

    async def report_progress() -> None:
        while True:
            link.progress(recorder.done, recorder.failed)
            await asyncio.sleep(PROGRESS_INTERVAL_S)

    tasks = [
        asyncio.create_task(load),
        asyncio.create_task(recorder.mark_boundaries()),
        asyncio.create_task(report_progress()),
    ]
    try:
        reported = await _measure(recorder, link)
    finally:
        # What is still in flight belongs to no reported window.
        for task in [*tasks, *pending]:
            task.cancel()
        await asyncio.gather(*tasks, *pending, return_exceptions=True)
        for stream in streams:
            await stream.close(STREAM_CLOSE_GRACE_S)
    link.progress(recorder.done, recorder.failed)
    link.finished([recorder.replicas(k) for k in range(reported)])
