"""Reliability figures of a convserve source tree: what expired and stuck work costs.

Starts `python -m convserve.server` from `--source-tree` as a child process
(PYTHONPATH=<tree>/client:<tree>/server:<tree>/trainer:<tree>/proto, cwd=<tree>;
the file the server's runtime is imported from is printed, to show which code
ran) and measures, one phase at a time:

a. CPU after expiry: one expensive request with a 1 s deadline, first a
   Convolve (float64, large kernel at stride 2, so TensorFlow's direct
   convolution runs), then a FitKernel (its admission estimates the FFT cost,
   the fit runs the direct convolution). Once the caller's deadline has
   passed: the server's CPU seconds (its process and its child processes,
   user + system) over the next `--window-s` seconds, and how long the
   server stayed busy.
b. Small requests after a burst: `--burst` expensive Convolve requests at once,
   1 s deadlines; once all have expired, the latency of a small Convolve
   (3x3 input, kernel [[1,-1]]) and of a one-image Predict.
c. Health during a large typed request: the worst latency of back-to-back
   health checks while a ~`--typed-mib` MiB Open Inference Protocol FP32
   `conv2d` request sent in `fp32_contents` (typed, not raw) is decoded.
d. SIGTERM with a stuck model worker: a second server with
   `--grace-period-s`; one model worker process is stopped (SIGSTOP), Predict
   requests (30 s deadlines) are sent until one waits on it, then the server
   gets SIGTERM: the time to exit and the exit code (or "did not exit"
   after `--exit-cap-s`, then SIGKILL).

Every child process is killed at the end, stopped workers included.

    .venv/bin/python tests/bench_reliability.py --source-tree /tmp/before \\
        --model-base-path /tmp/rel/mnist
    .venv/bin/python tests/bench_reliability.py --source-tree . --model-base-path /tmp/rel/mnist \\
        --server-arg=--max-request-cpu-s=600

`--server-arg` (repeatable) passes a flag to both servers, e.g. to admit the
expensive requests under a new cost limit so that their deadlines are what
stops them. Without --model-base-path a model is trained on the sample
digits first (about a minute).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from convserve.client.convert import convolution_options
from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from convserve.v1.tensor_codec import to_tensor

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"convserve-server listening on (\S+):(\d+) metrics on :(\d+)")
HEALTH_METHOD = "/grpc.health.v1.Health/Check"
OIP_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]
# CPU (cores) below which the server counts as idle between phases.
IDLE_CORES = 0.1


# -- requests -------------------------------------------------------------------------


def expensive_convolve(seed: int = 0) -> convserve_pb2.ConvolveRequest:
    """float64 [1024,1024] with a 256x256 kernel at stride 2: 9.7e9 multiply-adds.

    Under the original limit of 2e10 multiply-adds, so admitted there; float64
    runs on TensorFlow's Eigen path, about 8 CPU s on two cores. The kernel is
    larger than the merge limit, so each request runs on its own; the input
    is small enough (8 MiB) that several arrive well within a 1 s deadline.
    """
    rng = np.random.default_rng(seed)
    x = rng.random((1024, 1024))
    k = rng.random((256, 256))
    return convserve_pb2.ConvolveRequest(
        input=to_tensor(x), kernel=to_tensor(k), options=convolution_options(strides=2)
    )


def expensive_fit() -> convserve_pb2.FitKernelRequest:
    """float32 [512,512] inputs, 64x64 kernel: admitted by its FFT estimate (1.4e7), but
    each step runs the direct convolution and its gradient (about 2.5e9 multiply-adds;
    13 s and 4 GB on two cores for the first step)."""
    rng = np.random.default_rng(1)
    x = rng.random((512, 512), dtype=np.float32)
    y = rng.random((449, 449), dtype=np.float32)
    return convserve_pb2.FitKernelRequest(
        inputs=to_tensor(x), targets=to_tensor(y), kernel_shape=[64, 64]
    )


def small_convolve() -> convserve_pb2.ConvolveRequest:
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    return convserve_pb2.ConvolveRequest(
        input=to_tensor(x),
        kernel=to_tensor(np.array([[1, -1]], dtype=np.float32)),
        options=convolution_options(),
    )


def one_digit() -> convserve_pb2.PredictRequest:
    return convserve_pb2.PredictRequest(images=to_tensor(np.zeros((1, 28, 28), np.uint8)))


def typed_conv2d_request(mib: float) -> Any:
    """An OIP conv2d ModelInferRequest of about `mib` MiB in typed fp32_contents."""
    from tritonclient.grpc import service_pb2

    side = int((mib * 1024 * 1024 / 4) ** 0.5)
    request = service_pb2.ModelInferRequest(model_name="conv2d")
    image = request.inputs.add(name="input", datatype="FP32", shape=[side, side])
    image.contents.fp32_contents.extend(np.ones(side * side, np.float32))
    kernel = request.inputs.add(name="kernel", datatype="FP32", shape=[1, 1])
    kernel.contents.fp32_contents.append(1.0)
    return request


# -- the server -----------------------------------------------------------------------


def tree_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    env["CONVSERVE_REST_PORT"] = "0"  # the fixed default port may be taken
    env["PYTHONPATH"] = os.pathsep.join(
        str(tree / d) for d in ("client", "server", "trainer", "proto")
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def runtime_file(tree: Path) -> str:
    """Where the server started from `tree` imports its runtime from."""
    done = subprocess.run(
        [sys.executable, "-c", "import convserve.server.runtime as r; print(r.__file__)"],
        cwd=tree, env=tree_env(tree), capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    stopped: list[int] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process and its live child processes."""
        total = 0.0
        try:
            proc = psutil.Process(self.process.pid)
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
            children = proc.children(recursive=True)
        except psutil.NoSuchProcess:
            return total
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = child.cpu_times()
                total += times.user + times.system
        return total

    def workers(self) -> list[psutil.Process]:
        """The model worker processes (children running convserve.server.workers.child)."""
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if any("workers.child" in part for part in child.cmdline()):
                    found.append(child)
        return found

    def kill_all(self) -> None:
        """SIGKILL the server and every child (stopped ones are continued first)."""
        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(self.process.pid).children(recursive=True)
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def server(tree: Path, model: Path, args: list[str], log_dir: Path, name: str) -> Iterator[Server]:
    log_path = log_dir / f"{name}.log"
    command = [sys.executable, "-m", "convserve.server", "--model-base-path", str(model),
               "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *args]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=tree, env=tree_env(tree), stdout=log, stderr=subprocess.STDOUT
        )
    running: Server | None = None
    try:
        deadline = time.monotonic() + 300
        while running is None:
            found = LISTENING.search(log_path.read_text(errors="replace"))
            if found:
                running = Server(process, int(found.group(2)), log_path)
            elif process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; see {log_path}")
            else:
                time.sleep(0.2)
        yield running
    finally:
        if running is not None:
            running.kill_all()
        elif process.poll() is None:
            process.kill()
            process.wait()


