"""Channel construction shared by the sync client, the async client and the load generator.

Scaling out: give a ``dns:///name:port`` target, e.g. a Kubernetes headless
service (``dns:///convserve-headless.ns.svc.cluster.local:8500``). The DNS
resolver returns every replica's address and the ``round_robin`` policy set
in the service config keeps one connection per replica and spreads calls
over them. (gRPC's default ``pick_first`` would pin all calls to one pod,
and a ClusterIP service balances connections, not calls.)

Keepalive: connections are long-lived, so a replica that vanishes without
closing its TCP connections (node failure, a network partition, a NAT or
load balancer that silently drops idle flows) would otherwise stall calls
until the OS gives up, minutes later. An HTTP/2 ping every
`KEEPALIVE_TIME_MS` while calls are in flight detects that within
`KEEPALIVE_TIMEOUT_MS`; gRPC then marks the address unavailable and
round-robin moves on. Pings are not sent on idle connections
(`keepalive_permit_without_calls` = 0) because servers with gRPC's default
policy answer pings more frequent than every five minutes without calls
with GOAWAY ("too_many_pings"); convserve-server permits pings every
10 s (``--keepalive-min-client-ping-interval-s``), well under our 30 s.

Following replicas as they come and go: the channel re-resolves DNS whenever
a connection closes or receives GOAWAY. convserve-server sends GOAWAY on
every connection after ``--max-connection-age-s`` (30 s) and when it starts
draining (SIGTERM), so clients find new replicas within about that long and
leave a stopping one before it is gone. gRPC spaces resolutions at least
``grpc.dns_min_time_between_resolutions_ms`` apart (30 s by default, which
would keep a client on the old address list for up to 30 s after a GOAWAY);
`DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS` lowers that to one second. A DNS
server can be named in the target's authority, e.g.
``dns://10.0.0.10:53/convserve-headless:8500`` (the c-ares resolver, gRPC's
default, supports it; the ``native`` resolver does not).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
# Shortest time between two DNS resolutions of a dns:/// target (see the module docstring).
DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS = 1_000
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# A call that a draining server cancels before any answer (gRPC core cancels calls that
# reach a server after its shutdown began, grpc/grpc#41785, and those still running when
# its grace period ends) is retried by gRPC itself, on another replica when there is one.
# Only statuses from the server count: a call the caller cancels is never retried. Every
# convserve RPC computes without side effects, so running one twice is safe. (gRPC keeps
# up to 256 KiB of a call's request for this; a larger request is not retried.)
RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.05s",
    "maxBackoff": "0.5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["CANCELLED"],
}
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": [{}], "retryPolicy": RETRY_POLICY}],
    }
)
# The same balancing without retries: a load generator must see (and time) every
# answer the server sends, a CANCELLED one included, not one call for several attempts.
SERVICE_CONFIG_WITHOUT_RETRIES = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

PemSource = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings. Each PEM item is a file path (str or Path) or the PEM bytes themselves.

    `root_ca`: CA certificates that sign the server's certificate (None: the
    system's roots). `client_cert` + `client_key`: for servers that require
    client certificates (mutual TLS). `server_name_override`: the name to
    check the server's certificate against when it differs from the target's
    host (e.g. connecting by IP address); also sent as the authority.
    """

    root_ca: PemSource | None = None
    client_cert: PemSource | None = None
    client_key: PemSource | None = None
    server_name_override: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("TLS: client_cert and client_key must be given together")
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.root_ca, "root_ca"),
            private_key=_read_pem(self.client_key, "client_key"),
            certificate_chain=_read_pem(self.client_cert, "client_cert"),
        )


def _read_pem(source: PemSource | None, field: str) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ValueError(f"TLS {field}: cannot read {source}: {exc.strerror}") from exc


def channel_options(
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls: TlsConfig | None = None,
    retries: bool = True,
) -> list[tuple[str, Any]]:
    """gRPC channel arguments: round-robin balancing, DNS re-resolution, keepalive and
    message size limits.

    `retries=False` leaves out `RETRY_POLICY`, so that every attempt is a call of
    its own (the load generator counts each server answer).
    """
    config = SERVICE_CONFIG if retries else SERVICE_CONFIG_WITHOUT_RETRIES
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", config),
        ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        # Pings ride along with calls; do not cap how many go out between data frames.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if tls is not None and tls.server_name_override:
        options.append(("grpc.ssl_target_name_override", tls.server_name_override))
        options.append(("grpc.default_authority", tls.server_name_override))
    return options


def as_tls_config(tls: bool | TlsConfig | None) -> TlsConfig | None:
    """`True` means TLS with the system's roots; False/None means plaintext."""
    if isinstance(tls, TlsConfig):
        return tls
    return TlsConfig() if tls else None


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying the bearer token.

    Sent as plain call metadata rather than grpc call credentials, which
    gRPC refuses on plaintext channels; use TLS when the network is not
    trusted, or the token travels in the clear.
    """
    if not token:
        return ()
    return (("authorization", f"Bearer {token}"),)


def sync_channel(
    target: str, tls: TlsConfig | None, options: list[tuple[str, Any]]
) -> grpc.Channel:
    """A sync channel."""
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options)


def aio_channel(
    target: str, tls: TlsConfig | None, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    """An asyncio channel."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, tls.credentials(), options=options)
