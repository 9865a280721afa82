"""The server's settings: one typed object, filled from flags and environment variables.

Every field is an environment variable ``CONVSERVE_<FIELD>`` and a command-line
flag ``--<field-with-dashes>``; flags win over the environment, which wins over
the defaults. Units are part of the names (``_s``, ``_us``, ``_bytes``).

The bearer token is the one exception: it is read from ``--auth-token-file``
or the ``CONVSERVE_AUTH_TOKEN`` environment variable and has no flag of its
own, because command lines are visible to every user of the machine.

About 700 lines, on purpose: every flag, its variable, unit, bounds and help in
one typed object, as the project's settings rule asks.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from convserve.server import engines
from convserve.server import model_config as model_config_mod

ENV_PREFIX = "CONVSERVE_"
# The same forms as device.choose_device accepts; checked here so a typo fails at start-up.
_DEVICE = re.compile(r"auto|cpu|gpu(:\d+)?")
# A gRPC metadata value that needs no escaping: printable ASCII, no spaces.
_METADATA_VALUE = re.compile(r"[\x21-\x7e]*")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Fields without a command-line flag (see the module docstring).
_ENV_ONLY = frozenset({"auth_token"})


# The traffic history's length: every console poll carries all of it.
MAX_TRAFFIC_INTERVALS = 3600


class SettingsError(ValueError):
    """Settings that cannot be used; the message names each flag/variable and the problem."""


class Settings(BaseSettings):
    """Everything the server can be configured with."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # Models
    model_base_path: Path = Field(
        Path("models/mnist"),
        description=(
            "directory holding the model's numbered versions (<base>/<version>/), when neither "
            "--model nor --model-config-file is given"
        ),
    )
    model_name: str = Field(
        "mnist",
        min_length=1,
        description="the name clients address that model by",
    )
    model: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "NAME=BASE_PATH of a model to serve; repeat the flag for several models (the "
            "environment variable takes them comma-separated). The first is the default model "
            "(requests with an empty model name)"
        ),
    )
    model_config_file: Path | None = Field(
        None,
        description=(
            "TensorFlow Serving ModelServerConfig text file listing the models to serve "
            "(model_config_list { config { name base_path model_version_policy } }); relative "
            "base paths are relative to the file"
        ),
    )
    model_config_file_poll_wait_s: float = Field(
        10.0,
        ge=0,
        le=86400,
        description=(
            "seconds between reads of --model-config-file: models added are loaded, removed "
            "ones drained and unloaded, without a restart (0: read it once)"
        ),
    )
    device: str = Field(
        "auto",
        description='TensorFlow device: "auto" (first GPU, else CPU), "cpu", "gpu" or "gpu:N"',
    )
    cpu_engine: str = Field(
        "litert",
        description=(
            "what computes predictions on a CPU, one of convserve.server.engines.ENGINES: "
            '"litert" (the SavedModel converted at load and checked against it; falls back '
            'to TensorFlow if they differ) or "tensorflow"'
        ),
    )
    engine_threads: int = Field(
        0,
        ge=0,
        le=256,
        description=(
            "CPU threads each LiteRT model call may use (0: the CPU count divided by "
            "max_concurrent_batches)"
        ),
    )
    engine_workers: Literal["process", "thread"] = Field(
        "process",
        description=(
            'where LiteRT model calls run: "process" (max_concurrent_batches + 1 worker '
            "processes, so that a batch never waits for the server's GIL, nor a CPU for the "
            'event loop to hand it the next batch) or "thread" (threads of the server process)'
        ),
    )
    engine_nice: int = Field(
        10,
        ge=0,
        le=19,
        description=(
            "niceness of the model worker processes (engine_workers=process), which then "
            "also run as SCHED_BATCH: the event loop gets a CPU first when both want one "
            "(0: scheduled like the server)"
        ),
    )
    engine_batch_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description=(
            "seconds a model worker process may spend on one batch before it is taken for "
            "hung, killed and replaced (the batch fails); batches also end at their callers' "
            "deadlines"
        ),
    )
    poll_interval_s: float = Field(
        2.0,
        gt=0,
        description="seconds between scans of the base path for new model versions",
    )
    version_settle_s: float = Field(
        1.0,
        ge=0,
        le=600,
        description=(
            "seconds nothing in a new version directory may have changed before it is loaded "
            "(by change time, which copying tools cannot backdate), so a version copied in "
            "file by file is loaded whole; a version whose files change while it loads is "
            "loaded again (0: load at once)"
        ),
    )
    max_model_memory_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        le=1 << 42,
        description=(
            "bytes one model version's batch buffers may take (its engine copies in the "
            "server and the worker processes, their tensors at the batch size, the shared "
            "regions): batches are made smaller to fit, and a version that does not fit with "
            "one image is refused"
        ),
    )
    strict_readiness: bool = Field(
        False,
        description=(
            'readiness (gRPC health "" and "readiness") only while every configured model '
            "is ready; by default the server is ready while it serves at least one model, and "
            "a model that cannot load is reported (per-model health, ListModels, "
            "convserve_model_ready) and retried without taking the replica out of service"
        ),
    )
    allow_version_labels_for_unavailable_models: bool = Field(
        False,
        description=(
            "let a version label of the model config file point at a version that is not "
            "loaded (requests by that label get UNAVAILABLE until it is); by default such a "
            "label is refused, logged and shown in ListModels, and the label keeps its "
            "previous version, as TF Serving's flag of the same name"
        ),
    )
    exit_on_load_error: bool = Field(
        False,
        description=(
            "fail start-up (exit code 2) when a model configured at start-up has no loadable "
            "version; by default the server starts with the models that load and keeps "
            "retrying the others"
        ),
    )

    # Network
    host: str = Field(
        "0.0.0.0",
        min_length=1,
        description="address the gRPC, HTTP and metrics servers listen on",
    )
    port: int = Field(8500, ge=0, le=65535, description="gRPC port (0: pick a free port)")
    rest_port: int = Field(
        8501,
        ge=-1,
        le=65535,
        description=(
            "HTTP port of the REST APIs (TF Serving's REST API, KServe v2 over HTTP and "
            "convserve's JSON API); 0: no HTTP server (as TF Serving's --rest_api_port), "
            "-1: pick a free port"
        ),
    )
    rest_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description=(
            "seconds an HTTP request may take, from its headers to its answer (the "
            "deadline its work gets, as TF Serving's --rest_api_timeout_in_ms)"
        ),
    )
    console: bool = Field(
        True,
        description=(
            "serve the console page (models, predictions, convolutions, traffic) at / on "
            "the REST port; its data calls need the token like any other request"
        ),
    )
    console_poll_s: float = Field(
        2.0,
        ge=0.5,
        le=3600,
        description="seconds between the console page's refreshes of models and traffic",
    )
    traffic_interval_s: float = Field(
        2.0,
        ge=0.1,
        le=3600,
        description="seconds between samples of the traffic history the console draws",
    )
    traffic_window_s: float = Field(
        600.0,
        gt=0,
        le=86400,
        description="seconds of traffic history kept for the console",
    )
    metrics_port: int = Field(
        8502,
        ge=0,
        le=65535,
        description="Prometheus /metrics HTTP port (0: pick a free port)",
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        le=2**31 - 1,
        description=(
            "largest gRPC message accepted or sent, and largest HTTP request body accepted, "
            "in bytes"
        ),
    )
    max_typed_payload_bytes: int = Field(
        4 * 1024 * 1024,
        ge=0,
        le=2**31 - 1,
        description=(
            "largest total size, in bytes, of the typed values (contents.*, *_val) in one OIP "
            "ModelInfer / TF Serving Predict request; raw values (raw_input_contents, "
            "tensor_content) do not count. Larger ones get INVALID_ARGUMENT before they are "
            "parsed: protobuf parses typed values at tens of MiB/s, holding the event loop "
            "meanwhile"
        ),
    )

    # Connections (scale-out). gRPC keeps one HTTP/2 connection per client and server for
    # as long as both live; these settings make clients reconnect, and so re-resolve DNS
    # and find new replicas, and keep proxies from dropping idle connections.
    max_connection_age_s: float = Field(
        30.0,
        ge=0,
        le=86400,
        description=(
            "seconds a client connection may live before the server sends GOAWAY and the "
            "client reconnects, re-resolving DNS (so clients spread over replicas added "
            "since they connected); gRPC adds up to 10 percent jitter so clients do not "
            "reconnect in step. Calls in flight continue on the old connection. 0: connections "
            "never age"
        ),
    )
    max_connection_age_grace_s: float = Field(
        60.0,
        ge=0,
        le=86400,
        description=(
            "seconds calls in flight on an aged connection (after its GOAWAY) get to finish "
            "before the connection is closed and they fail with UNAVAILABLE; longer than "
            "the longest expected call, including PredictStream streams (0: no limit)"
        ),
    )
    keepalive_time_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        description=(
            "seconds between the server's HTTP/2 keepalive pings on each connection: finds "
            "clients that vanished without closing their connection, and keeps NATs and load "
            "balancers (which drop flows idle for 4-10 minutes) from dropping idle ones"
        ),
    )
    keepalive_timeout_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="seconds a keepalive ping may go unanswered before the connection is closed",
    )
    keepalive_min_client_ping_interval_s: float = Field(
        10.0,
        ge=0,
        le=86400,
        description=(
            "shortest interval, in seconds, the server accepts between a client's keepalive "
            "pings; a client pinging more often gets GOAWAY (too_many_pings). gRPC's "
            "default is 300, which refuses the 30 s pings proxies and clients commonly use"
        ),
    )
    keepalive_permit_without_calls: bool = Field(
        True,
        description=(
            "keepalive pings on connections without calls in flight: accept the clients' "
            "(gRPC's default answers them with GOAWAY too_many_pings) and send the server's "
            "own, so idle connections survive proxies"
        ),
    )
    replica_name: str = Field(
        "",
        description=(
            "name of this replica, sent to clients in the convserve-replica trailing metadata "
            "(empty: the host name, which is the pod name on Kubernetes)"
        ),
    )

    # Batching
    max_batch_size: int = Field(
        64, ge=1, le=4096, description="most images merged into one model call"
    )
    batch_timeout_us: int = Field(
        1000,
        ge=0,
        le=10_000_000,
        description=(
            "microseconds a forming batch may wait for more images while another batch runs "
            "(an idle model never waits)"
        ),
    )
    max_queued_images: int = Field(
        4096,
        ge=1,
        description="images waiting for the model before new requests get RESOURCE_EXHAUSTED",
    )
    max_concurrent_batches: int = Field(
        2, ge=1, le=64, description="model calls that may run at the same time"
    )
    switch_interval_us: int = Field(
        500,
        ge=50,
        le=100_000,
        description=(
            "microseconds a Python thread may hold the GIL while another waits for it "
            "(sys.setswitchinterval; Python's default is 5000). With engine_workers=thread, a "
            "model thread finishing a batch waits this long at most to hand the results to a "
            "busy event loop"
        ),
    )
    inline_max_images: int = Field(
        16,
        ge=0,
        le=64,
        description=(
            "batches of at most this many images run on the event loop when the model is "
            "idle, skipping the hand-off to a worker process or thread, which costs more than "
            "LiteRT needs for a few images (LiteRT engine only; 0: never)"
        ),
    )

    # Request limits
    max_images_per_request: int = Field(
        1024, ge=1, description="most images one Predict request may carry"
    )
    max_stream_in_flight: int = Field(
        128,
        ge=1,
        le=65536,
        description=(
            "most unanswered requests one PredictStream may have; the server stops reading "
            "the stream at this many until answers go out"
        ),
    )
    max_conv_elements: int = Field(
        1 << 24,
        ge=1,
        description="most elements a Convolve/FitKernel input or output tensor may have",
    )
    max_kernel_elements: int = Field(
        1 << 20, ge=1, description="most elements a convolution kernel may have"
    )
    max_request_cpu_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description=(
            "estimated CPU seconds one Convolve or FitKernel request may cost; larger requests "
            "get INVALID_ARGUMENT before any work, and a fit stops (stop reason time_budget) "
            "after this long. The estimates come from a cost model measured on 2 CPU cores"
        ),
    )
    max_fit_steps: int = Field(
        5000, ge=1, description="most gradient descent steps one FitKernel request may run"
    )
    fit_time_budget_s: float = Field(
        10.0,
        gt=0,
        description=(
            "seconds one FitKernel request may compute before it stops (at most max_request_cpu_s)"
        ),
    )

    # Lifecycle
    grace_period_s: float = Field(
        10.0,
        ge=0,
        description="seconds in-flight requests get to finish after SIGTERM/SIGINT",
    )

    # Security
    tls_cert: Path | None = Field(
        None, description="PEM server certificate chain; enables TLS (needs --tls-key)"
    )
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(
        None,
        description="PEM CA bundle; when set, clients must present a certificate it signed",
    )
    auth_token_file: Path | None = Field(
        None,
        description=(
            "file holding the bearer token clients must send (or set CONVSERVE_AUTH_TOKEN); "
            'health checks of "", liveness and readiness stay open, a model\'s needs the token'
        ),
    )
    auth_token: SecretStr | None = Field(
        None,
        description="the bearer token itself (environment variable only, never a flag)",
    )

    # Logging
    log_format: Literal["text", "json"] = Field(
        "text", description='log line format: "text" or "json"'
    )
    log_level: str = Field("INFO", description="one of " + ", ".join(_LOG_LEVELS))

    @field_validator("model", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("model")
    @classmethod
    def _check_models(cls, value: list[str]) -> list[str]:
        try:
            entries = [model_config_mod.parse_model_flag(text) for text in value]
            model_config_mod.check_unique(entries, source="--model")
        except model_config_mod.ModelConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("model_base_path")
    @classmethod
    def _check_base_path(cls, value: Path) -> Path:
        if not str(value).strip():
            raise ValueError("a directory path expected, got only white space")
        return value

    @field_validator("cpu_engine")
    @classmethod
    def _check_engine(cls, value: str) -> str:
        if value not in engines.ENGINES:
            raise ValueError(f"expected one of {', '.join(sorted(engines.ENGINES))}")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        normalized = value.strip().lower()
        if not _DEVICE.fullmatch(normalized):
            raise ValueError('expected "auto", "cpu", "gpu" or "gpu:N" (N a GPU index)')
        return normalized

    @field_validator("replica_name")
    @classmethod
    def _check_replica_name(cls, value: str) -> str:
        stripped = value.strip()
        if not _METADATA_VALUE.fullmatch(stripped):
            raise ValueError(
                "expected printable ASCII without spaces (it is sent as gRPC metadata), "
                "or empty for the host name"
            )
        return stripped

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        upper = value.strip().upper()
        if upper not in _LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}")
        return upper

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_log_format(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "model_config_file")
    @classmethod
    def _check_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.model and self.model_config_file is not None:
            raise ValueError("give the models either with --model or in --model-config-file")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca requires --tls-cert and --tls-key (mutual TLS)")
        if self.port != 0 and self.port == self.metrics_port:
            raise ValueError(f"--port and --metrics-port must differ, both are {self.port}")
        if self.auth_token_file is not None and self.auth_token is not None:
            raise ValueError(
                "give the bearer token either in --auth-token-file or in "
                f"{ENV_PREFIX}AUTH_TOKEN, not both"
            )
        if self.auth_token is not None and not self.auth_token.get_secret_value().strip():
            raise ValueError(f"{ENV_PREFIX}AUTH_TOKEN is set but empty")
        if self.traffic_window_s < self.traffic_interval_s:
            raise ValueError(
                f"--traffic-window-s ({self.traffic_window_s}) must be at least "
                f"--traffic-interval-s ({self.traffic_interval_s})"
            )
        intervals = self.traffic_window_s / self.traffic_interval_s
        if intervals > MAX_TRAFFIC_INTERVALS:
            raise ValueError(
                f"--traffic-window-s / --traffic-interval-s: at most {MAX_TRAFFIC_INTERVALS} "
                f"intervals of history expected, got {intervals:.0f}"
            )
        return self

    def model_entries(self) -> list[model_config_mod.ModelEntry]:
        """The models to serve: --model flags, else --model-config-file (read now), else
        --model-name at --model-base-path. Raises model_config.ModelConfigError."""
        if self.model:
            return [model_config_mod.parse_model_flag(text) for text in self.model]
        if self.model_config_file is not None:
            return model_config_mod.read_model_config_file(self.model_config_file)
        return [model_config_mod.ModelEntry(self.model_name, self.model_base_path)]

    @property
    def engine_threads_per_call(self) -> int:
        """`engine_threads`, with 0 resolved against this machine's CPU count."""
        if self.engine_threads:
            return self.engine_threads
        return max(1, (os.cpu_count() or 1) // self.max_concurrent_batches)

    @property
    def batch_timeout_s(self) -> float:
        """`batch_timeout_us` in seconds, as the batcher takes it."""
        return self.batch_timeout_us / 1_000_000

    def resolved_replica_name(self) -> str:
        """`replica_name`, or this machine's host name (the pod name on Kubernetes) when empty."""
        return self.replica_name.strip() or socket.gethostname()

    def connection_options(self) -> list[tuple[str, int]]:
        """gRPC server channel arguments for connection age and keepalive, in milliseconds."""
        options = [
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout_s)),
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                _ms(self.keepalive_min_client_ping_interval_s),
            ),
            ("grpc.keepalive_permit_without_calls", int(self.keepalive_permit_without_calls)),
            # gRPC stops its own pings after 2 without data frames in between; an idle
            # connection needs them all to stay open through a proxy.
            ("grpc.http2.max_pings_without_data", 0),
        ]
        # gRPC's own defaults (no option) mean "never" for both.
        if self.max_connection_age_s > 0:
            options.append(("grpc.max_connection_age_ms", _ms(self.max_connection_age_s)))
        if self.max_connection_age_grace_s > 0:
            options.append(
                ("grpc.max_connection_age_grace_ms", _ms(self.max_connection_age_grace_s))
            )
        return options

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    def read_auth_token(self) -> str | None:
        """The bearer token clients must send, or None when auth is off.

        Read from `auth_token_file` (surrounding whitespace, e.g. the final
        newline, is dropped) or taken from `auth_token`. Raises SettingsError
        for an unreadable or empty token file.
        """
        if self.auth_token is not None:
            return self.auth_token.get_secret_value().strip()
        if self.auth_token_file is None:
            return None
        try:
            token = self.auth_token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(
                f"--auth-token-file: cannot read {self.auth_token_file}: {exc}"
            ) from exc
        if not token:
            raise SettingsError(f"--auth-token-file: {self.auth_token_file} is empty")
        return token

    @classmethod
    def flag_fields(cls) -> list[str]:
        """Names of the fields that have a command-line flag, in declaration order."""
        return [name for name in cls.model_fields if name not in _ENV_ONLY]

    @classmethod
    def argument_parser(cls) -> argparse.ArgumentParser:
        """A parser with one ``--kebab-name`` flag per field; unset flags are left out."""
        parser = argparse.ArgumentParser(
            prog="convserve-server",
            description=(
                "Serve the convserve model over gRPC (convserve.v1, Open Inference Protocol, "
                "TensorFlow Serving), with health, reflection and Prometheus metrics. Every flag "
                f"is also an environment variable {ENV_PREFIX}<NAME>; flags win."
            ),
            argument_default=argparse.SUPPRESS,
        )
        for name in cls.flag_fields():
            info = cls.model_fields[name]
            default = info.default
            shown = "unset" if default is None else str(default)
            repeated = name == "model"
            parser.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                metavar="NAME=BASE_PATH" if repeated else name.upper(),
                action="append" if repeated else "store",
                help=f"{info.description} (env {env_name(name)}; default: "
                f"{'none' if repeated else shown})",
            )
        return parser

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None = None) -> Settings:
        """Settings from command-line flags over environment variables over defaults.

        argparse itself exits (status 2) on unknown flags and prints --help;
        values that fail validation raise SettingsError with one line per problem.
        """
        namespace = cls.argument_parser().parse_args(None if argv is None else list(argv))
        return cls.build(**vars(namespace))

    @classmethod
    def build(cls, **values: Any) -> Settings:
        """`Settings(**values)` (the environment fills the rest), raising SettingsError."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError(describe_errors(exc)) from None


def _ms(seconds: float) -> int:
    # At least 1 ms: 0 means "off" or "default" to several gRPC arguments.
    return max(1, round(seconds * 1000))


def env_name(field: str) -> str:
    """The environment variable of a field, e.g. ``CONVSERVE_MAX_BATCH_SIZE``."""
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    """The command-line flag of a field, e.g. ``--max-batch-size``."""
    return "--" + field.replace("_", "-")


def describe_errors(exc: ValidationError) -> str:
    """One line per problem, naming the flag and environment variable it came from."""
    lines = ["invalid settings:"]
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        location = error["loc"]
        if location and isinstance(location[0], str):
            name = location[0]
            where = env_name(name) if name in _ENV_ONLY else f"{flag_name(name)} / {env_name(name)}"
            shown = "" if name in _ENV_ONLY else f" (got {error.get('input')!r})"
            lines.append(f"  {where}: {message}{shown}")
        else:
            lines.append(f"  {message}")
    return "\n".join(lines)