def wait_idle(srv: Server, cap_s: float) -> float:
    """Seconds until the server uses under IDLE_CORES over a 1 s window (cap_s at most)."""
    start = time.monotonic()
    before = srv.cpu_s()
    while time.monotonic() - start < cap_s:
        time.sleep(1.0)
        now = srv.cpu_s()
        if now - before < IDLE_CORES:
            return time.monotonic() - start - 1.0
        before = now
    return float("inf")


class CpuWatch(threading.Thread):
    """From `start` on: the server's CPU seconds over `window_s`, and how long it stayed
    busy (the end of its last half second above IDLE_CORES, once a whole second has
    passed idle; inf if it was still busy `cap_s` after the window)."""

    STEP_S = 0.5

    def __init__(self, srv: Server, start: float, window_s: float, cap_s: float) -> None:
        super().__init__(daemon=True)
        self.srv, self.start_at, self.window_s, self.cap_s = srv, start, window_s, cap_s
        self.burned = float("nan")
        self.busy_s = float("inf")

    def run(self) -> None:
        time.sleep(max(0.0, self.start_at - time.monotonic()))
        first = previous = self.srv.cpu_s()
        elapsed, busy_until = 0.0, 0.0
        while elapsed < self.window_s + self.cap_s:
            elapsed += self.STEP_S
            time.sleep(max(0.0, self.start_at + elapsed - time.monotonic()))
            now = self.srv.cpu_s()
            if now - previous >= IDLE_CORES * self.STEP_S:
                busy_until = elapsed
            previous = now
            if elapsed >= self.window_s and self.burned != self.burned:  # still NaN
                self.burned = now - first
            if elapsed >= self.window_s and elapsed - busy_until >= 1.0:
                self.busy_s = busy_until
                return

    def busy_text(self) -> str:
        if self.busy_s == float("inf"):
            return f"> {self.window_s + self.cap_s:.0f} s (still busy)"
        return f"{self.busy_s:.1f} s"


