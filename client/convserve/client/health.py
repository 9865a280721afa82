"""The standard gRPC health check (grpc.health.v1) without the grpcio-health-checking package.

The two messages are declared here in a private descriptor pool, so the
client needs only protobuf, and a process that also imports the official
grpc_health module (a server in the same test process) sees no clash.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from convserve.client.errors import ConvServeError
from convserve.client.retry import Deadline

CHECK_METHOD = "/grpc.health.v1.Health/Check"
SERVING = "SERVING"
STATUS_NAMES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")


def _message_classes() -> tuple[Any, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="convserve_client/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = fdp.message_type.add(name="HealthCheckRequest")
    request.field.add(
        name="service",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    response = fdp.message_type.add(name="HealthCheckResponse")
    status_enum = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(STATUS_NAMES):
        status_enum.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
        ),
    )


HealthCheckRequest, HealthCheckResponse = _message_classes()


def check_request(service: str = "") -> Any:
    """Empty `service` asks about the server as a whole."""
    return HealthCheckRequest(service=service)


def status_name(response: Any) -> str:
    """ "SERVING", "NOT_SERVING", "UNKNOWN", "SERVICE_UNKNOWN" (or the number if newer)."""
    status = int(response.status)
    return STATUS_NAMES[status] if status < len(STATUS_NAMES) else str(status)


# A server that is still starting refuses connections or answers late.
_KEEP_POLLING = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_MIN_CALL_TIMEOUT_S = 0.05


class ServingWait:
    """The decisions of `wait_for_serving`, shared by the sync and async clients."""

    def __init__(self, timeout_s: float, poll_interval_s: float) -> None:
        self._deadline = Deadline(timeout_s)
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
