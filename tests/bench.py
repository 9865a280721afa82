"""`make bench`: the model's in-process limit, then what the server delivers.

1. Loads the served SavedModel in this process and measures images/s of its
   `serving_default` signature at several batch sizes, converted to LiteRT as
   the server runs it (one interpreter using every CPU, or one single-threaded
   interpreter per CPU side by side) and in TensorFlow: LiteRT's best is the
   limit.
2. Starts `convserve-server` as a subprocess and drives it with
   `convserve bench` (the project's load generator): 1-image requests at
   concurrency 1, 16 and 64, then 32-image requests, each a unary call; then
   1-image requests at concurrency 64 as messages on 4 PredictStream streams.
3. Drives a server that does no work (`bench_noop_server.py`, the same
   grpc.aio stack) the same way: the ceiling Python gRPC and the load
   generator allow on this machine, whatever the model costs.
4. Prints the throughput table; every ratio is taken within this one run,
   because the machine is shared and absolute figures move from run to run.
5. Prints where the servers' CPU went, per request, in each phase: the event
   loop (the main thread), gRPC's own threads, other threads, and the model
   worker processes, read from /proc while the phase runs. Python gRPC costs
   more per request at a low request rate than at a high one (the loop sleeps
   and wakes for each), so the no-op server is also driven at convserve's
   achieved rate of each phase (open loop): the fair measure of what
   convserve's own code adds.

    python tests/bench.py [--model-base-path DIR] [--duration-s 10] [--protocol oip]
                          [--json OUT.json]

Without --model-base-path a model is trained on the sample digits first.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
# (concurrency, images per request, streams; 0: unary calls) of the served phases.
PHASES = ((1, 1, 0), (16, 1, 0), (64, 1, 0), (16, 32, 0), (64, 1, 4))
BATCH_SIZES = (1, 8, 32, 64, 128, 256)


def model_limit(version_dir: Path, seconds_per_size: float) -> dict[str, dict[int, float]]:
    """images/s per batch size, in-process, of every way the server can predict on a CPU.

    "litert": serving_default converted to LiteRT, one call at a time with all
    CPUs; "litert xN": N interpreters of one thread each, called at the same
    time from N threads (as the server's N worker processes run them);
    "tensorflow": the SavedModel's serving_default signature itself.
    """
    from convserve.server import models

    cpus = os.cpu_count() or 1
    model = models.load_model(
        "mnist", 1, version_dir, "/CPU:0", engine="litert", engine_threads=cpus
    )
    parallel = models.load_model(
        "mnist", 1, version_dir, "/CPU:0", engine="litert", engine_threads=1, engine_copies=cpus
    )
    if model.engine.name != "litert" or parallel.engine.name != "litert":
        raise SystemExit("the model did not convert to LiteRT; see the warning above")
    pool = concurrent.futures.ThreadPoolExecutor(cpus)

    def side_by_side(images: np.ndarray) -> None:
        # Each thread takes its own interpreter; LiteRT releases the GIL while it computes.
        for done in [pool.submit(parallel.predict, images) for _ in range(cpus)]:
            done.result()

    engines: dict[str, tuple[Callable[[np.ndarray], object], int]] = {
        "litert": (model.predict, 1),
        f"litert x{cpus}": (side_by_side, cpus),
        "tensorflow": (model.predict_tensorflow, 1),
    }
    rng = np.random.default_rng(0)
    rates: dict[str, dict[int, float]] = {}
    for engine, (predict, calls) in engines.items():
        rates[engine] = {}
        for size in BATCH_SIZES:
            images = rng.random((size, 28, 28, 1), dtype=np.float32)
            predict(images)  # the first call at a size traces or plans
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds_per_size:
                predict(images)
                count += size * calls
            rates[engine][size] = count / (time.perf_counter() - start)
            print(f"  in-process {engine:<10} batch {size:>3}: "
                  f"{rates[engine][size]:>9,.0f} images/s", flush=True)  # fmt: skip
    pool.shutdown()
    return rates


def this_checkout() -> dict[str, str]:
    """The environment for a subprocess that runs this checkout's code, whichever
    checkout the virtual environment was installed from."""
    roots = (str(ROOT / d) for d in ("server", "client", "proto", "trainer"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(roots)}


@dataclass(frozen=True)
class Ports:
    """The ports a started server announced."""

    grpc: int
    rest: int | None  # None: no HTTP server (--rest-port 0, or the no-op server)


# The start-up line, e.g. "convserve-server listening on 0.0.0.0:8500 metrics on :8502
# rest on :8501" (the no-op server's is "listening on 127.0.0.1:PORT"); read once complete.
LISTENING = re.compile(r"listening on \S+:(\d+)([^\n]*)\n")
REST_PORT = re.compile(r"\brest on :(\d+)")


def listening_ports(log: str) -> Ports | None:
    """The ports of the start-up line in `log`, or None while it has not been written."""
    found = LISTENING.search(log)
    if found is None:
        return None
    rest = REST_PORT.search(found.group(2))
    # "rest on :0" would be a server without an HTTP server, as --rest-port 0 asks.
    return Ports(int(found.group(1)), (int(rest.group(1)) or None) if rest else None)


def start_server(command: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], Ports]:
    log = log_path.open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=this_checkout())
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ports = listening_ports(log_path.read_text(errors="replace"))
        if ports is not None:
            return server, ports
        if server.poll() is not None:
            break
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"the server did not start; see {log_path}")


WARMUP_S = 2.0
# CPU is read this long after the measured window starts and before it ends: the load
# generator's own start-up (imports, metadata calls) shifts its window by less.
CPU_MARGIN_S = 1.0
CPU_PARTS = ("loop", "grpc", "threads", "workers")
# Threads gRPC's C core starts (Linux thread names); every other thread but the main one
# is the server's own (its pools, the metrics HTTP server, TensorFlow's).
GRPC_THREADS = ("grpc_", "event_engine", "lifeguard", "default-executo", "resolver-execu")


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of process `pid`, split: its main thread (the event loop),
    gRPC's threads, its other threads, and its child processes (the model workers)."""
    process = psutil.Process(pid)
    parts = dict.fromkeys(CPU_PARTS, 0.0)
    for thread in process.threads():
        try:
            name = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
        used = thread.user_time + thread.system_time
        if thread.id == pid:
            parts["loop"] += used
        elif name.startswith(GRPC_THREADS):
            parts["grpc"] += used
        else:
            parts["threads"] += used
    for child in process.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        parts["workers"] += times.user + times.system
    return parts


def run_bench(port: int, pid: int, load: list[str], duration_s: float, protocol: str) -> dict:
    """One `convserve bench` phase against the server `pid` listening on `port`; its figures
    with ``server_cpu_us``: the server's CPU microseconds per request, by part."""
    how = ["--protocol", "oip", "--model", "mnist"] if protocol == "oip" else []
    command = [sys.executable, "-m", "convserve.client", "--target", f"127.0.0.1:{port}",
               "--json", "bench", *how, *load, "--duration-s", str(duration_s),
               "--warmup-s", str(WARMUP_S), "--no-progress"]  # fmt: skip
    started = time.monotonic()
    bench = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=this_checkout()
    )
    time.sleep(max(0.0, started + WARMUP_S + CPU_MARGIN_S - time.monotonic()))
    before, since = cpu_seconds(pid), time.monotonic()
    time.sleep(max(0.1, started + WARMUP_S + duration_s - CPU_MARGIN_S - time.monotonic()))
    after, until = cpu_seconds(pid), time.monotonic()
    out, err = bench.communicate()
    if not out.strip():
        raise SystemExit(f"convserve bench failed: {err}")
    phase = json.loads(out)["phases"][0]
    rate = phase["requests_per_s"]
    phase["server_cpu_us"] = {
        part: 1e6 * (after[part] - before[part]) / (until - since) / rate if rate else math.nan
        for part in CPU_PARTS
    }
    return phase