def call_code(call: Callable[[], Any]) -> tuple[str, float]:
    start = time.monotonic()
    try:
        call()
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
    return code, time.monotonic() - start


# -- phases ---------------------------------------------------------------------------


Row = tuple[str, str]


def cpu_after_expiry(
    srv: Server, channel: grpc.Channel, rpc: str, request: Any, args: argparse.Namespace
) -> list[Row]:
    stub = convserve_pb2_grpc.ConvServeStub(channel)
    method = getattr(stub, rpc)
    sent = time.monotonic()
    watch = CpuWatch(srv, sent + args.deadline_s, args.window_s, args.idle_cap_s)
    watch.start()
    code, _ = call_code(lambda: method(request, timeout=args.deadline_s))
    watch.join()
    print(f"  {rpc}: {code}; {watch.burned:.2f} CPU s in the {args.window_s:g} s after "
          f"expiry; busy for {watch.busy_text()} after expiry", flush=True)  # fmt: skip
    return [
        (f"{rpc}: status of the expensive request (deadline {args.deadline_s:g} s)", code),
        (f"{rpc}: CPU s burned in the {args.window_s:g} s after expiry", f"{watch.burned:.2f}"),
        (f"{rpc}: server busy after expiry for", watch.busy_text()),
    ]


def small_after_burst(srv: Server, channel: grpc.Channel, args: argparse.Namespace) -> list[Row]:
    stub = convserve_pb2_grpc.ConvServeStub(channel)
    requests = [expensive_convolve(seed) for seed in range(args.burst)]
    with concurrent.futures.ThreadPoolExecutor(args.burst) as pool:
        codes = list(
            pool.map(lambda r: call_code(lambda: stub.Convolve(r, timeout=args.deadline_s))[0],
                     requests)
        )  # fmt: skip
    watch = CpuWatch(srv, time.monotonic(), args.window_s, args.idle_cap_s)
    watch.start()
    conv_code, conv_s = call_code(lambda: stub.Convolve(small_convolve(), timeout=120))
    pred_code, pred_s = call_code(lambda: stub.Predict(one_digit(), timeout=120))
    watch.join()
    summary = ", ".join(f"{codes.count(c)} {c}" for c in sorted(set(codes)))
    print(f"  burst: {summary}; small Convolve {conv_code} in {conv_s:.2f} s, Predict "
          f"{pred_code} in {pred_s:.2f} s; {watch.burned:.2f} CPU s in the {args.window_s:g} s "
          f"after expiry, busy for {watch.busy_text()}", flush=True)  # fmt: skip
    return [
        (f"burst of {args.burst} expensive Convolve, deadline {args.deadline_s:g} s", summary),
        ("small Convolve after the burst: latency", f"{conv_s:.2f} s ({conv_code})"),
        ("Predict (1 image) after the small Convolve: latency", f"{pred_s:.2f} s ({pred_code})"),
        (f"  server CPU s in the {args.window_s:g} s after the burst expired",
         f"{watch.burned:.2f}"),
        ("  server busy after the burst expired for", watch.busy_text()),
    ]  # fmt: skip


