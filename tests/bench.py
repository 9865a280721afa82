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
4. Prints one table; every ratio is taken within this one run, because the
   machine is shared and absolute figures move from run to run.

    python tests/bench.py [--model-base-path DIR] [--duration-s 10] [--json OUT.json]

Without --model-base-path a model is trained on the sample digits first.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

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
    if model.litert is None:
        raise SystemExit("the model did not convert to LiteRT; see the warning above")
    parallel = models.LiteRtEngine(model.litert.flatbuffer, threads=1, copies=cpus)
    pool = concurrent.futures.ThreadPoolExecutor(cpus)

    def side_by_side(images: np.ndarray) -> None:
        # Each thread takes its own interpreter; LiteRT releases the GIL while it computes.
        for done in [pool.submit(parallel, images) for _ in range(cpus)]:
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


def start_server(command: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    log = log_path.open("wb")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("client", "proto"))}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        found = re.search(r"listening on \S+:(\d+)", log_path.read_text(errors="replace"))
        if found:
            return server, int(found.group(1))
        if server.poll() is not None:
            break
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"the server did not start; see {log_path}")


def run_bench(port: int, concurrency: int, images: int, streams: int, duration_s: float) -> dict:
    out = subprocess.run(
        [str(BIN / "convserve"), "--target", f"127.0.0.1:{port}", "--json", "bench",
         "--concurrency", str(concurrency), "--images-per-request", str(images),
         "--streams", str(streams), "--duration-s", str(duration_s), "--warmup-s", "2",
         "--no-progress"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if not out.stdout.strip():
        raise SystemExit(f"convserve bench failed: {out.stderr}")
    return json.loads(out.stdout)["phases"][0]


def label(concurrency: int, images: int, streams: int) -> str:
    how = f", {streams} streams" if streams else ""
    return f"{images} img x conc {concurrency}{how}"


def drive(command: list[str], log_path: Path, duration_s: float) -> list[dict]:
    """Start a server, run every phase of PHASES against it, stop it."""
    server, port = start_server(command, log_path)
    phases = []
    try:
        for concurrency, images, streams in PHASES:
            phase = run_bench(port, concurrency, images, streams, duration_s)
            phases.append(phase)
            print(f"  {label(concurrency, images, streams)}: "
                  f"{phase['requests_per_s']:>8,.0f} req/s", flush=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=60)
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model-base-path", type=Path)
    parser.add_argument("--duration-s", type=float, default=10.0, help="per served phase")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
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
        serve = [str(BIN / "convserve-server"), "--model-base-path", str(base), "--port", "0",
                 "--metrics-port", "0"]  # fmt: skip
        rows = drive(serve, Path(tmp) / "server.log", args.duration_s)
        print("3. the same load against a server that does no work:", flush=True)
        noop = [sys.executable, str(ROOT / "tests" / "bench_noop_server.py")]
        ceiling = drive(noop, Path(tmp) / "noop.log", args.duration_s)

    header = ("load", "req/s", "images/s", "p50 ms", "p99 ms", "of limit", "no-op req/s",
              "of no-op", "errors", "gen CPU")  # fmt: skip
    table = [header]
    limit_row = f"in-process {best_engine}, batch {best}"
    table.append((limit_row, "", f"{limit:,.0f}", "", "", "100%", "", "", "", ""))
    table.append((f"in-process TensorFlow, batch {tf_best}", "", f"{tf_limit:,.0f}", "", "",
                  f"{100 * tf_limit / limit:.0f}%", "", "", "", ""))  # fmt: skip
    for (concurrency, images, streams), p, c in zip(PHASES, rows, ceiling, strict=True):
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
            str(sum(p["errors"].values())),
            f"{p['generator_cpu_cores']:.2f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for n, row in enumerate(table):
        cells = zip(row, widths, strict=True)
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{os.cpu_count()} CPUs shared by server and load generator; "
          "ratios are within this run.\n"
          "limit: LiteRT in-process at its best batch size, the better of one interpreter\n"
          "with every CPU and one single-threaded interpreter per CPU side by side (what\n"
          "the server's worker processes run); the SavedModel in TensorFlow reaches\n"
          f"{tf_limit:,.0f} images/s.\n"
          "no-op: the same load against a grpc.aio server that does no work.\n"
          "gen CPU: the load generator's own CPU time / wall time, in cores.")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"limit_images_per_s": limit, "best_batch": best,
                                         "best_engine": best_engine,
                                         "tensorflow_limit_images_per_s": tf_limit,
                                         "in_process": rates, "phases": PHASES, "served": rows,
                                         "noop": ceiling},
                                        indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
