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
from typing import Any, Protocol

import grpc
import numpy as np

from convserve.client import bench_requests, convert
from convserve.client.channel import TlsConfig, aio_channel, auth_metadata, channel_options
from convserve.client.errors import ConvServeError, InputError, error_for
from convserve.v1 import convserve_pb2

# convserve.v1 and the Open Inference Protocol over gRPC; TF Serving's REST API and
# KServe v2 (the Open Inference Protocol) over HTTP, see `bench_http`.
PROTOCOLS = ("convserve", "oip", "rest", "oip-http")
HTTP_PROTOCOLS = ("rest", "oip-http")
PROGRESS_INTERVAL_S = 0.25
# How often a worker checks whether a window has settled or it should stop.
SETTLE_POLL_S = 0.01
# Several processes start their common load this long after the last one is ready.
START_MARGIN_S = 0.05
# How long a stream may take to end after the load stops (its replica comes with its end).
STREAM_CLOSE_GRACE_S = 2.0
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
    with the other protocols, the model's name in theirs (required). The HTTP
    protocols take ``HOST:PORT`` or an ``http://`` / ``https://`` URL as
    `target` (see `bench_http`).
    """

    target: str
    images: np.ndarray
    protocol: str = "convserve"  # one of PROTOCOLS
    rpc: str = "predict"  # or "convolve" (convserve only)
    model_name: str = ""  # required except with convserve
    images_per_request: int = 1
    duration_s: float = 10.0  # `run_phase`'s one window (`run_windows` is given its own)
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
        if self.protocol not in PROTOCOLS:
            raise InputError(
                f"protocol: expected one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.protocol != "convserve" and not self.model_name:
            raise InputError(f"--protocol {self.protocol} needs --model NAME")
        if self.protocol != "convserve" and self.rpc != "predict":
            raise InputError(
                f"--protocol {self.protocol} supports only --rpc predict (model inference)"
            )
        if self.protocol in HTTP_PROTOCOLS:
            from convserve.client import bench_http

            try:
                bench_http.base_url(self.target, self.tls)
            except InputError as exc:
                raise InputError(f"target: {exc}") from None
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
        if self.oip_input is not None and self.protocol not in ("oip", "oip-http"):
            given = self.oip_input.given_as.split(" ")[0] or "an OIP input"
            raise InputError(f"{given} applies only to an oip or oip-http target")


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
    """One process's share of one measurement window: raw samples, so that merging is exact.

    Latency samples and status codes belong to the requests *sent* (open loop:
    scheduled) in the window, each awaited even when it ends after the window,
    so that no slow answer escapes the window it was asked in. `completed`
    counts the successful answers *received* in the window, whenever they were
    sent: the achieved throughput, which an overloaded server keeps at its
    capacity however many requests are offered.
    """

    latencies_s: np.ndarray  # successful requests sent in the window
    codes: dict[str, int]  # status code name -> requests sent in the window (OK included)
    completed: int  # successful answers received in the window
    cpu_s: float
    wall_s: float
    # Successful requests in the window per replica name (the server's trailing
    # ``convserve-replica`` metadata); empty when the server sends none.
    replicas: dict[str, int] = field(default_factory=dict)
    # Open loop: requests scheduled in the window, and how many of them had gone
    # out by the window's end (fewer when the generator fell behind its schedule).
    scheduled: int | None = None
    sent_by_end: int | None = None


def rounded_ms(seconds: float) -> float | None:
    """Seconds as milliseconds rounded to the microsecond; None for NaN (nothing measured)."""
    return None if math.isnan(seconds) else round(seconds * 1000.0, 3)


@dataclass
class PhaseResult:
    """A phase's measured time: one window, or several pooled (see `combine`)."""

    phase: Phase
    duration_s: float  # measured time: the window(s), warm-up excluded
    images_per_request: int
    latencies_s: np.ndarray
    codes: dict[str, int]
    completed: int  # successful answers received within the measured time
    cpu_s: list[float]  # per process
    wall_s: list[float]
    replicas: dict[str, int] = field(default_factory=dict)
    scheduled: int | None = None
    sent_by_end: int | None = None

    @property
    def ok(self) -> int:
        """Successful requests among those sent in the measured time (the latency samples)."""
        return self.codes.get("OK", 0)

    @property
    def errors(self) -> dict[str, int]:
        return {code: n for code, n in sorted(self.codes.items()) if code != "OK"}

    @property
    def requests_per_s(self) -> float:
        """Achieved throughput: successful answers received per second of measured time."""
        return self.completed / self.duration_s

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
        return {
            "mode": "closed" if self.phase.concurrency is not None else "open",
            "concurrency": self.phase.concurrency,
            "rate": self.phase.rate,
            "duration_s": round(self.duration_s, 6),
            "requests_ok": self.ok,
            "completed_ok": self.completed,
            "errors": self.errors,
            "requests_per_s": round(self.requests_per_s, 3),
            "images_per_s": round(self.images_per_s, 3),
            "latency_ms": {
                "p50": rounded_ms(self.percentile_s(50)),
                "p90": rounded_ms(self.percentile_s(90)),
                "p99": rounded_ms(self.percentile_s(99)),
                "max": rounded_ms(self.max_s),
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


def _pool(
    phase: Phase,
    duration_s: float,
    images_per_request: int,
    parts: Sequence[WorkerResult] | Sequence[PhaseResult],
    cpu_s: list[float],
    wall_s: list[float],
) -> PhaseResult:
    """Samples and counts of `parts` pooled (no averaging of percentiles)."""
    codes: Counter[str] = Counter()
    replicas: Counter[str] = Counter()
    for part in parts:
        codes.update(part.codes)
        replicas.update(part.replicas)
    latencies = [p.latencies_s for p in parts if p.latencies_s.size]
    open_loop = all(p.scheduled is not None for p in parts)
    return PhaseResult(
        phase=phase,
        duration_s=duration_s,
        images_per_request=images_per_request,
        latencies_s=np.sort(np.concatenate(latencies)) if latencies else np.zeros(0),
        codes=dict(codes),
        completed=sum(p.completed for p in parts),
        cpu_s=cpu_s,
        wall_s=wall_s,
        replicas=dict(replicas),
        scheduled=sum(p.scheduled or 0 for p in parts) if open_loop else None,
        sent_by_end=sum(p.sent_by_end or 0 for p in parts) if open_loop else None,
    )


def merge(
    phase: Phase, duration_s: float, images_per_request: int, parts: Sequence[WorkerResult]
) -> PhaseResult:
    """One window: every process's share of it, with CPU and wall time per process."""
    return _pool(
        phase,
        duration_s,
        images_per_request,
        parts,
        cpu_s=[p.cpu_s for p in parts],
        wall_s=[p.wall_s for p in parts],
    )


def combine(results: Sequence[PhaseResult]) -> PhaseResult:
    """Several windows of one phase as one: samples pooled, times added up per process."""
    if not results:
        raise ValueError("combine needs at least one result")
    first = results[0]
    return _pool(
        first.phase,
        sum(r.duration_s for r in results),
        first.images_per_request,
        results,
        cpu_s=[sum(cs) for cs in zip(*(r.cpu_s for r in results), strict=True)],
        wall_s=[sum(ws) for ws in zip(*(r.wall_s for r in results), strict=True)],
    )


# --- One worker: an asyncio loop in one process --------------------------------


# What a sender returns: the status, and who answered: a replica name, None
# (not named), or the stream whose replica is known once the stream has ended.
Answer = tuple[grpc.StatusCode, "str | _Stream | None"]


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


@dataclass(frozen=True)
class WindowPlan:
    """How a phase is measured: one continuous load, and after the warm-up up to
    `max_windows` consecutive windows of `window_s` seconds cut out of it."""

    window_s: float
    max_windows: int = 1

    def __post_init__(self) -> None:
        check_windows(self.window_s, self.max_windows, "window", "windows")


def check_windows(window_s: float, max_windows: int, window_name: str, count_name: str) -> None:
    """InputError naming `window_name` or `count_name` (e.g. the flags they came from)
    unless windows of `window_s` > 0 seconds, at least one of them."""
    if not window_s > 0:
        raise InputError(f"{window_name}: expected seconds > 0, got {window_s}")
    if max_windows < 1:
        raise InputError(f"{count_name}: expected at least 1, got {max_windows}")


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


# --- Running phases across processes ----------------------------------------------


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
