"""Transport security and bearer-token authentication for the gRPC server.

`server_credentials` builds TLS (optionally mutual TLS) credentials from the
settings. `BearerTokenInterceptor` requires ``authorization: Bearer <token>``
on every call except health checks and reflection, compares it in constant
time and answers UNAUTHENTICATED otherwise. `GuardedHealthServicer` keeps
health checks open for the server's own names (what probes ask) but asks for
the token before it tells whether a model name exists. The token is never logged; rejected
calls go to the shared `logs.REJECTIONS` summary (DEBUG each, INFO counts).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from convserve.server import errors, logs
from convserve.server.settings import Settings, SettingsError

AUTHORIZATION_HEADER = "authorization"
SCHEME = "bearer"
# Probes and tooling must work without credentials.
EXEMPT_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

_MISSING = errors.Unauthenticated(
    "missing credentials: send metadata 'authorization: Bearer <token>'"
)
_WRONG = errors.Unauthenticated("invalid bearer token")


def service_of(method: str) -> str:
    """``/convserve.v1.ConvServe/Predict`` -> ``convserve.v1.ConvServe``."""
    return method.lstrip("/").split("/", 1)[0]


def _read(path: Any, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise SettingsError(f"{what}: cannot read {path}: {exc}") from exc


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (None: plaintext).

    With --tls-client-ca, clients must present a certificate signed by that CA.
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    chain = _read(settings.tls_cert, "--tls-cert")
    key = _read(settings.tls_key, "--tls-key")
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca = _read(settings.tls_client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right bearer token with UNAUTHENTICATED."""

    def __init__(
        self,
        token: str,
        exempt_services: frozenset[str] = EXEMPT_SERVICES,
        rejections: logs.RejectionSummary = logs.REJECTIONS,
    ) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._token = token.encode("utf-8")
        self._exempt = exempt_services
        self._rejections = rejections

    def check(self, metadata: Any) -> errors.Unauthenticated | None:
        """None when `metadata` carries the right token, else the error to answer with."""
        presented: str | None = None
        for key, value in metadata or ():
            if key == AUTHORIZATION_HEADER:
                presented = value if isinstance(value, str) else None
                break
        if presented is None:
            return _MISSING
        scheme, _, token = presented.strip().partition(" ")
        if scheme.lower() != SCHEME:
            return _MISSING
        # compare_digest's time depends only on the lengths, never on where they differ.
        if hmac.compare_digest(token.strip().encode("utf-8"), self._token):
            return None
        return _WRONG

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if service_of(method) in self._exempt:
            return await continuation(handler_call_details)
        problem = self.check(handler_call_details.invocation_metadata)
        if problem is None:
            return await continuation(handler_call_details)
        # The method path is the client's: it is shown cut short.
        self._rejections.rejected(problem.code.name, errors.shown(method), str(problem))
        handler = await continuation(handler_call_details)
        return _rejecting(handler, problem)


def _rejecting(handler: grpc.RpcMethodHandler | None, problem: Exception) -> Any:
    """A handler of the same kind as `handler` that answers with `problem`'s status."""
    code, message = errors.status_of(problem)

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def streaming(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises; this makes the function a generator

    # Request bodies are not deserialized: the caller is not allowed to send them.
    if handler is None or not handler.response_streaming:
        if handler is not None and handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary)
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.request_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    return grpc.unary_stream_rpc_method_handler(streaming)


class GuardedHealthServicer(health_aio.HealthServicer):
    """gRPC health whose per-model statuses need the bearer token.

    Health is exempt from the token so that probes work, but a status per
    model name tells an unauthenticated caller which models exist. With a
    `check` (the interceptor's `BearerTokenInterceptor.check`), any name but
    `public` ones (the overall "", liveness, readiness, the gRPC services)
    is answered UNAUTHENTICATED without a valid token, whether or not the
    model exists.
    """

    def __init__(self, check: Callable[[Any], errors.Unauthenticated | None] | None = None) -> None:
        super().__init__()
        self._check = check
        self.public: set[str] = {""}

    async def _guard(self, service: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self._check is None or service in self.public:
            return
        problem = self._check(context.invocation_metadata())
        if problem is not None:
            logs.REJECTIONS.rejected(problem.code.name, "health", str(problem))
            await context.abort(*errors.status_of(problem))

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> health_pb2.HealthCheckResponse:
        await self._guard(request.service, context)
        return await super().Check(request, context)

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        await self._guard(request.service, context)
        await super().Watch(request, context)
