"""ConvServeClient and AsyncConvServeClient against fake servers over real gRPC."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from convserve.client import (
    AsyncConvServeClient,
    ConvServeClient,
    DeadlineExceededError,
    InputError,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    TlsConfig,
    UnauthenticatedError,
    UnavailableError,
)
from convserve.client.channel import channel_options

from .conftest import Certs
from .fakes import Behaviour, RunningFake, serve_fake

FAST_RETRIES = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


def numbered_images(count: int, dtype: type = np.uint8) -> np.ndarray:
    """Images whose first pixel is their index: the fake predicts index % 10."""
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(count) % 256
    return images if dtype == np.uint8 else (images / 255.0).astype(dtype)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- Every method, sync and async ---------------------------------------------------------


def test_sync_client_every_method(fake: RunningFake) -> None:
    with ConvServeClient(fake.target) as client:
        result = client.predict(numbered_images(3))
        assert result.digits.tolist() == [0, 1, 2]
        assert (result.model_name, result.model_version) == ("fake", 7)
        assert result[1].top(2) == [(1, pytest.approx(0.91)), (0, pytest.approx(0.01))]
        assert result.probabilities.shape == (3, 10)

        out = client.convolve([[0, 1, 2], [3, 4, 5], [6, 7, 8]], [[0, 1], [2, 3]], bias=1)
        np.testing.assert_array_equal(out, [[20, 26], [38, 44]])
        assert out.dtype == np.float64

        fit = client.fit_kernel(np.zeros((4, 4)), np.zeros((4, 3)), (1, 2), fit_bias=True)
        np.testing.assert_allclose(fit.kernel, [[0.0, 0.1]])
        assert fit.bias is not None
        assert fit.bias.tolist() == [0.5]
        assert (fit.steps, fit.stop_reason, fit.loss) == (3, "max_steps", (1.0, 0.5, 0.25, 0.125))

        maps = client.feature_maps(numbered_images(1)[0], layers=["conv2"])
        assert list(maps.maps) == ["conv2"]
        assert maps.maps["conv2"].shape == (11, 11, 2)

        meta = client.metadata()
        assert meta.serving_version == 7
        assert meta.loaded_versions == (6, 7)
        assert meta.inputs[0].dtypes == ("uint8", "float32")
        assert meta.layers[0].name == "conv1"
        assert meta.training.total_parameters == 1250
        assert meta.training.hyperparameters == {"batch_size": "32", "epochs": "1"}

        assert client.health() == "SERVING"


async def test_async_client_every_method(fake: RunningFake) -> None:
    async with AsyncConvServeClient(fake.target) as client:
        result = await client.predict(numbered_images(3))
        assert result.digits.tolist() == [0, 1, 2]
        out = await client.convolve(
            np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]], np.float32), [[0, 1], [2, 3]]
        )
        np.testing.assert_array_equal(out, [[19, 25], [37, 43]])
        assert out.dtype == np.float32
        fit = await client.fit_kernel(np.zeros((4, 4)), np.zeros((4, 3)), (1, 2))
        assert fit.bias is None
        assert fit.kernel.shape == (1, 2)
        maps = await client.feature_maps(numbered_images(1))
        assert list(maps.maps) == ["conv1", "conv2"]
        assert (await client.metadata()).model_name == "fake"
        assert await client.health() == "SERVING"
    assert fake.behaviour.calls["Predict"] == 1


# --- What goes on the wire -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "dtype"),
    [
        (numbered_images(2), "uint8"),
        (numbered_images(2).reshape(2, 28, 28, 1), "uint8"),
        (numbered_images(2).reshape(2, 784), "uint8"),
        (numbered_images(2).astype(np.int64), "uint8"),  # integer-valued: sent as uint8
        (numbered_images(2, np.float64), "float32"),  # floats stay floats
        ([numbered_images(1)[0], numbered_images(2)[1]], "uint8"),
        ([numbered_images(1)[0], numbered_images(2, np.float32)[1]], "float32"),
    ],
)
def test_predict_inputs_and_wire_dtype(fake: RunningFake, images: Any, dtype: str) -> None:
    with ConvServeClient(fake.target) as client:
        assert client.predict(images).digits.tolist() == [0, 1]
    assert fake.behaviour.dtypes == [dtype]


def test_single_image_is_a_batch_of_one(fake: RunningFake) -> None:
    image = numbered_images(6)[5]
    with ConvServeClient(fake.target) as client:
        assert client.predict(image).digits.tolist() == [5]
        assert client.predict(image.reshape(784)).digits.tolist() == [5]
    assert fake.behaviour.images == [1, 1]


def test_bad_input_is_refused_before_sending(fake: RunningFake) -> None:
    with ConvServeClient(fake.target) as client:
        with pytest.raises(InputError, match=r"shape must be .*got \[2, 27, 27\]"):
            client.predict(np.zeros((2, 27, 27), np.uint8))
        with pytest.raises(InputError, match=r"float pixels must be in \[0, 1\]"):
            client.predict(np.full((1, 28, 28), 255.0))
        with pytest.raises(InputError, match=r"mode: expected"):
            client.convolve(np.zeros((3, 3)), np.ones((2, 2)), mode="sideways")
    assert fake.behaviour.calls.total() == 0


def test_large_batches_are_split_and_reassembled_in_order() -> None:
    with (
        serve_fake(Behaviour(max_images=4)) as fake,
        ConvServeClient(fake.target, max_batch_images=4) as client,
    ):
        result = client.predict(numbered_images(10))
    assert result.digits.tolist() == [i % 10 for i in range(10)]
    assert fake.behaviour.images == [4, 4, 2]


async def test_async_split_keeps_order_when_parts_finish_out_of_order() -> None:
    # The first part is answered last, after the others.
    behaviour = Behaviour(first_call_delay_s=0.3)
    with serve_fake(behaviour) as fake:
        async with AsyncConvServeClient(fake.target, max_batch_images=3) as client:
            result = await client.predict(numbered_images(12))
    assert result.digits.tolist() == [i % 10 for i in range(12)]
    assert sorted(behaviour.images) == [3, 3, 3, 3]


def test_server_size_limit_is_reported_not_retried() -> None:
    with (
        serve_fake(Behaviour(max_images=2)) as fake,
        ConvServeClient(fake.target) as client,
        pytest.raises(InvalidArgumentError, match="more images than") as caught,
    ):
        client.predict(numbered_images(3))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fake.behaviour.calls["Predict"] == 1


# --- Retries and deadlines --------------------------------------------------------------


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_retryable_codes_are_retried(code: grpc.StatusCode) -> None:
    with (
        serve_fake(Behaviour(fail_first=2, fail_code=code)) as fake,
        ConvServeClient(fake.target, retries=FAST_RETRIES) as client,
    ):
        assert client.predict(numbered_images(1)).digits.tolist() == [0]
    assert fake.behaviour.calls["Predict"] == 3


def test_invalid_argument_is_never_retried() -> None:
    behaviour = Behaviour(fail_first=5, fail_code=grpc.StatusCode.INVALID_ARGUMENT)
    with (
        serve_fake(behaviour) as fake,
        ConvServeClient(fake.target, retries=5) as client,
        pytest.raises(InvalidArgumentError) as caught,
    ):
        client.metadata()
    assert fake.behaviour.calls["GetModelMetadata"] == 1
    assert caught.value.attempts == 1
    assert caught.value.details == "failing on purpose (1/5)"


def test_retries_stop_after_max_attempts() -> None:
    with (
        serve_fake(Behaviour(fail_first=100)) as fake,
        ConvServeClient(fake.target, retries=FAST_RETRIES) as client,
        pytest.raises(UnavailableError) as caught,
    ):
        client.predict(numbered_images(1))
    assert caught.value.attempts == 4
    assert fake.behaviour.calls["Predict"] == 4


def test_retrying_never_exceeds_the_deadline() -> None:
    # Backoffs grow to half a second, so a retry loop that slept past the
    # deadline would overshoot it by far more than the scheduling slack allowed.
    policy = RetryPolicy(max_attempts=1000, initial_backoff_s=0.02, max_backoff_s=0.5)
    timeout_s = 0.6
    with (
        serve_fake(Behaviour(fail_first=10**6)) as fake,
        ConvServeClient(fake.target, retries=policy, timeout_s=timeout_s) as client,
    ):
        start = time.monotonic()
        with pytest.raises(UnavailableError) as caught:
            client.predict(numbered_images(1))
        elapsed = time.monotonic() - start
    assert elapsed <= timeout_s + 0.15
    assert caught.value.attempts == fake.behaviour.calls["Predict"] > 3


async def test_async_retrying_never_exceeds_the_deadline() -> None:
    # Backoffs grow to half a second, so a retry loop that slept past the
    # deadline would overshoot it by far more than the scheduling slack allowed.
    policy = RetryPolicy(max_attempts=1000, initial_backoff_s=0.02, max_backoff_s=0.5)
    with serve_fake(Behaviour(fail_first=10**6)) as fake:
        async with AsyncConvServeClient(fake.target, retries=policy, timeout_s=0.6) as client:
            start = time.monotonic()
            with pytest.raises(UnavailableError):
                await client.predict(numbered_images(1))
            elapsed = time.monotonic() - start
    assert elapsed <= 0.75
    assert fake.behaviour.calls["Predict"] > 3


async def test_async_retries_then_succeeds() -> None:
    with serve_fake(Behaviour(fail_first=2)) as fake:
        async with AsyncConvServeClient(fake.target, retries=FAST_RETRIES) as client:
            assert (await client.metadata()).serving_version == 7
    assert fake.behaviour.calls["GetModelMetadata"] == 3


def test_slow_server_hits_the_deadline_once() -> None:
    with (
        serve_fake(Behaviour(delay_s=2.0)) as fake,
        ConvServeClient(fake.target, timeout_s=0.3) as client,
    ):
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            client.metadata()
        assert time.monotonic() - start < 1.0  # the server would take 2 s
    assert fake.behaviour.calls["GetModelMetadata"] == 1


def test_per_call_timeout_overrides_the_default() -> None:
    with (
        serve_fake(Behaviour(delay_s=0.5)) as fake,
        ConvServeClient(fake.target, timeout_s=0.1) as client,
    ):
        assert client.metadata(timeout_s=5.0).model_name == "fake"


def test_unreachable_server_is_unavailable() -> None:
    with (
        ConvServeClient(f"127.0.0.1:{closed_port()}", retries=FAST_RETRIES) as client,
        pytest.raises(UnavailableError) as caught,
    ):
        client.health()
    assert caught.value.attempts == 4


def test_unknown_model_is_not_found(fake: RunningFake) -> None:
    with ConvServeClient(fake.target, model_name="nope") as client, pytest.raises(NotFoundError):
        client.metadata()


# --- Health ------------------------------------------------------------------------------


def test_wait_for_serving_returns_once_serving(fake: RunningFake) -> None:
    fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    with ConvServeClient(fake.target) as client:
        assert client.health() == "NOT_SERVING"
        flip = threading.Timer(
            0.3, fake.health.set, args=("", health_pb2.HealthCheckResponse.SERVING)
        )
        flip.start()
        start = time.monotonic()
        assert client.wait_for_serving(5.0, poll_interval_s=0.05) == "SERVING"
        assert 0.25 < time.monotonic() - start < 2.0


async def test_async_wait_for_serving_gives_up_with_the_last_status(fake: RunningFake) -> None:
    fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    async with AsyncConvServeClient(fake.target) as client:
        start = time.monotonic()
        assert await client.wait_for_serving(0.4, poll_interval_s=0.05) == "NOT_SERVING"
        assert time.monotonic() - start < 1.0
        # The health protocol answers NOT_FOUND for a service it does not know.
        with pytest.raises(NotFoundError):
            await client.health("no.such.Service")


def test_wait_for_serving_raises_when_nothing_answers() -> None:
    with (
        ConvServeClient(f"127.0.0.1:{closed_port()}", retries=0) as client,
        pytest.raises(UnavailableError),
    ):
        client.wait_for_serving(0.3, poll_interval_s=0.05)


# --- Authentication and TLS ------------------------------------------------------------------


def test_token_is_sent_and_checked() -> None:
    with serve_fake(Behaviour(token="s3cret")) as fake:
        with ConvServeClient(fake.target, token="s3cret") as client:
            assert client.metadata().model_name == "fake"
        for token in ("wrong", None):
            with (
                ConvServeClient(fake.target, token=token) as client,
                pytest.raises(UnauthenticatedError, match="bearer token"),
            ):
                client.metadata()
    assert fake.behaviour.calls["GetModelMetadata"] == 3  # never retried


def _server_credentials(certs: Certs, *, require_client: bool) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
        root_certificates=certs.ca.read_bytes() if require_client else None,
        require_client_auth=require_client,
    )


def test_tls_with_a_private_ca(certs: Certs) -> None:
    credentials = _server_credentials(certs, require_client=False)
    with serve_fake(credentials=credentials) as fake:
        with ConvServeClient(fake.target, tls=TlsConfig(root_ca=certs.ca)) as client:
            assert client.health() == "SERVING"
        by_name = TlsConfig(root_ca=certs.ca.read_bytes(), server_name_override="localhost")
        with ConvServeClient(fake.target, tls=by_name) as client:
            assert client.metadata().model_name == "fake"
        # The system's roots do not trust the test CA; plaintext is refused too.
        for tls in (True, False):
            with (
                ConvServeClient(fake.target, tls=tls, retries=0) as client,
                pytest.raises(UnavailableError),
            ):
                client.health()


def test_mutual_tls(certs: Certs) -> None:
    credentials = _server_credentials(certs, require_client=True)
    with serve_fake(credentials=credentials) as fake:
        mtls = TlsConfig(
            root_ca=certs.ca, client_cert=certs.client_cert, client_key=certs.client_key
        )
        with ConvServeClient(fake.target, tls=mtls) as client:
            assert client.health() == "SERVING"
        with (
            ConvServeClient(fake.target, tls=TlsConfig(root_ca=certs.ca), retries=0) as client,
            pytest.raises(UnavailableError),
        ):
            client.health()


def test_tls_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="given together"):
        ConvServeClient("localhost:1", tls=TlsConfig(client_cert=b"x"))
    with pytest.raises(ValueError, match="cannot read"):
        ConvServeClient("localhost:1", tls=TlsConfig(root_ca=tmp_path / "missing.pem"))


# --- Balancing over replicas ------------------------------------------------------------------


def test_round_robin_spreads_calls_over_every_address() -> None:
    with serve_fake() as first, serve_fake() as second:
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
        with ConvServeClient(target) as client:
            for _ in range(20):
                client.metadata()
    assert first.behaviour.calls["GetModelMetadata"] >= 5
    assert second.behaviour.calls["GetModelMetadata"] >= 5
    assert (
        first.behaviour.calls["GetModelMetadata"] + second.behaviour.calls["GetModelMetadata"] == 20
    )


def test_channel_options_ask_for_round_robin_and_keepalive() -> None:
    options = dict(channel_options())
    assert '"round_robin"' in options["grpc.service_config"]
    assert options["grpc.keepalive_time_ms"] > 0
    assert options["grpc.keepalive_permit_without_calls"] == 0
