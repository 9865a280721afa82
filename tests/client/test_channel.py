"""Channel options: balancing, DNS re-resolution, keepalive that servers accept, retries."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from convserve.client.channel import (
    DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS,
    KEEPALIVE_TIME_MS,
    channel_options,
    sync_channel,
)

METHOD = "/test.Flaky/Call"


def test_dns_targets_re_resolve_soon_after_a_goaway() -> None:
    options = dict(channel_options())
    assert (
        options["grpc.dns_min_time_between_resolutions_ms"] == DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS
    )
    # gRPC's default (30 s) would keep a client on the old address list after a GOAWAY
    # for longer than the server's default connection age.
    assert DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS < 30_000 / 10
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]


def test_client_pings_are_within_what_the_server_permits() -> None:
    from convserve.server.settings import Settings

    server_min_interval_s = Settings.model_fields["keepalive_min_client_ping_interval_s"].default
    options = dict(channel_options())
    # A client pinging more often than the server allows gets GOAWAY too_many_pings.
    assert options["grpc.keepalive_time_ms"] == KEEPALIVE_TIME_MS
    assert server_min_interval_s * 1000 <= KEEPALIVE_TIME_MS
    assert options["grpc.keepalive_permit_without_calls"] == 0


def test_only_server_cancellations_are_retried() -> None:
    config = json.loads(dict(channel_options())["grpc.service_config"])
    (method,) = config["methodConfig"]
    assert method["name"] == [{}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["CANCELLED"]
    assert 2 <= method["retryPolicy"]["maxAttempts"] <= 5


class _CancelOnce:
    """Answers its first call with CANCELLED (as a draining server does), then echoes."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            context.abort(grpc.StatusCode.CANCELLED, "server shutting down")
        return request


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, _CancelOnce]]:
    handler = _CancelOnce()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Flaky", {"Call": grpc.unary_unary_rpc_method_handler(handler)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", handler
    finally:
        server.stop(0)


def test_a_call_the_server_cancelled_is_retried_by_the_channel(flaky_server) -> None:
    target, handler = flaky_server
    with sync_channel(target, None, channel_options()) as channel:
        call = channel.unary_unary(METHOD)
        assert call(b"digits", timeout=10) == b"digits"
    assert handler.calls == 2


def test_without_the_retry_policy_the_cancellation_reaches_the_caller(flaky_server) -> None:
    target, handler = flaky_server
    plain = channel_options(retries=False)
    config = json.loads(dict(plain)["grpc.service_config"])
    # Only the retries go: calls are still balanced over every replica.
    assert config == {"loadBalancingConfig": [{"round_robin": {}}]}
    with sync_channel(target, None, plain) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(METHOD)(b"digits", timeout=10)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert handler.calls == 1
