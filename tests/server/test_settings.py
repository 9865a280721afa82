"""Settings: defaults, environment variables, flags, validation messages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from convserve.server.model_config import ModelConfigError
from convserve.server.settings import Settings, SettingsError, env_name, flag_name

COMMON_FIELDS = [
    "model_base_path", "model_name", "host", "port", "metrics_port", "device",
    "poll_interval_s", "max_batch_size", "batch_timeout_us", "max_queued_images",
    "max_concurrent_batches", "max_images_per_request", "max_message_bytes",
    "max_conv_elements", "max_kernel_elements", "max_fit_steps", "fit_time_budget_s",
    "grace_period_s", "tls_cert", "tls_key", "tls_client_ca", "auth_token_file",
    "log_format", "log_level", "cpu_engine", "engine_threads", "inline_max_images",
    "max_stream_in_flight", "switch_interval_us", "engine_workers", "engine_nice",
    "max_request_cpu_s", "engine_batch_timeout_s", "max_typed_payload_bytes",
    "max_connection_age_s", "max_connection_age_grace_s", "keepalive_time_s",
    "keepalive_timeout_s", "keepalive_min_client_ping_interval_s",
    "keepalive_permit_without_calls", "replica_name", "strict_readiness",
    "exit_on_load_error", "version_settle_s", "max_model_memory_bytes",
]  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CONVSERVE_"):
            monkeypatch.delenv(name)


def test_defaults_match_the_documented_ones() -> None:
    settings = Settings.from_argv([])
    assert settings.model_name == "mnist"
    assert settings.host == "0.0.0.0"
    assert settings.port == 8500
    assert settings.metrics_port == 8502
    assert settings.device == "auto"
    assert settings.cpu_engine == "litert"
    assert settings.engine_workers == "process"
    assert settings.log_format == "text"
    assert settings.log_level == "INFO"
    assert settings.read_auth_token() is None
    assert not settings.tls_enabled


def test_every_documented_field_has_a_flag_with_help() -> None:
    parser = Settings.argument_parser()
    help_text = parser.format_help()
    for name in COMMON_FIELDS:
        assert name in Settings.model_fields
        assert flag_name(name) in help_text, name
        assert env_name(name) in help_text, name
        assert Settings.model_fields[name].description, name
    # The token itself is never a flag (command lines are world-readable).
    assert "--auth-token " not in help_text
    assert "--auth-token\n" not in help_text


def test_every_field_but_the_token_has_a_flag_with_help() -> None:
    help_text = Settings.argument_parser().format_help()
    for name in Settings.model_fields:
        assert env_name(name) in help_text, name
        assert Settings.model_fields[name].description, name
        if name != "auth_token":
            assert flag_name(name) in help_text, name


def test_environment_variables_fill_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_PORT", "9100")
    monkeypatch.setenv("CONVSERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("CONVSERVE_BATCH_TIMEOUT_US", "2500")
    monkeypatch.setenv("CONVSERVE_LOG_FORMAT", "JSON")
    monkeypatch.setenv("CONVSERVE_DEVICE", "GPU:1")
    settings = Settings.from_argv([])
    assert settings.port == 9100
    assert settings.max_batch_size == 8
    assert settings.batch_timeout_s == pytest.approx(0.0025)
    assert settings.log_format == "json"
    assert settings.device == "gpu:1"


def test_loading_settings_defaults() -> None:
    settings = Settings.from_argv([])
    assert settings.strict_readiness is False
    assert settings.exit_on_load_error is False
    assert settings.version_settle_s == 1.0
    assert settings.max_model_memory_bytes == 1 << 30


def test_loading_settings_from_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_STRICT_READINESS", "true")
    monkeypatch.setenv("CONVSERVE_EXIT_ON_LOAD_ERROR", "1")
    monkeypatch.setenv("CONVSERVE_VERSION_SETTLE_S", "0.25")
    monkeypatch.setenv("CONVSERVE_MAX_MODEL_MEMORY_BYTES", str(2 << 20))
    from_env = Settings.from_argv([])
    assert from_env.strict_readiness is True
    assert from_env.exit_on_load_error is True
    assert from_env.version_settle_s == 0.25
    assert from_env.max_model_memory_bytes == 2 << 20
    from_flags = Settings.from_argv(
        [
            "--strict-readiness", "false",
            "--exit-on-load-error", "no",
            "--version-settle-s", "0",
            "--max-model-memory-bytes", str(1 << 42),
        ]
    )  # fmt: skip
    assert from_flags.strict_readiness is False
    assert from_flags.exit_on_load_error is False
    assert from_flags.version_settle_s == 0.0
    assert from_flags.max_model_memory_bytes == 1 << 42


def test_engine_threads_default_to_a_share_of_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert Settings.from_argv(["--max-concurrent-batches", "2"]).engine_threads_per_call == 4
    assert Settings.from_argv(["--max-concurrent-batches", "16"]).engine_threads_per_call == 1
    monkeypatch.setenv("CONVSERVE_ENGINE_THREADS", "3")
    monkeypatch.setenv("CONVSERVE_CPU_ENGINE", "tensorflow")
    monkeypatch.setenv("CONVSERVE_ENGINE_WORKERS", "thread")
    settings = Settings.from_argv([])
    assert settings.engine_threads_per_call == 3
    assert settings.cpu_engine == "tensorflow"
    assert settings.engine_workers == "thread"


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_PORT", "9100")
    monkeypatch.setenv("CONVSERVE_MODEL_NAME", "from-env")
    settings = Settings.from_argv(["--port", "9200", "--model-base-path", "/srv/models"])
    assert settings.port == 9200
    assert settings.model_name == "from-env"
    assert settings.model_base_path == Path("/srv/models")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--port", "70000"], "--port / CONVSERVE_PORT: Input should be less than or equal"),
        (["--metrics-port", "-1"], "--metrics-port / CONVSERVE_METRICS_PORT"),
        (["--max-batch-size", "many"], "--max-batch-size / CONVSERVE_MAX_BATCH_SIZE"),
        (["--max-batch-size", "0"], "greater than or equal to 1"),
        (["--poll-interval-s", "0"], "--poll-interval-s / CONVSERVE_POLL_INTERVAL_S"),
        (["--device", "tpu"], '--device / CONVSERVE_DEVICE: expected "auto", "cpu"'),
        (["--log-format", "xml"], "--log-format / CONVSERVE_LOG_FORMAT"),
        (
            ["--cpu-engine", "onnx"],
            "--cpu-engine / CONVSERVE_CPU_ENGINE: expected one of litert, tensorflow",
        ),
        (["--engine-threads", "-1"], "--engine-threads / CONVSERVE_ENGINE_THREADS"),
        (["--engine-nice", "20"], "--engine-nice / CONVSERVE_ENGINE_NICE: Input should be less"),
        (
            ["--engine-workers", "gpu"],
            "--engine-workers / CONVSERVE_ENGINE_WORKERS: Input should be 'process' or 'thread'",
        ),
        (["--log-level", "chatty"], "--log-level / CONVSERVE_LOG_LEVEL: expected one of DEBUG"),
        (["--grace-period-s", "-1"], "--grace-period-s"),
        (["--tls-cert", "/no/such/cert.pem"], "no such file: /no/such/cert.pem"),
        (["--port", "9000", "--metrics-port", "9000"], "--port and --metrics-port must differ"),
        (
            ["--traffic-interval-s", "5", "--traffic-window-s", "2"],
            "--traffic-window-s (2.0) must be at least --traffic-interval-s (5.0)",
        ),
        (
            ["--traffic-interval-s", "0.1", "--traffic-window-s", "86400"],
            "--traffic-window-s / --traffic-interval-s: at most 3600 intervals of history "
            "expected, got 864000",
        ),
        (["--console-poll-s", "0.1"], "--console-poll-s / CONVSERVE_CONSOLE_POLL_S"),
        (["--console", "maybe"], "--console / CONVSERVE_CONSOLE"),
        (
            ["--max-connection-age-s", "-1"],
            "--max-connection-age-s / CONVSERVE_MAX_CONNECTION_AGE_S",
        ),
        (["--keepalive-time-s", "0"], "--keepalive-time-s / CONVSERVE_KEEPALIVE_TIME_S"),
        (
            ["--keepalive-permit-without-calls", "sometimes"],
            "--keepalive-permit-without-calls / CONVSERVE_KEEPALIVE_PERMIT_WITHOUT_CALLS",
        ),
        (
            ["--version-settle-s", "-1"],
            "--version-settle-s / CONVSERVE_VERSION_SETTLE_S: Input should be greater than or "
            "equal to 0",
        ),
        (
            ["--version-settle-s", "601"],
            "--version-settle-s / CONVSERVE_VERSION_SETTLE_S: Input should be less than or "
            "equal to 600",
        ),
        (
            ["--max-model-memory-bytes", str((1 << 20) - 1)],
            "--max-model-memory-bytes / CONVSERVE_MAX_MODEL_MEMORY_BYTES: Input should be "
            "greater than or equal to 1048576",
        ),
        (
            ["--max-model-memory-bytes", str((1 << 42) + 1)],
            "--max-model-memory-bytes / CONVSERVE_MAX_MODEL_MEMORY_BYTES: Input should be "
            "less than or equal to 4398046511104",
        ),
        (
            ["--strict-readiness", "sometimes"],
            "--strict-readiness / CONVSERVE_STRICT_READINESS: Input should be a valid boolean",
        ),
        (
            ["--exit-on-load-error", "maybe"],
            "--exit-on-load-error / CONVSERVE_EXIT_ON_LOAD_ERROR: Input should be a valid boolean",
        ),
        (
            ["--replica-name", "pod one"],
            "--replica-name / CONVSERVE_REPLICA_NAME: expected printable ASCII without spaces",
        ),
    ],
)
def test_bad_values_are_named_in_the_error(argv: list[str], expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_argv(argv)
    assert expected in str(caught.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_argv(["--port", "x", "--max-fit-steps", "0"])
    message = str(caught.value)
    assert "--port" in message
    assert "--max-fit-steps" in message


def test_unknown_flags_exit_like_argparse() -> None:
    with pytest.raises(SystemExit) as caught:
        Settings.from_argv(["--no-such-flag", "1"])
    assert caught.value.code == 2


def test_tls_files_must_come_together(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(SettingsError, match="--tls-cert and --tls-key must be given together"):
        Settings.from_argv(["--tls-cert", str(cert)])
    with pytest.raises(SettingsError, match="--tls-client-ca requires --tls-cert"):
        Settings.from_argv(["--tls-client-ca", str(cert)])
    both = Settings.from_argv(["--tls-cert", str(cert), "--tls-key", str(cert)])
    assert both.tls_enabled


def test_token_from_file_drops_the_newline(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    settings = Settings.from_argv(["--auth-token-file", str(token_file)])
    assert settings.read_auth_token() == "s3cret-token"
    assert "s3cret" not in repr(settings)


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    settings = Settings.from_argv(["--auth-token-file", str(token_file)])
    with pytest.raises(SettingsError, match="is empty"):
        settings.read_auth_token()


def test_token_from_environment_is_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVSERVE_AUTH_TOKEN", "env-token")
    settings = Settings.from_argv([])
    assert settings.read_auth_token() == "env-token"
    assert "env-token" not in repr(settings)
    token_file = tmp_path / "token"
    token_file.write_text("file-token")
    with pytest.raises(SettingsError, match="not both"):
        Settings.from_argv(["--auth-token-file", str(token_file)])


def test_blank_token_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_AUTH_TOKEN", "  ")
    with pytest.raises(SettingsError, match="CONVSERVE_AUTH_TOKEN is set but empty"):
        Settings.from_argv([])


def test_settings_are_immutable() -> None:
    settings = Settings.from_argv([])
    with pytest.raises(Exception, match="frozen"):
        settings.port = 1


def test_models_come_from_repeated_flags_or_a_comma_separated_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = Settings.from_argv(["--model", "mnist=/m/mnist", "--model", "fashion=rel/f"])
    assert [(e.name, str(e.base_path)) for e in settings.model_entries()] == [
        ("mnist", "/m/mnist"),
        ("fashion", "rel/f"),
    ]
    monkeypatch.setenv(env_name("model"), "a=/x, b=/y")
    assert [e.name for e in Settings.from_argv([]).model_entries()] == ["a", "b"]
    monkeypatch.delenv(env_name("model"))
    # Neither: the one model of --model-name at --model-base-path.
    single = Settings.from_argv(["--model-name", "digits", "--model-base-path", "/d"])
    assert [(e.name, str(e.base_path), e.policy) for e in single.model_entries()] == [
        ("digits", "/d", None)
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "mnist"], "--model / CONVSERVE_MODEL: --model: NAME=BASE_PATH expected"),
        (["--model", "a=/x", "--model", "a=/y"], "'a' is given more than once"),
        (["--model", "conv2d=/x"], "reserved"),
        (
            ["--model", "mnist=   "],
            "--model / CONVSERVE_MODEL: --model: BASE_PATH: missing; the directory holding "
            "the model's numbered versions expected",
        ),
        (
            ["--model", "liveness=/x"],
            "--model / CONVSERVE_MODEL: --model: NAME: 'liveness' is reserved (the server's "
            "own gRPC health service of that name)",
        ),
        (
            ["--model", "a=/a", "--model", "readiness=/x"],
            "--model: NAME: 'readiness' is reserved (the server's own gRPC health service",
        ),
        (
            ["--model-base-path", "  "],
            "--model-base-path / CONVSERVE_MODEL_BASE_PATH: a directory path expected, got "
            "only white space",
        ),
        (
            ["--model-base-path", "\t"],
            "--model-base-path / CONVSERVE_MODEL_BASE_PATH: a directory path expected, got "
            "only white space",
        ),
        (["--model-config-file", "/nowhere.config"], "no such file: /nowhere.config"),
        (["--model-config-file-poll-wait-s", "-1"], "--model-config-file-poll-wait-s"),
    ],
)
def test_bad_model_settings_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_argv(argv)


def test_a_blank_base_path_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVSERVE_MODEL_BASE_PATH", "   ")
    with pytest.raises(SettingsError) as caught:
        Settings.from_argv([])
    assert (
        "--model-base-path / CONVSERVE_MODEL_BASE_PATH: a directory path expected, got only "
        "white space"
    ) in str(caught.value)
    # A blank entry of the comma-separated variable has no path at all.
    monkeypatch.delenv("CONVSERVE_MODEL_BASE_PATH")
    monkeypatch.setenv("CONVSERVE_MODEL", "a=/a, mnist=   ")
    with pytest.raises(SettingsError) as caught:
        Settings.from_argv([])
    assert "--model: NAME=BASE_PATH expected, got 'mnist='" in str(caught.value)


@pytest.mark.parametrize("name", ["liveness", "readiness"])
def test_a_health_name_is_refused_as_the_model_name(name: str) -> None:
    # Whether the settings or the models they give refuse it, it never reaches health.
    with pytest.raises((SettingsError, ModelConfigError), match=f"'{name}' is reserved"):
        Settings.from_argv(["--model-name", name]).model_entries()


def test_model_flags_and_a_config_file_exclude_each_other(tmp_path: Path) -> None:
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "a" base_path: "versions/a" } }')
    from_file = Settings.from_argv(["--model-config-file", str(config)])
    assert [(e.name, e.base_path) for e in from_file.model_entries()] == [
        ("a", tmp_path / "versions" / "a")
    ]
    with pytest.raises(SettingsError, match="either with --model or in --model-config-file"):
        Settings.from_argv(["--model-config-file", str(config), "--model", "b=/b"])


def test_connection_defaults_suit_kubernetes_and_proxies() -> None:
    settings = Settings.from_argv([])
    # Clients re-resolve within about half a minute of a scale-up...
    assert settings.max_connection_age_s == 30.0
    # ...while calls on an aged connection, streams included, get a minute to finish.
    assert settings.max_connection_age_grace_s == 60.0
    # Pings well inside the 4-10 minute idle timeouts of cloud load balancers and NATs.
    assert settings.keepalive_time_s == 60.0
    assert settings.keepalive_timeout_s == 20.0
    # The SDK's 30 s client pings are accepted, idle or not.
    from convserve.client.channel import KEEPALIVE_TIME_MS

    assert settings.keepalive_min_client_ping_interval_s * 1000 <= KEEPALIVE_TIME_MS
    assert settings.keepalive_permit_without_calls is True


def test_connection_settings_from_environment_become_grpc_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONVSERVE_MAX_CONNECTION_AGE_S", "2")
    monkeypatch.setenv("CONVSERVE_MAX_CONNECTION_AGE_GRACE_S", "0.25")
    monkeypatch.setenv("CONVSERVE_KEEPALIVE_PERMIT_WITHOUT_CALLS", "false")
    monkeypatch.setenv("CONVSERVE_KEEPALIVE_MIN_CLIENT_PING_INTERVAL_S", "5")
    options = dict(Settings.from_argv(["--keepalive-timeout-s", "7"]).connection_options())
    assert options == {
        "grpc.max_connection_age_ms": 2000,
        "grpc.max_connection_age_grace_ms": 250,
        "grpc.keepalive_time_ms": 60_000,
        "grpc.keepalive_timeout_ms": 7000,
        "grpc.http2.min_ping_interval_without_data_ms": 5000,
        "grpc.keepalive_permit_without_calls": 0,
        "grpc.http2.max_pings_without_data": 0,
    }


def test_replica_name_defaults_to_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "convserve-server-7d9f-abcde")
    assert Settings.from_argv([]).resolved_replica_name() == "convserve-server-7d9f-abcde"
    monkeypatch.setenv("CONVSERVE_REPLICA_NAME", " replica-a ")
    assert Settings.from_argv([]).resolved_replica_name() == "replica-a"
    assert Settings.from_argv(["--replica-name", "b"]).resolved_replica_name() == "b"
