"""``convserve bench``: load-test one or two targets (see `convserve.client.bench`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from convserve.client import (
    bench_config,
    bench_http,
    bench_metrics,
    bench_report,
    bench_requests,
    bench_sweep,
)
from convserve.client.bench_config import (
    HTTP_PROTOCOLS,
    PROTOCOLS,
    BenchConfig,
    Phase,
    SetupError,
)
from convserve.client.channel import TlsConfig
from convserve.client.commands.common import (
    EXIT_OK,
    EXIT_OTHER,
    Command,
    UsageError,
    emit,
    read_token,
    tls_config,
)
from convserve.client.errors import InputError

# Where an HTTP protocol goes when neither --target nor $CONVSERVE_TARGET says:
# the server's default --rest-port.
DEFAULT_REST_TARGET = "localhost:8501"

EXAMPLES = """\
examples:
  convserve bench --concurrency-range 1:64:8 --window-s 2 --latency-threshold-ms 50
  convserve bench --rate-range 100:1000:100 --latency-threshold-ms 20 --plot sweep.png
  convserve --target H:8500 bench --compare oip@H:8500 --model mnist --concurrency 1,8,32
  convserve --target oip@H:8081 bench --model m --input images:FP32:-1,28,28,1
  convserve --target rest@H:8501 bench --model mnist --compare convserve@H:8500 --concurrency 16
  convserve --target https://H:8501 bench --protocol oip-http --model mnist --images-per-request 32
  convserve bench --concurrency 1,8 --metrics-url http://H:8502/metrics --csv out.csv