def health_during_typed(srv: Server, channel: grpc.Channel, args: argparse.Namespace) -> list[Row]:
    from grpc_health.v1 import health_pb2
    from tritonclient.grpc import service_pb2

    request = typed_conv2d_request(args.typed_mib)
    size_mib = request.ByteSize() / 2**20
    infer = channel.unary_unary(
        OIP_INFER_METHOD,
        request_serializer=service_pb2.ModelInferRequest.SerializeToString,
        response_deserializer=service_pb2.ModelInferResponse.FromString,
    )
    check = channel.unary_unary(
        HEALTH_METHOD,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    done = threading.Event()
    result: list[tuple[str, float]] = []

    def send() -> None:
        try:
            result.append(call_code(lambda: infer(request, timeout=120)))
        finally:
            done.set()

    worst, checks = 0.0, 0
    sender = threading.Thread(target=send)
    sender.start()
    while not done.is_set():
        code, latency = call_code(lambda: check(health_pb2.HealthCheckRequest(), timeout=60))
        worst, checks = max(worst, latency), checks + 1
    sender.join()
    code, infer_s = result[0]
    print(f"  typed {size_mib:.0f} MiB conv2d: {code} in {infer_s:.2f} s; worst of {checks} "
          f"health checks {worst * 1000:.0f} ms", flush=True)  # fmt: skip
    wait_idle(srv, args.idle_cap_s)
    return [
        (f"typed OIP FP32 conv2d of {size_mib:.0f} MiB", f"{code} in {infer_s:.2f} s"),
        ("  worst health check latency meanwhile", f"{worst * 1000:.0f} ms ({checks} checks)"),
    ]


def sigterm_with_stuck_worker(
    tree: Path, model: Path, args: argparse.Namespace, log_dir: Path
) -> list[Row]:
    flags = ["--grace-period-s", str(args.grace_period_s), *args.server_arg]
    with server(tree, model, flags, log_dir, "stuck") as srv:
        workers = srv.workers()
        if not workers:
            return [("SIGTERM with a stopped model worker", "no worker processes found")]
        stuck = workers[0]
        srv.stopped.append(stuck.pid)
        os.kill(stuck.pid, signal.SIGSTOP)
        channel = grpc.insecure_channel(srv.target, options=CHANNEL_OPTIONS)
        stub = convserve_pb2_grpc.ConvServeStub(channel)
        # Batches go to idle workers in turn: of a few requests, one lands on the stopped one.
        calls = [stub.Predict.future(one_digit(), timeout=30) for _ in range(args.stuck_predicts)]
        time.sleep(1.0)
        waiting = sum(not c.done() for c in calls)
        signalled = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = srv.process.wait(timeout=args.exit_cap_s)
            exited = f"{time.monotonic() - signalled:.2f} s, exit code {code}"
        except subprocess.TimeoutExpired:
            code = None
            exited = f"did not exit in {args.exit_cap_s:g} s (then SIGKILL)"
        outcomes = []
        for c in calls:
            try:
                c.result(timeout=max(0.1, 35 - (time.monotonic() - signalled)))
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
            except grpc.FutureTimeoutError:
                outcomes.append("no answer")
        channel.close()
        summary = ", ".join(f"{outcomes.count(c)} {c}" for c in sorted(set(outcomes)))
        print(f"  SIGTERM with worker {stuck.pid} stopped ({waiting} Predict waiting): {exited}; "
              f"Predicts: {summary}", flush=True)  # fmt: skip
    return [
        (f"SIGTERM, a model worker SIGSTOPped, grace {args.grace_period_s:g} s", exited),
        (f"  the {args.stuck_predicts} Predicts (30 s deadline; {waiting} waiting at SIGTERM)",
         summary),
    ]  # fmt: skip


# -- main -----------------------------------------------------------------------------


def train(base: Path) -> None:
    subprocess.run(
        [str(Path(sys.executable).parent / "convserve-train"), "--dataset", "sample",
         "--limit-train", "2000", "--epochs", "2", "--quiet", "--model-base-path", str(base)],
        check=True,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source-tree", type=Path, default=ROOT, help="default: this repository")
    parser.add_argument("--model-base-path", type=Path, help="default: train one on the sample")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=1.0,
        help="deadline of the expensive requests (default: 1)",
    )
    parser.add_argument(
        "--window-s",
        type=float,
        default=10.0,
        help="CPU is measured over this long after expiry (default: 10)",
    )
    parser.add_argument(
        "--idle-cap-s",
        type=float,
        default=120.0,
        help="longest wait for the server to go idle between phases (default: 120)",
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=4,
        help="expensive Convolve requests sent at once in phase b (default: 4)",
    )
    parser.add_argument(
        "--typed-mib",
        type=float,
        default=60.0,
        help="size of the typed OIP request of phase c (default: 60; 0: skip)",
    )
    parser.add_argument(
        "--grace-period-s",
        type=float,
        default=3.0,
        help="--grace-period-s of the SIGTERM phase's server (default: 3)",
    )
    parser.add_argument(
        "--stuck-predicts",
        type=int,
        default=4,
        help="Predict requests sent to the server with a stopped worker (default: 4)",
    )
    parser.add_argument(
        "--exit-cap-s",
        type=float,
        default=30.0,
        help="how long to wait for the server to exit after SIGTERM (default: 30)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="an extra server flag, e.g. --server-arg=--max-request-cpu-s=600",
    )
    parser.add_argument(
        "--skip", default="", help="phases to skip, comma-separated letters a,b,c,d (default: none)"
    )
    args = parser.parse_args()
    skip = set(args.skip.replace(" ", "").split(",")) - {""}

    tree = args.source_tree.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        log_dir = Path(tmp)
        model = args.model_base_path
        if model is None:
            print("training a model on the sample digits", flush=True)
            model = log_dir / "mnist"
            train(model)
        print(f"source tree {tree}: the server imports {runtime_file(tree)}", flush=True)
        print(f"server flags: {' '.join(args.server_arg) or '(defaults)'}", flush=True)
        rows: list[Row] = []
        if not skip >= {"a", "b", "c"}:
            flags = ["--grace-period-s", str(args.grace_period_s), *args.server_arg]
            with server(tree, model, flags, log_dir, "main") as srv:
                channel = grpc.insecure_channel(srv.target, options=CHANNEL_OPTIONS)
                wait_idle(srv, args.idle_cap_s)
                if "a" not in skip:
                    print("phase a: CPU after expiry (Convolve)", flush=True)
                    rows += cpu_after_expiry(srv, channel, "Convolve", expensive_convolve(), args)
                    print("phase a: CPU after expiry (FitKernel)", flush=True)
                    rows += cpu_after_expiry(srv, channel, "FitKernel", expensive_fit(), args)
                if "b" not in skip:
                    print(f"phase b: small requests after a burst of {args.burst}", flush=True)
                    rows += small_after_burst(srv, channel, args)
                if "c" not in skip and args.typed_mib > 0:
                    print("phase c: health during a large typed OIP request", flush=True)
                    rows += health_during_typed(srv, channel, args)
                channel.close()
                signalled = time.monotonic()
                srv.process.send_signal(signal.SIGTERM)
                try:
                    code = srv.process.wait(timeout=args.exit_cap_s)
                    idle_exit = f"{time.monotonic() - signalled:.2f} s, exit code {code}"
                except subprocess.TimeoutExpired:
                    idle_exit = f"did not exit in {args.exit_cap_s:g} s (then SIGKILL)"
                rows.append(("SIGTERM of the idle server after these phases", idle_exit))
        if "d" not in skip:
            print("phase d: SIGTERM with a stopped model worker", flush=True)
            rows += sigterm_with_stuck_worker(tree, model, args, log_dir)
    width = max(len(name) for name, _ in rows)
    print(f"\nreliability figures, source tree {tree}")
    print(f"{'measure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
