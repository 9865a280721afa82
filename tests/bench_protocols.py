"""The same predictions through each protocol, against one server: what each adapter costs.

Starts `convserve-server` (gRPC and HTTP), then drives it with one load
generator that sends pre-serialized requests of each protocol in turn: over
gRPC, Predict of convserve.v1, Open Inference Protocol ModelInfer and TF
Serving Predict; over HTTP, TF Serving's REST predict (JSON, the
``predict_uint8`` signature) and KServe v2 infer with the binary tensor data
extension. The same uint8 images go through all five, round after round so
that all see the same machine. It prints each protocol's requests/s,
images/s, latency and the server's CPU per request (see `bench.cpu_seconds`)
with their ratios to convserve.v1's, then how the HTTP protocols fare against
their targets. The generator does the same work for every protocol: it
neither builds nor parses messages while it runs (HTTP: one aiohttp session,
one connection per user, only the status read).

    python tests/bench_protocols.py --model-base-path DIR [--duration-s 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import aiohttp
import grpc
import numpy as np
from bench import CPU_PARTS, ROOT, Ports, cpu_seconds, print_table, start_server
from interop.three_protocols import (
    Images,
    convserve_predict_request,
    oip_predict_request,
    tfserving_predict_request,
)

from convserve.client import bench_http

MODEL = "mnist"
# gRPC: the method and the request of a batch of images.
METHODS: dict[str, tuple[str, Callable[[Images], object]]] = {
    "convserve.v1": ("/convserve.v1.ConvServe/Predict", convserve_predict_request),
    "oip": ("/inference.GRPCInferenceService/ModelInfer", oip_predict_request),
    "tfserving": ("/tensorflow.serving.PredictionService/Predict", tfserving_predict_request),
}
HTTP_PROTOCOLS = ("tfserving-rest", "oip-http")
PROTOCOLS = (*METHODS, *HTTP_PROTOCOLS)
# (concurrency, images per request) of the loads compared.
LOADS = ((16, 1), (64, 1), (16, 32))
# What the HTTP protocols should reach: (protocol, load, figure, share of convserve.v1's).
TARGETS = (
    ("tfserving-rest", (16, 1), "requests_per_s", 0.80),
    ("oip-http", (16, 32), "images_per_s", 0.90),
)
TIMEOUT_S = 10.0

# Sends one pre-serialized request; None when it succeeded, else what went wrong.
Send = Callable[[bytes], Awaitable[str | None]]
Sender = AbstractAsyncContextManager[Send]


@asynccontextmanager
async def grpc_sender(target: str, method: str) -> AsyncIterator[Send]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out: nothing parsed

        async def send(request: bytes) -> str | None:
            try:
                await call(request, timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                return str(exc.code())
            return None

        yield send


@asynccontextmanager
async def http_sender(url: str, headers: dict[str, str], concurrency: int) -> AsyncIterator[Send]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
    ) as session:

        async def send(body: bytes) -> str | None:
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()  # to the end, so that the connection is reused
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                return repr(exc)
            return None if status == 200 else f"HTTP {status}"

        yield send


async def drive(
    protocol: str, sender: Sender, requests: list[bytes], concurrency: int, seconds: float
) -> tuple[int, list[float]]:
    """Closed loop for `seconds` after a one-second warm-up: (OK answers, latencies in s)."""
    async with sender as send:
        latencies: list[float] = []
        failures: list[str] = []
        start = time.perf_counter()
        measure_from, end = start + 1.0, start + 1.0 + seconds

        async def user(n: int) -> None:
            i = n
            while (sent := time.perf_counter()) < end:
                failure = await send(requests[i % len(requests)])
                if failure is not None:
                    failures.append(failure)
                    continue
                if sent >= measure_from:
                    latencies.append(time.perf_counter() - sent)
                i += concurrency

        await asyncio.gather(*(user(n) for n in range(concurrency)))
    if failures:
        raise SystemExit(f"{protocol}: {len(failures)} requests failed, e.g. {failures[0]}")
    return len(latencies), latencies


def sender_and_requests(
    protocol: str, host: str, ports: Ports, batches: list[np.ndarray], concurrency: int
) -> tuple[Sender, list[bytes]]:
    """How `protocol` sends, and its pre-serialized requests of `batches` (uint8 [n,28,28])."""
    if protocol in METHODS:
        method, build = METHODS[protocol]
        requests = [build(Images.of(b)).SerializeToString() for b in batches]  # type: ignore[attr-defined]
        return grpc_sender(f"{host}:{ports.grpc}", method), requests
    base = f"http://{host}:{ports.rest}"
    if protocol == "tfserving-rest":
        bodies = [bench_http.rest_body("predict_uint8", b) for b in batches]
        headers = {"Content-Type": "application/json"}
        return http_sender(f"{base}/v1/models/{MODEL}:predict", headers, concurrency), bodies
    requests_and_headers = [bench_http.oip_http_body("images", "UINT8", b) for b in batches]
    headers = requests_and_headers[0][0]  # one shape: the same headers for every body
    bodies = [body for _, body in requests_and_headers]
    return http_sender(f"{base}/v2/models/{MODEL}/infer", headers, concurrency), bodies


def measure(
    host: str, ports: Ports, pid: int, protocol: str, images: np.ndarray,
    load: tuple[int, int], seconds: float,
) -> dict[str, float]:  # fmt: skip
    concurrency, per_request = load
    batches = [
        images[i : i + per_request] for i in range(0, len(images) - per_request + 1, per_request)
    ]
    before, since = {}, 0.0

    async def run() -> tuple[int, list[float]]:
        nonlocal before, since
        sender, requests = sender_and_requests(protocol, host, ports, batches, concurrency)
        task = asyncio.ensure_future(drive(protocol, sender, requests, concurrency, seconds))
        await asyncio.sleep(1.0)  # the warm-up
        before, since = cpu_seconds(pid), time.monotonic()
        return await task

    count, latencies = asyncio.run(run())
    after, until = cpu_seconds(pid), time.monotonic()
    rate = count / seconds
    own = sum(after[p] - before[p] for p in CPU_PARTS if p != "workers")
    per_request_us = 1e6 / (until - since) / rate
    latencies.sort()
    return {
        **{f"{p}_us": (after[p] - before[p]) * per_request_us for p in CPU_PARTS},
        "requests_per_s": rate,
        "images_per_s": rate * per_request,
        "p50_ms": 1e3 * latencies[len(latencies) // 2],
        "p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))],
        "own_us": 1e6 * own / (until - since) / rate,
    }


def json_costs_us(images: np.ndarray, per_request: int, repeat: int = 200) -> dict[str, float]:
    """CPU microseconds per request of the JSON work of a TF Serving REST predict, done
    in this process with the server's own functions: parsing the body and converting
    its images, and writing the answer."""
    import orjson

    from convserve.server import types
    from convserve.server.protocols import tfserving_rest_convert as convert

    body = bench_http.rest_body("predict_uint8", images[:per_request])
    answer = types.PredictOutput("mnist", 1, np.full((per_request, 10), 0.1, np.float32))

    def timed(work: Callable[[], object]) -> float:
        start = time.process_time()
        for _ in range(repeat):
            work()
        return 1e6 * (time.process_time() - start) / repeat

    return {
        "parse": timed(lambda: convert.predict_request(orjson.loads(body))),
        "answer": timed(lambda: convert.predict_response(answer, True)),
    }


def print_cpu_parts(
    results: dict[tuple[tuple[int, int], str], list[dict[str, float]]], rounds: int
) -> None:
    """Where each protocol's server CPU per request goes, for the loads of the targets."""
    table = [("load", "protocol", *(f"{p} us" for p in CPU_PARTS), "JSON us", "rest of loop us")]
    pool = np.random.default_rng(1).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    for load in sorted({load for _, load, _, _ in TARGETS}):
        json_us = json_costs_us(pool, load[1])
        for protocol in PROTOCOLS:
            parts = {p: statistics.median(r[f"{p}_us"] for r in results[(load, protocol)])
                     for p in CPU_PARTS}  # fmt: skip
            rest = protocol == "tfserving-rest"
            spent = json_us["parse"] + json_us["answer"] if rest else 0.0
            table.append((
                f"{load[1]} img x conc {load[0]}", protocol,
                *(f"{parts[p]:,.0f}" for p in CPU_PARTS),
                f"{spent:,.0f}" if rest else "-",
                f"{parts['loop'] - spent:,.0f}",
            ))  # fmt: skip
    print("Where the server's CPU per request goes (medians of", rounds, "rounds): loop = the "
          "event loop's thread (HTTP parsing and answers with aiohttp, protobuf conversion, "
          "batching), grpc = gRPC's C-core threads (HTTP/2), threads = conversion threads, "
          "workers = the model; JSON = TF Serving REST's parse and convert plus its answer, "
          "measured in this process with the server's functions (part of loop).\n")  # fmt: skip
    print_table(table)
    print()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model-base-path", type=Path, required=True)
    parser.add_argument("--duration-s", type=float, default=6.0, help="per load and protocol")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    args = parser.parse_args()
    pool = np.random.default_rng(0).integers(0, 256, (256, 28, 28), dtype=np.uint8)
    results: dict[tuple[tuple[int, int], str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        serve = [sys.executable, "-m", "convserve.server", "--model-base-path",
                 str(args.model_base_path), "--port", "0", "--metrics-port", "0",
                 "--rest-port", "-1"]  # fmt: skip
        server, ports = start_server(serve, Path(tmp) / "server.log")
        try:
            if ports.rest is None:
                raise SystemExit("the server announced no REST port (... rest on :PORT)")
            for n in range(args.rounds):
                for load in LOADS:
                    for protocol in PROTOCOLS:
                        figures = measure("127.0.0.1", ports, server.pid, protocol, pool, load,
                                          args.duration_s)  # fmt: skip
                        results.setdefault((load, protocol), []).append(figures)
                        print(f"  round {n + 1}, {load[1]} img x conc {load[0]}, {protocol}: "
                              f"{figures['requests_per_s']:,.0f} req/s, "
                              f"{figures['own_us']:,.0f} us/request", flush=True)  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=60)

    def median(load: tuple[int, int], protocol: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(load, protocol)])

    def of_v1(load: tuple[int, int], protocol: str, key: str) -> float:
        return median(load, protocol, key) / median(load, "convserve.v1", key)

    table = [("load", "protocol", "req/s", "images/s", "p50 ms", "p99 ms", "own us/req",
              "req/s vs v1", "own vs v1")]  # fmt: skip
    for load in LOADS:
        for protocol in PROTOCOLS:
            table.append((
                f"{load[1]} img x conc {load[0]}", protocol,
                f"{median(load, protocol, 'requests_per_s'):,.0f}",
                f"{median(load, protocol, 'images_per_s'):,.0f}",
                f"{median(load, protocol, 'p50_ms'):.2f}",
                f"{median(load, protocol, 'p99_ms'):.2f}",
                f"{median(load, protocol, 'own_us'):,.0f}",
                f"{of_v1(load, protocol, 'requests_per_s'):.2f}",
                f"{of_v1(load, protocol, 'own_us'):.2f}",
            ))  # fmt: skip
    print()
    print_table(table)
    print(f"\nmedians of {args.rounds} interleaved rounds on one server ({ROOT.name}); own: the "
          "server's CPU per request besides the model workers.\n")  # fmt: skip
    print_cpu_parts(results, args.rounds)
    for protocol, load, key, target in TARGETS:
        share = of_v1(load, protocol, key)
        figure = key.removesuffix("_per_s") + "/s"
        verdict = "met" if share >= target else "NOT met"
        print(f"{protocol}, {load[1]} img x conc {load[0]}: {share:.2f} of convserve.v1's "
              f"{figure} (target >= {target:.2f}): {verdict}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