def label(concurrency: int, images: int, streams: int) -> str:
    how = f", {streams} streams" if streams else ""
    return f"{images} img x conc {concurrency}{how}"


def closed_loop(concurrency: int, images: int, streams: int) -> list[str]:
    return ["--concurrency", str(concurrency), "--images-per-request", str(images),
            "--streams", str(streams)]  # fmt: skip


def drive(
    command: list[str],
    log_path: Path,
    duration_s: float,
    protocol: str,
    phases: tuple[tuple[int, int, int], ...],
    rates: list[float] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Start a server, run every phase of `phases` against it, stop it.

    With `rates` (requests/s per phase), each phase is also run open loop at that
    rate; returns (closed-loop phases, open-loop phases).
    """
    server, ports = start_server(command, log_path)
    closed, opened = [], []
    try:
        for n, (concurrency, images, streams) in enumerate(phases):
            phase = run_bench(ports.grpc, server.pid, closed_loop(concurrency, images, streams),
                              duration_s, protocol)  # fmt: skip
            closed.append(phase)
            own = sum(phase["server_cpu_us"][p] for p in ("loop", "grpc", "threads"))
            print(f"  {label(concurrency, images, streams)}: "
                  f"{phase['requests_per_s']:>8,.0f} req/s, server {own:,.0f} us/request "
                  "besides the model", flush=True)  # fmt: skip
            if rates is not None:
                load = ["--rate", f"{rates[n]:.1f}", "--images-per-request", str(images),
                        "--streams", str(streams)]  # fmt: skip
                paced = run_bench(ports.grpc, server.pid, load, duration_s, protocol)
                opened.append(paced)
                own = sum(paced["server_cpu_us"][p] for p in ("loop", "grpc", "threads"))
                print(f"    at {rates[n]:,.0f} req/s: {own:,.0f} us/request", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return closed, opened


def print_table(table: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table):
        cells = zip(row, widths, strict=True)
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value is not None and base else "-"


def own_us(phase: dict) -> float:
    """The server's CPU per request besides the model workers, microseconds."""
    return float(sum(phase["server_cpu_us"][p] for p in ("loop", "grpc", "threads")))


def cpu_table(
    phases: tuple[tuple[int, int, int], ...], rows: list[dict], ceiling: list[dict],
    paced: list[dict],
) -> list[tuple[str, ...]]:  # fmt: skip
    header = ("load", "loop", "gRPC", "threads", "workers", "own", "no-op own",
              "no-op at same rate", "x no-op")  # fmt: skip
    table: list[tuple[str, ...]] = [header]
    for (concurrency, images, streams), p, c, q in zip(phases, rows, ceiling, paced, strict=True):
        cpu = p["server_cpu_us"]
        table.append((
            label(concurrency, images, streams),
            *(f"{cpu[part]:,.0f}" for part in CPU_PARTS),
            f"{own_us(p):,.0f}",
            f"{own_us(c):,.0f}",
            f"{own_us(q):,.0f} at {q['requests_per_s']:,.0f}/s",
            f"{own_us(p) / own_us(q):.2f}",
        ))  # fmt: skip
    return table


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model-base-path", type=Path)
    parser.add_argument("--duration-s", type=float, default=10.0, help="per served phase")
    parser.add_argument(
        "--protocol",
        choices=("convserve", "oip"),
        default="convserve",
        help="the protocol of the served phases (oip: no stream phase)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    phases = PHASES if args.protocol == "convserve" else tuple(p for p in PHASES if not p[2])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    with tempfile.TemporaryDirectory() as tmp:
        base = args.model_base_path
        if base is None:
            base = Path(tmp) / "mnist"
            print("training a model on the sample digits ...", flush=True)
            subprocess.run([str(BIN / "convserve-train"), "--dataset", "sample", "--quiet",
                            "--model-base-path", str(base)], check=True)  # fmt: skip
        version = max(int(p.name) for p in base.iterdir() if p.name.isdigit())
        print(f"1. in-process limit of {base}/{version}:", flush=True)
        rates = model_limit(base / str(version), seconds_per_size=3.0)
        # The limit: LiteRT's best, over batch sizes and both ways of using the CPUs.
        limit, best_engine, best = max(
            (rate, engine, size)
            for engine, by_size in rates.items()
            if engine.startswith("litert")
            for size, rate in by_size.items()
        )
        tf_best = max(rates["tensorflow"], key=lambda s: rates["tensorflow"][s])
        tf_limit = rates["tensorflow"][tf_best]

        print("2. served, through convserve bench:", flush=True)
        # No HTTP server: these phases are gRPC's (bench_protocols.py compares HTTP).
        serve = [sys.executable, "-m", "convserve.server", "--model-base-path", str(base),
                 "--port", "0", "--metrics-port", "0", "--rest-port", "0"]  # fmt: skip
        rows, _ = drive(serve, Path(tmp) / "server.log", args.duration_s, args.protocol, phases)
        print("3. the same load against a server that does no work, then at convserve's rates:",
              flush=True)  # fmt: skip
        noop = [sys.executable, str(ROOT / "tests" / "bench_noop_server.py")]
        ceiling, paced = drive(noop, Path(tmp) / "noop.log", args.duration_s, args.protocol,
                               phases, rates=[r["requests_per_s"] for r in rows])  # fmt: skip

    header = ("load", "req/s", "images/s", "p50 ms", "p99 ms", "of limit", "no-op req/s",
              "of no-op", "p50 x no-op", "errors", "gen CPU")  # fmt: skip
    table = [header]
    limit_row = f"in-process {best_engine}, batch {best}"
    table.append((limit_row, "", f"{limit:,.0f}", "", "", "100%", "", "", "", "", ""))
    table.append((f"in-process TensorFlow, batch {tf_best}", "", f"{tf_limit:,.0f}", "", "",
                  f"{100 * tf_limit / limit:.0f}%", "", "", "", "", ""))  # fmt: skip
    for (concurrency, images, streams), p, c in zip(phases, rows, ceiling, strict=True):
        lat = p["latency_ms"]
        table.append((
            label(concurrency, images, streams),
            f"{p['requests_per_s']:,.0f}",
            f"{p['images_per_s']:,.0f}",
            f"{lat['p50']:.2f}" if lat["p50"] is not None else "-",
            f"{lat['p99']:.2f}" if lat["p99"] is not None else "-",
            f"{100 * p['images_per_s'] / limit:.0f}%",
            f"{c['requests_per_s']:,.0f}",
            f"{100 * p['requests_per_s'] / c['requests_per_s']:.0f}%",
            ratio(lat["p50"], c["latency_ms"]["p50"]),
            str(sum(p["errors"].values())),
            f"{p['generator_cpu_cores']:.2f}",
        ))  # fmt: skip
    print()
    print_table(table)
    print(f"\n{os.cpu_count()} CPUs shared by server and load generator; "
          "ratios are within this run.\n"
          "limit: LiteRT in-process at its best batch size, the better of one interpreter\n"
          "with every CPU and one single-threaded interpreter per CPU side by side (what\n"
          "the server's worker processes run); the SavedModel in TensorFlow reaches\n"
          f"{tf_limit:,.0f} images/s.\n"
          "no-op: the same load against a grpc.aio server that does no work;\n"
          "p50 x no-op: the median latency over the no-op's at the same load.\n"
          "gen CPU: the load generator's own CPU time / wall time, in cores.")  # fmt: skip
    print(f"\nServer CPU per request, microseconds ({args.protocol}):\n")
    print_table(cpu_table(phases, rows, ceiling, paced))
    print(
        "\nloop: the main thread (asyncio and grpc.aio); gRPC: gRPC's C-core threads;\n"
        "threads: the server's other threads; workers: the model worker processes.\n"
        "own: loop + gRPC + threads, what serving costs besides the model.\n"
        "no-op: the no-op server's own at its own rate, and at convserve's rate\n"
        "(open loop); x no-op: convserve's own over the no-op's at the same rate."
    )
    if args.json:
        args.json.write_text(json.dumps({"limit_images_per_s": limit, "best_batch": best,
                                         "best_engine": best_engine,
                                         "tensorflow_limit_images_per_s": tf_limit,
                                         "in_process": rates, "phases": PHASES, "served": rows,
                                         "noop": ceiling, "noop_same_rate": paced,
                                         "protocol": args.protocol},
                                        indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
