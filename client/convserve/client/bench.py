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

Each worker process runs one asyncio loop with grpc.aio and sends
pre-serialized requests (see `bench_requests`); `processes` > 1 spreads the
load over several processes, whose raw latency samples are merged exactly.
Only requests sent (or scheduled) after the warm-up and before the end of
the measurement window count; requests still in flight at the end are
awaited, so their latency is not lost.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing
import queue
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from convserve.client import bench_requests, convert
from convserve.client.channel import TlsConfig, aio_channel, auth_metadata, channel_options
from convserve.client.errors import ConvServeError, InputError, error_for
from convserve.v1 import convserve_pb2

PROGRESS_INTERVAL_S = 0.25
SETUP_TIMEOUT_S = 60.0
# The trailing metadata key a convserve server names its replica with.
REPLICA_METADATA_KEY = "convserve-replica"
# Generator-bottleneck warnings: an open loop that sent less than this share of
# its schedule by the window's end, or a process using at least this many cores.
SENT_FRACTION_WARNING = 0.95
BUSY_PROCESS_CORES = 0.9


@dataclass(frozen=True)
class BenchConfig:
    """What to load and how.

    `images` is the uint8 [k,H,W] or [k,H,W,C] pool requests are made from;
    predict requests resize it to the model's declared input shape.
    `model_name` is the convserve model (empty: the server's default) or,
    with oip, the OIP model_name (required).
    """

    target: str
    images: np.ndarray
    protocol: str = "convserve"  # or "oip"
    rpc: str = "predict"  # or "convolve" (convserve only)
    model_name: str = ""  # required with oip
    images_per_request: int = 1
    duration_s: float = 10.0
    warmup_s: float = 1.0
    processes: int = 1
    # 0: one unary call per request; N > 0: each process sends its requests over N
    # PredictStream streams (convserve predict only), taking turns.
    streams: int = 0
    timeout_s: float = 10.0
    tls: TlsConfig | None = None
    token: str | None = None
    # The OIP input to send (``--input``) when the model's metadata declares none.
    oip_input: bench_requests.OipInput | None = None

    def __post_init__(self) -> None:
        if self.protocol not in ("convserve", "oip"):
            raise InputError(f"protocol: expected convserve or oip, got {self.protocol!r}")
        if self.protocol == "oip" and not self.model_name:
            raise InputError("--protocol oip needs --model NAME")
        if self.protocol == "oip" and self.rpc != "predict":
            raise InputError("--protocol oip supports only --rpc predict (model inference)")
        if self.images_per_request < 1:
            raise InputError("images per request must be >= 1")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.timeout_s <= 0:
            raise InputError("duration and timeout must be > 0, warm-up >= 0")
        if self.processes < 1:
            raise InputError("processes must be >= 1")
        if self.streams < 0:
            raise InputError(f"streams must be >= 0, got {self.streams}")
        if self.streams and (self.protocol != "convserve" or self.rpc != "predict"):
            raise InputError("--streams needs --protocol convserve and --rpc predict")
        if self.oip_input is not None and self.protocol != "oip":
            raise InputError("--input applies only to --protocol oip")


