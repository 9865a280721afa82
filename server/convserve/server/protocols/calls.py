"""What every servicer method does around its translation, in every protocol:
count the request in the shared metrics and turn errors into statuses with
`errors.status_of` (the one mapping). `Calls.stream` does the same for each
message of a request stream, answering a failed message instead of ending
the stream. Also how a protocol's servicers are added to the server
(`add_servicer`, `unimplemented_answered`).

A unary servicer method is one translation, decorated with `unary`::

    @unary("Predict", model=lambda request: request.model_spec.name)
    async def Predict(self, request, context):
        value = ...  # protobuf -> typed value
        return ...   # typed result -> protobuf

The decorator runs it through the servicer's `Calls` (``self._calls``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Mapping
from importlib import metadata as package_metadata
from typing import Any, TypeVar

import grpc

from convserve.server import api, errors, logs, types
from convserve.server.settings import Settings
from convserve.server.work import at_deadline
from convserve.v1.tensor_codec import TensorError

log = logging.getLogger(__name__)
T = TypeVar("T")
S = TypeVar("S", bound=type)
# Payloads of at least this many bytes are converted (decoded, checked, encoded) in a
# thread: work proportional to a large payload would otherwise stall every other call
# on the event loop, health checks included.
OFFLOAD_MIN_BYTES = 1 << 20
M = TypeVar("M")
R = TypeVar("R")
Q = TypeVar("Q")
# The adapters' limits by default, as the server's settings.
DEFAULT_MAX_TYPED_PAYLOAD_BYTES: int = Settings.model_fields["max_typed_payload_bytes"].default
DEFAULT_MAX_STREAM_IN_FLIGHT: int = Settings.model_fields["max_stream_in_flight"].default


@dataclasses.dataclass(frozen=True)
class AdapterOptions:
    """What every protocol adapter is given; each applies what concerns its protocol."""

    # Bytes of typed tensor values (OIP contents, TensorProto *_val) one request may hold.
    max_typed_payload_bytes: int = DEFAULT_MAX_TYPED_PAYLOAD_BYTES
    # Messages in flight per stream.
    max_stream_in_flight: int = DEFAULT_MAX_STREAM_IN_FLIGHT
    # What answers carry as the replica that served them (see `Calls`).
    replica: str = ""


# The server's defaults (tests add services with them).
DEFAULT_ADAPTER_OPTIONS = AdapterOptions()


_END = object()


def server_version() -> str:
    """The installed convserve version (``unknown`` when run from a bare checkout)."""
    try:
        return package_metadata.version("convserve")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def deadline_of(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The caller's deadline as an absolute time.monotonic() (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def off_loop(fn: Callable[..., T], *args: Any, size_bytes: int) -> T:
    """``fn(*args)``, in a thread when the payload it works on has `size_bytes` >=
    `OFFLOAD_MIN_BYTES`, else inline (a thread hand-off costs more than a small conversion)."""
    if size_bytes < OFFLOAD_MIN_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _unimplemented(method: str) -> Callable[[Any, Any, Any], Awaitable[None]]:
    message = f"{method} is not implemented by convserve"

    async def answer(self: Any, request: Any, context: Any) -> None:
        log.debug("%s", message)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    answer.__name__ = answer.__qualname__ = method.rsplit("/", 1)[-1]
    # add_servicer gives such methods a deserializer that never parses the request.
    setattr(answer, UNIMPLEMENTED_MARK, True)
    return answer


UNIMPLEMENTED_MARK = "convserve_unimplemented"


def _unread(data: bytes) -> None:
    """The request of a method convserve does not implement: never parsed (a large one
    would hold the event loop while protobuf parses it, only to be refused)."""
    return None


def unimplemented_answered(service: Any) -> Callable[[S], S]:
    """A class decorator for the servicer of `service` (a ServiceDescriptor): every method
    of the service that the class does not define itself answers UNIMPLEMENTED with
    ``<service>/<method> is not implemented by convserve`` and logs only at DEBUG.

    The generated base class's default raises NotImplementedError, which gRPC logs
    with a traceback and answers with the exception's repr. One coroutine serves every
    method kind: it ends the call before reading a request, streamed or not.
    """

    def fill(cls: S) -> S:
        for method in service.methods:
            if method.name not in vars(cls):
                setattr(cls, method.name, _unimplemented(f"{service.full_name}/{method.name}"))
        return cls

    return fill


class HandlerRecorder:
    """Stands in for a gRPC server while generated code adds a servicer: keeps the handlers
    it adds (`add_servicer` uses it; so can tests)."""

    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: list[tuple[str, dict[str, Any]]] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered.append((service, handlers))


def _deserializing(handler: Any, deserialize: Callable[[bytes], Any]) -> Any:
    """Unary-unary `handler` with the request deserializer `deserialize`."""
    if handler.request_streaming or handler.response_streaming:
        raise TypeError("only unary-unary methods take another request deserializer")
    return grpc.unary_unary_rpc_method_handler(
        handler.unary_unary,
        request_deserializer=deserialize,
        response_serializer=handler.response_serializer,
    )


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class _DeserializerSwap(grpc.ServiceRpcHandler):
    """A generated service handler, with other request deserializers for some methods."""

    def __init__(self, inner: Any, swapped: dict[str, Callable[[bytes], Any]]) -> None:
        self._inner = inner
        self._swapped = swapped  # full method path -> deserializer
        self._handlers: dict[str, Any] = {}

    def service_name(self) -> str:
        return str(self._inner.service_name())

    def serves(self, name: str) -> bool:
        """Whether method `name` of this service gets another deserializer."""
        method = f"/{self.service_name()}/{name}"
        return method in self._swapped and self.service(_Details(method)) is not None

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._inner.service(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self._swapped:
            return handler
        if method not in self._handlers:
            self._handlers[method] = _deserializing(handler, self._swapped[method])
        return self._handlers[method]


def add_servicer(
    add: Callable[[Any, Any], None],
    servicer: Any,
    server: Any,
    deserializers: Mapping[str, Callable[[bytes], Any]],
) -> None:
    """``add(servicer, server)``, `add` being a generated ``add_*Servicer_to_server``, with
    the request deserializer of each unary-unary method named in `deserializers` (by
    method name, e.g. ``ModelInfer``) replaced: the server gets exactly what the generated
    code adds (its handlers, registered the same ways), those deserializers aside.
    Unary-unary methods answered by `unimplemented_answered` never parse their request."""
    recorder = HandlerRecorder()
    add(servicer, recorder)
    deserializers = dict(deserializers)
    for _, methods in recorder.registered:
        for name, handler in methods.items():
            unary = not handler.request_streaming and not handler.response_streaming
            if unary and getattr(getattr(servicer, name, None), UNIMPLEMENTED_MARK, False):
                deserializers.setdefault(name, _unread)
    handlers = [
        _DeserializerSwap(
            handler,
            {
                f"/{handler.service_name()}/{name}": deserialize
                for name, deserialize in deserializers.items()
            },
        )
        for handler in recorder.generic
    ]
    for name in deserializers:
        if not any(handler.serves(name) for handler in handlers):
            raise ValueError(f"no unary-unary method {name} among the servicer's")
    server.add_generic_rpc_handlers(handlers)
    for service, methods in recorder.registered:
        swapped = {
            name: _deserializing(handler, deserializers[name]) if name in deserializers else handler
            for name, handler in methods.items()
        }
        server.add_registered_method_handlers(service, swapped)


def cancelled_code(
    context: grpc.aio.ServicerContext[Any, Any] | None, granted_s: float | None
) -> grpc.StatusCode:
    """The status of a call whose handler was cancelled: DEADLINE_EXCEEDED once its
    deadline has (about) passed, else CANCELLED (the caller went away). `granted_s` is
    ``context.time_remaining()`` as the call started. The rule is `work.at_deadline`,
    the one that labels the call's stopped work, so that status and label agree."""
    if context is None:
        return grpc.StatusCode.CANCELLED
    if at_deadline(context.time_remaining(), granted_s):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


