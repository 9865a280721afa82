"""What ``convserve bench`` is asked to do: the target and load (`BenchConfig`), one load
level (`Phase`), how a level is measured (`WindowPlan`), and `SetupError`.

See `convserve.client.bench` for how a load is generated and measured.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

import grpc
import numpy as np

from convserve.client import bench_requests
from convserve.client.channel import TlsConfig
from convserve.client.errors import InputError

# convserve.v1 and the Open Inference Protocol over gRPC; TF Serving's REST API and
# KServe v2 (the Open Inference Protocol) over HTTP, see `bench_http`.
PROTOCOLS = ("convserve", "oip", "rest", "oip-http")
HTTP_PROTOCOLS = ("rest", "oip-http")


def base_url(target: str, tls: TlsConfig | None) -> str:
    """The URL an HTTP target's paths go under, e.g. ``http://127.0.0.1:8501``.

    `target` is ``HOST:PORT`` (https when `tls` is given) or an ``http://`` or
    ``https://`` URL, whose path, if any, prefixes every request's path (a
    server behind a proxy). InputError (without a flag name) otherwise.
    """
    expected = f"expected HOST:PORT or an http:// or https:// URL, got {target!r}"
    url = target if "://" in target else f"{'https' if tls is not None else 'http'}://{target}"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InputError(f"{expected} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(expected)
    if "://" not in target and port is None:
        raise InputError(expected)
    if parts.query or parts.fragment or parts.username is not None:
        raise InputError(f"{expected}: no query, fragment or user name")
    if parts.scheme == "http" and tls is not None:
        raise InputError(f"TLS settings given for the http:// URL {target!r}; use https://")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


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
    duration_s: float = 10.0  # `bench.run_phase`'s one window (`bench.run_windows` takes its own)
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
            try:
                base_url(self.target, self.tls)
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


class SetupError(Exception):
    """The run could not start; carries the status code when the server refused."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code
