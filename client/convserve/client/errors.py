"""The client's exceptions.

Every failed call raises a `ConvServeError` subclass chosen by the gRPC
status code, so callers can catch what they can act on (``except
UnavailableError``) without inspecting codes. Problems with the caller's own
input that are found before anything is sent raise `InputError` instead.
"""

from __future__ import annotations

import grpc


class InputError(ValueError):
    """The caller's input cannot be sent (wrong shape, range, type or file)."""


class ConvServeError(Exception):
    """A call failed. `code` is the gRPC status, `details` the server's message.

    `attempts` counts the calls made, retries included.
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, attempts: int = 1) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.attempts = attempts


class InvalidArgumentError(ConvServeError):
    """The server rejected the request; `details` names the field."""


class NotFoundError(ConvServeError):
    """Unknown model name or a version that is not loaded."""


class UnavailableError(ConvServeError):
    """The server cannot be reached, has no model ready, or is shutting down."""


class ResourceExhaustedError(ConvServeError):
    """The server's queue is full or the request is over a size limit."""


class DeadlineExceededError(ConvServeError):
    """The call's deadline passed."""


class UnauthenticatedError(ConvServeError):
    """The token is missing or wrong."""


class PermissionDeniedError(ConvServeError):
    """The credentials are valid but not allowed to make this call."""


class CancelledError(ConvServeError):
    """The call was cancelled."""


class InternalError(ConvServeError):
    """The server failed, or its answer could not be read."""


_BY_CODE: dict[grpc.StatusCode, type[ConvServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def error_for(code: grpc.StatusCode, details: str, *, attempts: int = 1) -> ConvServeError:
    """The exception for a status code (ConvServeError itself for codes without a subclass)."""
    return _BY_CODE.get(code, ConvServeError)(code, details, attempts=attempts)


def from_rpc_error(error: grpc.RpcError, *, attempts: int = 1) -> ConvServeError:
    """Turn grpc's exception (sync or aio) into ours."""
    # Both grpc.Call (sync) and grpc.aio.AioRpcError offer code() and details().
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "", attempts=attempts)


def bad_response(problem: str) -> InternalError:
    """The server answered with something this client cannot read."""
    return InternalError(grpc.StatusCode.INTERNAL, f"malformed response: {problem}")