# The trailing metadata key naming the server that answered (see `Calls`).
REPLICA_KEY = "convserve-replica"


class Calls:
    """Runs the servicer methods of one protocol.

    Every call is counted in `metrics` with its final status. Rejected calls
    (client errors, and UNAVAILABLE) go to `rejections` (DEBUG with the detail,
    rate-limited INFO counts); unexpected exceptions are logged at ERROR with
    their traceback. With a `replica` name, every answer (each unary call, and
    each stream at its end) carries it as trailing metadata ``convserve-replica``,
    so that a client balancing over several servers sees which one answered.
    """

    def __init__(
        self,
        protocol: types.Protocol,
        metrics: api.RequestMetrics,
        rejections: logs.RejectionSummary = logs.REJECTIONS,
        *,
        model_label: Callable[[str], str] | None = None,
        replica: str = "",
    ) -> None:
        self.protocol = protocol
        self.metrics = metrics
        self.rejections = rejections
        # Requested model name -> the `model` label (a fixed set: see `RuntimeApi.model_label`).
        self._model_label = model_label
        self.trailing: tuple[tuple[str, str], ...] = ((REPLICA_KEY, replica),) if replica else ()

    def model_label(self, requested: str) -> str:
        """The `model` label of a call that names model `requested` (may be empty)."""
        return self._model_label(requested) if self._model_label is not None else ""

    @staticmethod
    def deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
        """The caller's deadline as the runtime takes it (`deadline_of`)."""
        return deadline_of(context)

    async def run(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext[Any, Any],
        handler: Callable[[], Awaitable[T]],
        model: str = "",
    ) -> T:
        """``await handler()``, counted as one request of `rpc` to `model` (the `model`
        label); its errors become the call's status (`errors.status_of`)."""
        start = time.perf_counter()
        logs.begin_call(context)
        granted = context.time_remaining()
        code = grpc.StatusCode.OK
        message = ""
        if self.trailing:
            context.set_trailing_metadata(self.trailing)
        self.metrics.request_started(self.protocol, rpc, model)
        try:
            return await handler()
        except asyncio.CancelledError:
            code = cancelled_code(context, granted)
            raise
        except Exception as exc:
            code, message = self._failure(rpc, exc)
        finally:
            self.metrics.request_finished(
                self.protocol, rpc, code.name, time.perf_counter() - start, model
            )
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # abort always raises

    def _failure(self, rpc: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
        code, message = errors.status_of(exc)
        if not isinstance(exc, errors.ServeError | TensorError):
            log.error("%s %s failed", self.protocol, rpc, exc_info=exc)
        elif code == grpc.StatusCode.INTERNAL:
            # Raised on purpose where the failure was seen (and logged with its detail).
            log.error("%s %s failed: %s", self.protocol, rpc, message)
        else:
            self.rejections.rejected(code.name, f"{self.protocol} {rpc}", message)
        return code, message

    async def _answer(
        self,
        rpc: str,
        message: M,
        handle: Callable[[M], Awaitable[T]],
        failed: Callable[[M, grpc.StatusCode, str], T],
        context: grpc.aio.ServicerContext[Any, Any] | None,
        granted_s: float | None,
        model_of: Callable[[M], str] | None,
    ) -> T:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        model = "" if model_of is None else self.model_label(model_of(message))
        self.metrics.request_started(self.protocol, rpc, model)
        try:
            return await handle(message)
        except asyncio.CancelledError:
            code = cancelled_code(context, granted_s)
            raise
        except Exception as exc:
            code, text = self._failure(rpc, exc)
            return failed(message, code, text)
        finally:
            self.metrics.request_finished(
                self.protocol, rpc, code.name, time.perf_counter() - start, model
            )

    async def stream(
        self,
        rpc: str,
        messages: AsyncIterable[M],
        handle: Callable[[M], Awaitable[T]],
        failed: Callable[[M, grpc.StatusCode, str], T],
        max_in_flight: int,
        context: grpc.aio.ServicerContext[Any, Any] | None = None,
        model_of: Callable[[M], str] | None = None,
    ) -> AsyncGenerator[T, None]:
        """Answer every message of a request stream, at most `max_in_flight` at a time.

        Each message counts as one request of `rpc` and is handled in its own
        task, so that a stream's messages share batches like concurrent unary
        calls. Its answer is ``handle(message)``, or ``failed(message, code,
        text)`` with the status the unary call would have ended with; either way
        the stream goes on. Answers come in the order they finish.

        A message holds its slot until its answer has been written: the
        generator is resumed only once gRPC has handed the previous answer to
        the transport. So at most `max_in_flight` messages are being handled or
        have answers waiting, whether the client sends faster than the server
        answers or never reads its answers; either way reading pauses and HTTP/2
        flow control holds the client back, instead of the server queueing
        without bound. The stream ends once the client has closed its side and
        every message is answered; if the stream is cancelled, its unanswered
        messages are cancelled too (counted as DEADLINE_EXCEEDED when
        `context`'s deadline has passed).
        """
        granted = None
        if context is not None:
            logs.begin_call(context)
            granted = context.time_remaining()
            if self.trailing:
                context.set_trailing_metadata(self.trailing)
        # Every queued answer holds a slot, so the bound is never reached (+1: the end).
        answers: asyncio.Queue[Any] = asyncio.Queue(maxsize=max_in_flight + 1)
        slots = asyncio.Semaphore(max_in_flight)
        pending: set[asyncio.Task[None]] = set()

        async def answer(message: M) -> None:
            try:
                result = await self._answer(
                    rpc, message, handle, failed, context, granted, model_of
                )
            except BaseException:
                slots.release()  # no answer will be written for this message
                raise
            answers.put_nowait(result)

        async def read() -> None:
            iterator = aiter(messages)
            try:
                while True:
                    # A slot first, then a message: at the limit nothing more is read.
                    await slots.acquire()
                    try:
                        message = await anext(iterator)
                    except StopAsyncIteration:
                        break
                    task = asyncio.create_task(answer(message))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                while pending:
                    await asyncio.wait(set(pending))
            finally:
                answers.put_nowait(_END)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not _END:
                yield item
                # Resumed: gRPC has written the answer, so its message no longer counts.
                slots.release()
            await reader  # raises what ended the reading, if anything did
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()


def unary(
    rpc: str, *, model: Callable[[Any], str] | None = None
) -> Callable[[Callable[[Any, Q, Any], Awaitable[R]]], Callable[[Any, Q, Any], Awaitable[R]]]:
    """Make a servicer method one counted call of `rpc` whose errors become its status.

    The method's instance must have a `Calls` as ``self._calls``. `model`
    returns the model name the request names (for the `model` label); the
    method itself only translates and delegates.
    """

    def decorate(
        method: Callable[[Any, Q, Any], Awaitable[R]],
    ) -> Callable[[Any, Q, Any], Awaitable[R]]:
        @functools.wraps(method)
        async def call(self: Any, request: Q, context: Any) -> R:
            calls: Calls = self._calls
            label = "" if model is None else _label(calls, model, request)
            return await calls.run(rpc, context, lambda: method(self, request, context), label)

        return call

    return decorate


def _label(calls: Calls, model: Callable[[Any], str], request: Any) -> str:
    try:
        requested = str(model(request))
    except Exception:
        # A refused request (see wire.RefusedRequest) carries no fields to read: whatever
        # model it named, it is not known to be a configured one.
        return api.UNKNOWN_MODEL_LABEL
    return calls.model_label(requested)