"""


def _positive_list(text: str, name: str, kind: Callable[[str], Any]) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{name}: every value must be positive, got {text!r}")
    return values


def _bench_target(text: str, protocol: str, flag: str, tls: TlsConfig | None) -> tuple[str, str]:
    """(address, protocol) from ``[PROTOCOL@]ADDRESS``; the prefix wins over `protocol`.

    An HTTP protocol's address is ``HOST:PORT`` or an http(s):// URL; a URL
    for a gRPC protocol is refused.
    """
    prefix, at, address = text.partition("@")
    if at and prefix in PROTOCOLS:
        if not address:
            raise UsageError(f"{flag}: expected [PROTOCOL@]HOST:PORT, got {text!r}")
        text, protocol = address, prefix
    if protocol in HTTP_PROTOCOLS:
        try:
            bench_config.base_url(text, tls)
        except InputError as exc:
            raise UsageError(f"{flag}: {exc}") from None
    elif text.startswith(("http://", "https://")):
        raise UsageError(
            f"{flag}: {text!r} is an HTTP URL, and {protocol} runs over gRPC: give "
            f"rest@{text} or oip-http@{text} (or --protocol rest / oip-http)"
        )
    return text, protocol


def _bench_phases(args: argparse.Namespace) -> list[Phase]:
    if args.concurrency_range is not None:
        levels = bench_sweep.parse_range(args.concurrency_range, "--concurrency-range", int)
        return [Phase(concurrency=c) for c in levels]
    if args.rate_range is not None:
        rates = bench_sweep.parse_range(args.rate_range, "--rate-range", float)
        return [Phase(rate=r) for r in rates]
    if args.rate is not None:
        return [Phase(rate=r) for r in _positive_list(args.rate, "--rate", float)]
    levels = _positive_list(args.concurrency, "--concurrency", int)
    return [Phase(concurrency=c) for c in levels]


def _bench_windows(args: argparse.Namespace) -> bench_sweep.Windows | None:
    if args.window_s is None:
        for flag, value in (
            ("--stability-percent", args.stability_percent),
            ("--max-windows", args.max_windows),
        ):
            if value is not None:
                raise UsageError(f"{flag} needs --window-s (stable measurement windows)")
        return None
    if args.duration_s is not None:
        raise UsageError(
            "--duration-s and --window-s exclude each other: with --window-s a level "
            "lasts as many windows as it needs (up to --max-windows)"
        )
    return bench_sweep.Windows(
        window_s=args.window_s,
        stability_percent=10.0 if args.stability_percent is None else args.stability_percent,
        max_windows=10 if args.max_windows is None else args.max_windows,
    )


def _bench_single_target(args: argparse.Namespace) -> None:
    """Refuse --target given twice with different values: argparse keeps the last."""
    given = list(dict.fromkeys(getattr(args, "targets_given", [])))
    if len(given) > 1:
        raise UsageError(
            f"--target given more than once ({', '.join(given)}); to compare two targets "
            f"give the second with --compare, e.g. --target {given[0]} bench --compare {given[1]}"
        )


def _bench_oip_input(
    text: str | None, protocol: str, flag: str, target_flag: str, images: np.ndarray
) -> bench_requests.OipInput | None:
    """The parsed --input / --compare-input, checked against its target and the images."""
    if text is None:
        return None
    if protocol not in ("oip", "oip-http"):
        protocol_flag = "--protocol" if target_flag == "--target" else "--compare-protocol"
        raise UsageError(
            f"{flag} applies only to an oip or oip-http target: give {target_flag} "
            f"oip@HOST:PORT (or {protocol_flag} oip)"
        )
    spec = bench_requests.parse_oip_input(text, flag)
    bench_requests.check_oip_input(spec, images)
    return spec


def run(args: argparse.Namespace) -> int:
    _bench_single_target(args)
    phases = _bench_phases(args)
    windows = _bench_windows(args)
    if args.latency_threshold_ms is not None and not args.latency_threshold_ms > 0:
        raise UsageError(
            f"--latency-threshold-ms: expected milliseconds > 0, got {args.latency_threshold_ms}"
        )
    for flag, path in (("--csv", args.csv), ("--plot", args.plot)):
        if path is not None:
            bench_report.check_writable(path, flag)
    if args.plot is not None:
        if not args.plot.lower().endswith(".png"):
            raise UsageError(f"--plot: expected a FILE.png, got {args.plot!r}")
        from convserve.client import bench_plot

        bench_plot.check_available()
    if args.images:
        images = bench_requests.load_images(args.images)
    else:
        images, _ = bench_requests.synthetic_digits(256)
    tls, token = tls_config(args), read_token(args)
    target = args.target
    if args.protocol in HTTP_PROTOCOLS and not args.targets_given:
        target = os.environ.get("CONVSERVE_TARGET", DEFAULT_REST_TARGET)
    address, protocol = _bench_target(target, args.protocol, "--target", tls)
    specs = [
        (
            address,
            protocol,
            args.model,
            _bench_oip_input(args.input, protocol, "--input", "--target", images),
        )
    ]
    if args.compare is not None:
        other, other_protocol = _bench_target(
            args.compare, args.compare_protocol or protocol, "--compare", tls
        )
        other_model = args.model if args.compare_model is None else args.compare_model
        other_input = _bench_oip_input(
            args.compare_input, other_protocol, "--compare-input", "--compare", images
        )
        specs.append((other, other_protocol, other_model, other_input))
    else:
        for flag, value in (
            ("--compare-protocol", args.compare_protocol),
            ("--compare-model", args.compare_model),
            ("--compare-input", args.compare_input),
        ):
            if value is not None:
                raise UsageError(f"{flag} needs --compare TARGET")
    urls = [bench_metrics.check_url(u) for u in args.metrics_url or []]
    if len(urls) not in (0, 1, len(specs)):
        raise UsageError(
            f"--metrics-url: expected one URL (for every target) or one per target "
            f"({len(specs)}), got {len(urls)}"
        )
    if len(urls) == 1:
        urls *= len(specs)
    # A missing extra fails now, not in the middle of a sweep.
    for _, target_protocol, _, _ in specs:
        if target_protocol in HTTP_PROTOCOLS:
            bench_http.import_http(target_protocol)
    duration_s = 10.0 if args.duration_s is None else args.duration_s
    configs = [
        BenchConfig(
            target=target,
            images=images,
            protocol=target_protocol,
            rpc=args.rpc,
            model_name=model,
            images_per_request=args.images_per_request,
            duration_s=duration_s,
            warmup_s=args.warmup_s,
            processes=args.processes,
            streams=args.streams,
            timeout_s=args.timeout_s,
            tls=tls,
            token=token,
            oip_input=spec,
        )
        for target, target_protocol, model, spec in specs
    ]
    # A URL that cannot be read at all fails now; one that fails later costs only
    # that level its server figures.
    for url in dict.fromkeys(urls):
        try:
            bench_metrics.scrape(url)
        except bench_metrics.MetricsError as exc:
            raise SetupError(str(exc)) from exc
    show_progress = not args.json and not args.no_progress and sys.stderr.isatty()
    result = bench_sweep.sweep(
        configs,
        phases,
        windows=windows,
        threshold_ms=args.latency_threshold_ms,
        metrics_urls=urls,
        show_progress=show_progress,
    )
    if args.csv is not None:
        bench_report.write_csv(result, args.csv)
    if args.plot is not None:
        from convserve.client import bench_plot

        bench_plot.plot(result, args.plot)
    emit(args, bench_report.report_dict(result), bench_report.report_text(result))
    return EXIT_OK if all(not level.result.errors for level in result.levels) else EXIT_OTHER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        default="1",
        help="closed loop: comma-separated concurrency levels, one phase each (default 1)",
    )
    load.add_argument(
        "--rate",
        help="open loop: requests/s (comma-separated for several phases); latency counts "
        "from each request's scheduled send time",
    )
    load.add_argument(
        "--concurrency-range",
        metavar="START:END[:STEP]",
        help="closed loop at concurrency START, START+STEP, ... up to END (STEP default 1)",
    )
    load.add_argument(
        "--rate-range",
        metavar="START:END[:STEP]",
        help="open loop at START, START+STEP, ... up to END requests/s (STEP default 1)",
    )
    parser.add_argument(
        "--latency-threshold-ms",
        type=float,
        metavar="MS",
        help="stop a target's sweep after the first level whose p99 exceeds MS; the knee is "
        "the last level under it",
    )
    parser.add_argument(
        "--window-s",
        type=float,
        metavar="S",
        help="measure each level's one continuous load in consecutive windows of S seconds "
        "until the last 3 agree (instead of one --duration-s window)",
    )
    parser.add_argument(
        "--stability-percent",
        type=float,
        metavar="P",
        help="with --window-s: windows agree when each one's req/s and p99 are within P%% of "
        "their mean (default 10)",
    )
    parser.add_argument(
        "--max-windows",
        type=int,
        metavar="N",
        help="with --window-s: at most N windows per level, then it is marked UNSTABLE "
        "(default 10)",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="convserve",
        help="protocol of --target (or prefix it: --target oip@HOST:PORT): convserve or oip "
        "over gRPC; rest (TF Serving's REST API, JSON) or oip-http (KServe v2 over HTTP, binary "
        "tensors), whose target is HOST:PORT or an http(s):// URL (default "
        f"{DEFAULT_REST_TARGET}) and which need the http extra: pip install 'convserve[http]'",
    )
    parser.add_argument(
        "--input",
        metavar="NAME:DTYPE:SHAPE",
        help="with --protocol oip or oip-http: the input to send, e.g. images:FP32:-1,28,28,1 (for "
        "servers whose model metadata declares no inputs, such as MLServer's default)",
    )
    parser.add_argument(
        "--compare",
        metavar="[PROTOCOL@]TARGET",
        help="a second target: levels alternate between --target and it (A1 B1 A2 B2 ...) "
        "and the table gains the ratio B/A of req/s",
    )
    parser.add_argument(
        "--compare-protocol",
        choices=PROTOCOLS,
        help="protocol of --compare (default: that of --target)",
    )
    parser.add_argument(
        "--compare-model", metavar="NAME", help="model of --compare (default --model)"
    )
    parser.add_argument("--compare-input", metavar="NAME:DTYPE:SHAPE", help="--input of --compare")
    parser.add_argument(
        "--metrics-url",
        action="append",
        metavar="URL",
        help="the server's Prometheus /metrics, scraped at every window boundary for "
        "server-side requests, batch size, queue wait and model time over the same windows "
        "as the client's figures; once for every target or once per target",
    )
    parser.add_argument("--csv", metavar="FILE", help="also write one row per target and level")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw p50/p90/p99 latency against throughput (needs the plot extra: "
        "pip install 'convserve[plot]')",
    )
    parser.add_argument("--rpc", choices=("predict", "convolve"), default="predict")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument(
        "--duration-s", type=float, help="measured time per phase (default 10; see --window-s)"
    )
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured time before it")
    parser.add_argument("--processes", type=int, default=1, help="generator processes (default 1)")
    parser.add_argument(
        "--streams",
        type=int,
        default=0,
        help="send over this many PredictStream streams per process instead of one unary "
        "call per request (default 0: unary)",
    )
    parser.add_argument("--images", metavar="FILE", help=".npz with 'images' (default: synthetic)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


COMMAND = Command(
    "bench",
    "load-test the server (closed or open loop; sweeps, a latency threshold, two targets)",
    run,
    add_arguments,
    examples=EXAMPLES,
)
