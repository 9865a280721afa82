"""The server's error types and their one mapping to gRPC status codes.

Code below the servicers raises these (or `TensorError` from the codec);
`status_of` is the only place that decides which status a client sees.
"""

from __future__ import annotations

import grpc

from convserve.v1.tensor_codec import TensorError


class ServeError(Exception):
    """Base class: an error whose message is safe and useful to send to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServeError):
    """A request field is malformed; `field` names it, `problem` says what was expected."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(ServeError):
    """An unknown model name or a version that is not loaded."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServeError):
    """The model cannot do what was asked (e.g. it has no feature_maps signature)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServeError):
    """The queue is full or a request is over a size limit the server enforces."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServeError):
    """The caller's deadline passed before the work could run."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServeError):
    """The caller went away; the work was dropped."""

    code = grpc.StatusCode.CANCELLED


class Unavailable(ServeError):
    """No model is ready, or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServeError):
    """Missing or wrong credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PayloadTooLarge(ResourceExhausted):
    """An HTTP request body over the server's limit (refused before it is parsed)."""

    http_status = 413


class UnsupportedMediaType(InvalidArgument):
    """An HTTP request body of a content type the endpoint does not read."""

    http_status = 415


class Unimplemented(ServeError):
    """A method the protocol defines that convserve does not offer; the message says why."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ServeError):
    """A bug or an unexpected model failure; the detail goes to the log."""

    code = grpc.StatusCode.INTERNAL


# A status message travels in the trailers, which hold 8 KiB by default: a longer one
# would turn the intended status into a metadata-size error on the client.
MAX_MESSAGE_CHARS = 1000


def shown(value: object, limit: int = 64) -> str:
    """`value` as it may appear in a message to a client or in the log: its repr, cut to
    about `limit` characters with ``…`` and the full length when longer, e.g.
    ``'aaaa…' (9000 characters)``. Use it wherever a client's string is echoed."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str | bytes):
        # Cut inside the quotes, so the result still reads as a (shortened) literal.
        quoted = repr(value[:limit])
        unit = "bytes" if isinstance(value, bytes) else "characters"
        return f"{quoted[:-1][:limit]}…{quoted[-1]} ({len(value)} {unit})"
    return f"{text[:limit]}… ({len(text)} characters)"


def json_type(value: object, *, empty: bool = False) -> str:
    """The JSON type of a parsed JSON value, for messages: ``an object``, ``an array``,
    ``a string``, ``a number``, ``a boolean`` or ``null`` (`empty`: ``an empty array``
    for [])."""
    if empty and isinstance(value, list) and not value:
        return "an empty array"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _capped(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[: MAX_MESSAGE_CHARS - 40]}… (message cut from {len(message)} characters)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for `exc`.

    Unknown exceptions become INTERNAL with a generic message, so internals
    never leak to clients; callers log those with their traceback. Messages are
    cut to `MAX_MESSAGE_CHARS`, so that a long one cannot overflow the trailers.
    """
    if isinstance(exc, ServeError):
        return exc.code, _capped(str(exc))
    if isinstance(exc, TensorError):
        return grpc.StatusCode.INVALID_ARGUMENT, _capped(str(exc))
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


# The HTTP status of each gRPC status code, as TF Serving's REST API and Google's API
# design guide map them; the HTTP APIs answer every error through `http_status_of`.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def http_status_of(exc: BaseException) -> tuple[int, grpc.StatusCode, str]:
    """The HTTP status, the status code (the metrics' `code` label) and the message a
    client of the HTTP APIs gets for `exc` (`status_of`, mapped by `HTTP_STATUS`)."""
    code, message = status_of(exc)
    # A few HTTP statuses have no gRPC code of their own (413, 415).
    status = getattr(exc, "http_status", None)
    return status if isinstance(status, int) else HTTP_STATUS[code], code, message