@dataclass(frozen=True)
class Phase:
    """Exactly one of `concurrency` (closed loop) and `rate` (open loop, requests/s)."""

    concurrency: int | None = None
    rate: float | None = None

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise InputError("a phase needs either a concurrency or a rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise InputError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise InputError(f"rate must be > 0, got {self.rate}")

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"closed c={self.concurrency}"
        return f"open {self.rate:g}/s"


@dataclass
class WorkerResult:
    """One process's share of a phase: raw samples, so that merging is exact."""

    latencies_s: np.ndarray  # successful requests in the window
    codes: dict[str, int]  # status code name -> requests in the window (OK included)
    cpu_s: float
    wall_s: float
    # Successful requests in the window per replica name (the server's trailing
    # ``convserve-replica`` metadata); empty when the server sends none.
    replicas: dict[str, int] = field(default_factory=dict)
    # Open loop: requests scheduled in the window, and how many of them had gone
    # out by the window's end (fewer when the generator fell behind its schedule).
    scheduled: int | None = None
    sent_by_end: int | None = None


@dataclass
class PhaseResult:
    phase: Phase
    duration_s: float
    images_per_request: int
    latencies_s: np.ndarray
    codes: dict[str, int]
    cpu_s: list[float]  # per process
    wall_s: list[float]
    replicas: dict[str, int] = field(default_factory=dict)
    scheduled: int | None = None
    sent_by_end: int | None = None

    @property
    def ok(self) -> int:
        return self.codes.get("OK", 0)

    @property
    def errors(self) -> dict[str, int]:
        return {code: n for code, n in sorted(self.codes.items()) if code != "OK"}

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.duration_s

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.images_per_request

    def percentile_s(self, q: float) -> float:
        """Nearest-rank percentile of the successful requests' latencies (NaN if none)."""
        if self.latencies_s.size == 0:
            return math.nan
        return float(np.percentile(self.latencies_s, q, method="inverted_cdf"))

    @property
    def max_s(self) -> float:
        return float(self.latencies_s.max()) if self.latencies_s.size else math.nan

    @property
    def cpu_cores(self) -> float:
        """The generator's CPU use in cores: per-process CPU time / wall time, summed."""
        return sum(self.cpu_per_process)

    @property
    def cpu_per_process(self) -> list[float]:
        return [c / w if w > 0 else 0.0 for c, w in zip(self.cpu_s, self.wall_s, strict=True)]

    @property
    def sent_fraction(self) -> float | None:
        """Open loop: the share of the scheduled requests sent by the window's end."""
        if self.scheduled is None or self.sent_by_end is None or self.scheduled == 0:
            return None
        return self.sent_by_end / self.scheduled

    @property
    def replica_shares(self) -> dict[str, float]:
        """Each replica's share of the successful requests that named their replica."""
        total = sum(self.replicas.values())
        return {name: n / total for name, n in sorted(self.replicas.items())} if total else {}

    def generator_warnings(self) -> list[str]:
        """Why the generator, not the server, may have limited this phase (empty if it kept up)."""
        warnings = []
        fraction = self.sent_fraction
        if fraction is not None and fraction < SENT_FRACTION_WARNING:
            warnings.append(
                f"sent only {self.sent_by_end} of {self.scheduled} scheduled requests "
                f"({100.0 * fraction:.0f}%) by the end of the window"
            )
        busy = [i for i, c in enumerate(self.cpu_per_process) if c >= BUSY_PROCESS_CORES]
        if busy:
            warnings.append(
                f"generator process(es) {', '.join(map(str, busy))} used "
                f">= {BUSY_PROCESS_CORES:g} core each (try --processes)"
            )
        return warnings

    def as_dict(self) -> dict[str, Any]:
        def ms(seconds: float) -> float | None:
            return None if math.isnan(seconds) else round(seconds * 1000.0, 3)

        return {
            "mode": "closed" if self.phase.concurrency is not None else "open",
            "concurrency": self.phase.concurrency,
            "rate": self.phase.rate,
            "duration_s": self.duration_s,
            "requests_ok": self.ok,
            "errors": self.errors,
            "requests_per_s": round(self.requests_per_s, 3),
            "images_per_s": round(self.images_per_s, 3),
            "latency_ms": {
                "p50": ms(self.percentile_s(50)),
                "p90": ms(self.percentile_s(90)),
                "p99": ms(self.percentile_s(99)),
                "max": ms(self.max_s),
            },
            "generator_cpu_cores": round(self.cpu_cores, 4),
            "generator_cpu_per_process": [
                round(c / w, 4) if w > 0 else None
                for c, w in zip(self.cpu_s, self.wall_s, strict=True)
            ],
            "scheduled": self.scheduled,
            "sent_by_end": self.sent_by_end,
            "generator_warnings": self.generator_warnings(),
            "replica_requests": dict(sorted(self.replicas.items())),
            "replica_shares": {k: round(v, 4) for k, v in self.replica_shares.items()},
        }


def merge(phase: Phase, config: BenchConfig, parts: Sequence[WorkerResult]) -> PhaseResult:
    """Combine the processes' raw samples and counts (no averaging of percentiles)."""
    codes: Counter[str] = Counter()
    for part in parts:
        codes.update(part.codes)
    replicas: Counter[str] = Counter()
    for part in parts:
        replicas.update(part.replicas)
    latencies = [p.latencies_s for p in parts if p.latencies_s.size]
    open_loop = all(p.scheduled is not None for p in parts)
    return PhaseResult(
        phase=phase,
        duration_s=config.duration_s,
        images_per_request=config.images_per_request,
        latencies_s=np.sort(np.concatenate(latencies)) if latencies else np.zeros(0),
        codes=dict(codes),
        cpu_s=[p.cpu_s for p in parts],
        wall_s=[p.wall_s for p in parts],
        replicas=dict(replicas),
        scheduled=sum(p.scheduled or 0 for p in parts) if open_loop else None,
        sent_by_end=sum(p.sent_by_end or 0 for p in parts) if open_loop else None,
    )


def combine(results: Sequence[PhaseResult]) -> PhaseResult:
    """Several measurements of one phase (e.g. consecutive windows) as one.

    Samples and counts are pooled; CPU and wall time add up per process.
    """
    if not results:
        raise ValueError("combine needs at least one result")
    first = results[0]
    codes: Counter[str] = Counter()
    replicas: Counter[str] = Counter()
    for r in results:
        codes.update(r.codes)
        replicas.update(r.replicas)
    latencies = [r.latencies_s for r in results if r.latencies_s.size]
    open_loop = all(r.scheduled is not None for r in results)
    return PhaseResult(
        phase=first.phase,
        duration_s=sum(r.duration_s for r in results),
        images_per_request=first.images_per_request,
        latencies_s=np.sort(np.concatenate(latencies)) if latencies else np.zeros(0),
        codes=dict(codes),
        cpu_s=[sum(cs) for cs in zip(*(r.cpu_s for r in results), strict=True)],
        wall_s=[sum(ws) for ws in zip(*(r.wall_s for r in results), strict=True)],
        replicas=dict(replicas),
        scheduled=sum(r.scheduled or 0 for r in results) if open_loop else None,
        sent_by_end=sum(r.sent_by_end or 0 for r in results) if open_loop else None,
    )


# --- One worker: an asyncio loop in one process --------------------------------


# What a sender returns: the status, and who answered: a replica name, None
# (not named), or the stream whose replica is known once the stream has ended.
Answer = tuple[grpc.StatusCode, "str | _Stream | None"]


class _Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.codes: Counter[str] = Counter()
        self.answered_by: Counter[str | _Stream] = Counter()
        self.done = 0
        self.failed = 0
        self.scheduled: int | None = None
        self.sent_by_end: int | None = None

    def add(self, latency_s: float, answer: Answer, counted: bool) -> None:
        code, replica = answer
        self.done += 1
        self.failed += code != grpc.StatusCode.OK
        if counted:
            self.codes[code.name] += 1
            if code == grpc.StatusCode.OK:
                self.latencies.append(latency_s)
                if replica is not None:
                    self.answered_by[replica] += 1

    def replicas(self) -> dict[str, int]:
        """Successful requests per replica name (streams resolved to theirs)."""
        counts: Counter[str] = Counter()
        for who, n in self.answered_by.items():
            name = who if isinstance(who, str) else who.replica
            if name is not None:
                counts[name] += n
        return dict(counts)


def _replica_of(metadata: Any) -> str | None:
    """The ``convserve-replica`` value of a call's trailing metadata, if any."""
    for key, value in metadata or ():
        if key == REPLICA_METADATA_KEY:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


class SetupError(Exception):
    """The run could not start; carries the status code when the server refused."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


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

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        await self._reader


def _round_robin(
    senders: list[Callable[[bytes], Awaitable[Answer]]],
) -> Callable[[bytes], Awaitable[Answer]]:
    """A sender that hands each request to the next of `senders` in turn."""
    turn = itertools.cycle(senders)

    def send(request: bytes) -> Awaitable[Answer]:
        return next(turn)(request)

    return send


async def _closed_loop(
    send: Callable[[bytes], Any],
    requests: list[bytes],
    users: int,
    first_user: int,
    window: tuple[float, float],
    recorder: _Recorder,
) -> None:
    warm_end, end = window

    async def user(n: int) -> None:
        i = n
        while (start := time.perf_counter()) < end:
            answer = await send(requests[i % len(requests)])
            recorder.add(time.perf_counter() - start, answer, start >= warm_end)
            i += 1

    if users == 0:
        # Idle, but present for the whole phase so that its CPU share is comparable.
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
    await asyncio.gather(*(user(first_user + n) for n in range(users)))


async def _open_loop(
    send: Callable[[bytes], Any],
    requests: list[bytes],
    schedule: tuple[float, float],
    window: tuple[float, float],
    recorder: _Recorder,
) -> None:
    first, interval = schedule
    warm_end, end = window
    pending: set[asyncio.Task[None]] = set()

    async def timed(request: bytes, scheduled: float) -> None:
        answer = await send(request)
        recorder.add(time.perf_counter() - scheduled, answer, scheduled >= warm_end)

    recorder.scheduled = recorder.sent_by_end = 0
    i = 0
    while (scheduled := first + i * interval) < end:
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if scheduled >= warm_end:
            recorder.scheduled += 1
            # A generator that cannot keep up sends late, and after `end` catches up
            # on what it owed: those requests were not sent when they should have been.
            recorder.sent_by_end += time.perf_counter() < end
        # Sent even when late: the lateness is part of the latency measured.
        task = asyncio.create_task(timed(requests[i % len(requests)], scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
        i += 1
    if pending:
        await asyncio.gather(*pending)


async def run_worker(
    config: BenchConfig,
    phase: Phase,
    index: int,
    ready: Callable[[], None],
    progress: Callable[[int, int], None] | None,
) -> WorkerResult:
    """Run worker `index` of `config.processes` for one phase.

    `ready` is called after setup (and blocks until every worker is ready);
    `progress(done, failed)` is called periodically.
    """
    metadata = auth_metadata(config.token)
    options = channel_options(tls=config.tls)
    async with aio_channel(config.target, config.tls, options) as channel:
        method, requests = await _prepare(channel, config, metadata)
        call = channel.unary_unary(method)

        async def unary(request: bytes) -> Answer:
            return await _send(call, request, config.timeout_s, metadata)

        send: Callable[[bytes], Awaitable[Answer]] = unary

        # One request first: a server that is down or rejects the request
        # fails the run now, not with a table of errors.
        try:
            await call(requests[0], timeout=config.timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise SetupError(
                f"the first request failed: {exc.code().name}: {exc.details()}", exc.code()
            ) from exc
        ready()

        streams: list[_Stream] = []
        if config.streams:
            # The whole run on each stream; a request's own wait is bounded by the stream's.
            lifetime_s = config.warmup_s + config.duration_s + 2 * config.timeout_s
            streams = [_Stream(channel, metadata, lifetime_s) for _ in range(config.streams)]
            requests = bench_requests.stream_requests(requests)
            send = _round_robin([stream.send for stream in streams])

        recorder = _Recorder()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        warm_end = wall0 + config.warmup_s
        end = warm_end + config.duration_s

        reporter: asyncio.Task[None] | None = None
        if progress is not None:
            report = progress

            async def report_progress() -> None:
                while True:
                    report(recorder.done, recorder.failed)
                    await asyncio.sleep(PROGRESS_INTERVAL_S)

            reporter = asyncio.create_task(report_progress())
        try:
            if phase.concurrency is not None:
                share, extra = divmod(phase.concurrency, config.processes)
                users = share + (index < extra)
                first_user = index * share + min(index, extra)
                await _closed_loop(send, requests, users, first_user, (warm_end, end), recorder)
            else:
                assert phase.rate is not None
                # Process p sends requests p, p+P, p+2P, ... of one global schedule.
                interval = config.processes / phase.rate
                first = wall0 + index / phase.rate
                await _open_loop(send, requests, (first, interval), (warm_end, end), recorder)
        finally:
            if reporter is not None:
                reporter.cancel()
            for stream in streams:
                await stream.close()
        if progress is not None:
            progress(recorder.done, recorder.failed)
        return WorkerResult(
            latencies_s=np.array(recorder.latencies, dtype=np.float64),
            codes=dict(recorder.codes),
            cpu_s=time.process_time() - cpu0,
            wall_s=time.perf_counter() - wall0,
            replicas=recorder.replicas(),
            scheduled=recorder.scheduled,
            sent_by_end=recorder.sent_by_end,
        )


# --- Running phases across processes ----------------------------------------------


def _process_main(
    config: BenchConfig,
    phase: Phase,
    index: int,
    barrier: Any,
    results: Any,
    counters: Any,
) -> None:
    """Entry point of a worker process (spawned, so that no gRPC state is inherited)."""

    def ready() -> None:
        barrier.wait(timeout=SETUP_TIMEOUT_S)

    def progress(done: int, failed: int) -> None:
        counters[2 * index] = done
        counters[2 * index + 1] = failed

    try:
        result = asyncio.run(run_worker(config, phase, index, ready, progress))
        results.put((index, result, None))
    except BaseException as exc:  # reported to the parent, which decides what to do
        barrier.abort()
        code = exc.code if isinstance(exc, SetupError) else None
        message = str(exc) if isinstance(exc, SetupError | InputError) else traceback.format_exc()
        results.put((index, None, (message, code)))


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


def run_phase(config: BenchConfig, phase: Phase, *, show_progress: bool = False) -> PhaseResult:
    """Load the server for warm-up + duration; raises ConvServeError / SetupError if it cannot."""
    bar = Progress(show_progress, config.warmup_s + config.duration_s, phase.label)
    if config.processes == 1:
        try:
            part = asyncio.run(run_worker(config, phase, 0, lambda: None, bar.show))
        except SetupError as exc:
            raise _setup_failure(str(exc), exc.code) from exc
        finally:
            bar.finish()
        return merge(phase, config, [part])

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(config.processes)
    results = context.Queue()
    counters = context.Array("q", 2 * config.processes, lock=False)
    workers = [
        context.Process(
            target=_process_main,
            args=(config, phase, i, barrier, results, counters),
            daemon=True,
        )
        for i in range(config.processes)
    ]
    for worker in workers:
        worker.start()
    parts: dict[int, WorkerResult] = {}
    failure: tuple[str, grpc.StatusCode | None] | None = None
    limit = time.monotonic() + SETUP_TIMEOUT_S + config.warmup_s + config.duration_s
    limit += 2 * config.timeout_s
    try:
        while len(parts) < config.processes and failure is None:
            if time.monotonic() > limit:
                failure = ("worker processes did not finish in time", None)
                break
            try:
                index, part, error = results.get(timeout=PROGRESS_INTERVAL_S)
            except queue.Empty:
                bar.show(sum(counters[0::2]), sum(counters[1::2]))
                crashed = [
                    i
                    for i, w in enumerate(workers)
                    if w.exitcode not in (None, 0) and i not in parts
                ]
                if crashed:
                    code = workers[crashed[0]].exitcode
                    failure = (f"worker process {crashed[0]} died (exit code {code})", None)
                continue
            if error is not None:
                failure = error
            else:
                parts[index] = part
    finally:
        bar.finish()
        for worker in workers:
            worker.join(timeout=5.0 if failure is None else 0.5)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    if failure is not None:
        raise _setup_failure(*failure)
    return merge(phase, config, [parts[i] for i in range(config.processes)])


def run(
    config: BenchConfig, phases: Sequence[Phase], *, show_progress: bool = False
) -> list[PhaseResult]:
    return [run_phase(config, phase, show_progress=show_progress) for phase in phases]
