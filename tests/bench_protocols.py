"""The same predictions through each protocol, against one server: what each adapter costs.

Starts `convserve-server`, then drives it with one load generator that sends
pre-serialized Predict requests of convserve.v1, Open Inference Protocol
ModelInfer and TF Serving Predict in turn (the same uint8 images, round after
round so that all three see the same machine), and prints each protocol's
requests/s, latency and the server's CPU per request (see `bench.cpu_seconds`)
with its ratio to convserve.v1's. The generator does the same work for every
protocol: it neither builds nor parses messages while it runs.

    python tests/bench_protocols.py --model-base-path DIR [--duration-s 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from bench import CPU_PARTS, ROOT, cpu_seconds, print_table, start_server
from interop.three_protocols import (
    Images,
    convserve_predict_request,
    oip_predict_request,
    tfserving_predict_request,
)

METHODS: dict[str, tuple[str, Callable[[Images], object]]] = {
    "convserve.v1": ("/convserve.v1.ConvServe/Predict", convserve_predict_request),
    "oip": ("/inference.GRPCInferenceService/ModelInfer", oip_predict_request),
    "tfserving": ("/tensorflow.serving.PredictionService/Predict", tfserving_predict_request),
}
# (concurrency, images per request) of the loads compared.
LOADS = ((16, 1), (64, 1), (16, 32))


async def drive(
    target: str, method: str, requests: list[bytes], concurrency: int, seconds: float
) -> tuple[int, list[float]]:
    """Closed loop for `seconds` after a one-second warm-up: (OK answers, latencies in s)."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out: nothing parsed
        latencies: list[float] = []
        failures: list[grpc.StatusCode] = []
        start = time.perf_counter()
        measure_from, end = start + 1.0, start + 1.0 + seconds

        async def user(n: int) -> None:
            i = n
            while (sent := time.perf_counter()) < end:
                try:
                    await call(requests[i % len(requests)], timeout=10.0)
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc.code())
                    continue
                if sent >= measure_from:
                    latencies.append(time.perf_counter() - sent)
                i += concurrency

        await asyncio.gather(*(user(n) for n in range(concurrency)))
    if failures:
        raise SystemExit(f"{method}: {len(failures)} calls failed, e.g. {failures[0]}")
    return len(latencies), latencies


def measure(
    target: str, pid: int, protocol: str, images: np.ndarray, load: tuple[int, int], seconds: float
) -> dict[str, float]:
    concurrency, per_request = load
    method, build = METHODS[protocol]
    requests = []
    for i in range(0, len(images) - per_request + 1, per_request):
        message = build(Images.of(images[i : i + per_request]))
        requests.append(message.SerializeToString())  # type: ignore[attr-defined]
    before, since = {}, 0.0

    async def run() -> tuple[int, list[float]]:
        nonlocal before, since
        task = asyncio.ensure_future(drive(target, method, requests, concurrency, seconds))
        await asyncio.sleep(1.0)  # the warm-up
        before, since = cpu_seconds(pid), time.monotonic()
        return await task

    count, latencies = asyncio.run(run())
    after, until = cpu_seconds(pid), time.monotonic()
    rate = count / seconds
    own = sum(after[p] - before[p] for p in CPU_PARTS if p != "workers")
    latencies.sort()
    return {
        "requests_per_s": rate,
        "p50_ms": 1e3 * latencies[len(latencies) // 2],
        "p99_ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))],
        "own_us": 1e6 * own / (until - since) / rate,
    }


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
                 str(args.model_base_path), "--port", "0", "--metrics-port", "0"]  # fmt: skip
        server, port = start_server(serve, Path(tmp) / "server.log")
        try:
            for n in range(args.rounds):
                for load in LOADS:
                    for protocol in METHODS:
                        figures = measure(f"127.0.0.1:{port}", server.pid, protocol, pool, load,
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

    table = [("load", "protocol", "req/s", "p50 ms", "p99 ms", "own us/req", "req/s vs v1",
              "own vs v1")]  # fmt: skip
    for load in LOADS:
        for protocol in METHODS:
            rate = median(load, protocol, "requests_per_s")
            own = median(load, protocol, "own_us")
            table.append((
                f"{load[1]} img x conc {load[0]}", protocol, f"{rate:,.0f}",
                f"{median(load, protocol, 'p50_ms'):.2f}",
                f"{median(load, protocol, 'p99_ms'):.2f}",
                f"{own:,.0f}",
                f"{rate / median(load, 'convserve.v1', 'requests_per_s'):.2f}",
                f"{own / median(load, 'convserve.v1', 'own_us'):.2f}",
            ))  # fmt: skip
    print()
    print_table(table)
    print(f"\nmedians of {args.rounds} interleaved rounds on one server ({ROOT.name}); own: the "
          "server's CPU per request besides the model workers.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
