"""The standard gRPC health check (grpc.health.v1), with grpcio-health-checking's messages."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.client.errors import ConvServeError
from convserve.client.retry import Deadline

SERVING = "SERVING"


def check_method(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """The channel's Health.Check method (awaitable on an asyncio channel)."""
    return health_pb2_grpc.HealthStub(channel).Check


def check_request(service: str = "") -> health_pb2.HealthCheckRequest:
    """Empty `service` asks about the server as a whole."""
    return health_pb2.HealthCheckRequest(service=service)


def status_name(response: health_pb2.HealthCheckResponse) -> str:
    """ "SERVING", "NOT_SERVING", "UNKNOWN", "SERVICE_UNKNOWN" (or the number if newer)."""
    status = int(response.status)
    try:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    except ValueError:
        return str(status)


# A server that is still starting refuses connections or answers late.
_KEEP_POLLING = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_MIN_CALL_TIMEOUT_S = 0.05


class ServingWait:
    """The decisions of `wait_for_serving`, shared by the sync and async clients.

    `clock` is the time source of its deadline (see `Deadline`).
    """

    def __init__(
        self,
        timeout_s: float,
        poll_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._deadline = Deadline(timeout_s, clock)
        self._poll_interval_s = poll_interval_s

    def _out_of_time(self) -> bool:
        remaining = self._deadline.remaining_s()
        return remaining is not None and remaining <= self._poll_interval_s

    def call_timeout_s(self) -> float:
        return max(self._deadline.remaining_s() or 0.0, _MIN_CALL_TIMEOUT_S)

    def answered(self, status: str) -> bool:
        """True when waiting is over (SERVING, or no time left for another poll)."""
        return status == SERVING or self._out_of_time()

    def failed(self, error: ConvServeError) -> None:
        """Raises `error` unless it is worth polling again."""
        if error.code not in _KEEP_POLLING or self._out_of_time():
            raise error
