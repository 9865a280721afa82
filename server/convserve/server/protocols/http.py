"""The HTTP server: TF Serving's REST API, KServe v2 over HTTP and convserve's JSON API.

One aiohttp server in the process and event loop of the gRPC server, on
``--rest-port``, sharing its runtime (models, batchers, limits), bearer token,
TLS certificate and metrics. aiohttp parses HTTP with its C parser
(llhttp); bodies are JSON, parsed with orjson.

Every endpoint is one handler wrapped by `HttpApi.route`, which does for HTTP
what `calls.Calls` does for gRPC:

- counts the request in the shared metrics under the API's `protocol` label
  (``tfserving-rest``, ``oip-http``, ``convserve-http``), its RPC and model,
  with the gRPC status code name as ``code`` (one label set for every protocol);
- checks ``Authorization: Bearer <token>`` when a token is configured (the
  health endpoints stay open for probes);
- bounds the request's whole life by ``--rest-timeout-s`` (as TF Serving's
  ``--rest_api_timeout_in_ms``): reading the body, the queue and the compute
  share that deadline, which reaches the runtime as gRPC deadlines do;
- stops the work when the client disconnects (aiohttp cancels the handler);
- answers every error as ``{"error": "<message>"}`` with the HTTP status of
  `errors.http_status_of` (the one mapping, shared with gRPC).

Bodies are bounded before they are parsed (``--max-message-bytes``, 413), and
large ones are parsed in a worker process (`json_worker`): a JSON parser holds
the GIL for its whole run, which in a thread would still stall the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from convserve.server import api, auth, errors, logs, types
from convserve.server.json_worker import JsonError, JsonParser
from convserve.server.listen import StartupError, bind_host
from convserve.server.protocols.calls import REPLICA_KEY
from convserve.server.settings import Settings

log = logging.getLogger(__name__)

JSON = "application/json"
# Content types a JSON body may come with: JSON itself, none, and what `curl -d`
# sends by default (TF Serving reads the body as JSON whatever it is labelled).
JSON_TYPES = frozenset({JSON, "", "application/x-www-form-urlencoded", "text/plain"})
# Idle keep-alive connections are closed after this many seconds.
KEEPALIVE_TIMEOUT_S = 75.0


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    """`value` as a JSON answer (numpy arrays are written as nested lists)."""
    return web.Response(
        body=orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        content_type=JSON,
        headers=headers,
    )


def error_response(status: int, message: str) -> Any:
    return json_response({"error": message}, status)


class _Headers:
    """What `logs.begin_call` reads of a call: its request id header."""

    __slots__ = ("_request",)

    def __init__(self, request: web.Request) -> None:
        self._request = request

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        value = self._request.headers.get(logs.REQUEST_ID_HEADER)
        return () if value is None else ((logs.REQUEST_ID_HEADER, value),)


@dataclass
class HttpCall:
    """One HTTP request being answered: its body readers and its deadline."""

    request: web.Request
    # An absolute time.monotonic(), as the runtime takes deadlines.
    deadline: float
    max_body_bytes: int
    parser: JsonParser

    def match(self, name: str) -> str:
        """The path part `name` of the route (e.g. the model name)."""
        return str(self.request.match_info.get(name, ""))

    async def body(self, accepted: Iterable[str] = JSON_TYPES) -> bytes:
        """The request body, at most `max_body_bytes` (413 past that, before parsing);
        UnsupportedMediaType unless its content type is one of `accepted`."""
        # aiohttp reports a missing Content-Type as application/octet-stream.
        content_type = self.request.content_type if "Content-Type" in self.request.headers else ""
        accepted = frozenset(accepted)
        if content_type not in accepted:
            raise errors.UnsupportedMediaType(
                "Content-Type",
                f"{' or '.join(sorted(t for t in accepted if t))} expected, "
                f"got {errors.shown(content_type)}",
            )
        length = self.request.content_length
        if length is not None and length > self.max_body_bytes:
            raise self._too_large(length)
        try:
            return await self.request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise self._too_large(None) from exc

    def _too_large(self, length: int | None) -> errors.PayloadTooLarge:
        got = f"{length} bytes" if length is not None else "more"
        return errors.PayloadTooLarge(
            f"body: at most {self.max_body_bytes} bytes expected (--max-message-bytes), got {got}"
        )

    async def json(self, body: bytes | None = None) -> dict[str, Any]:
        """The body (or `body`) as a JSON object, long arrays of numbers as numpy arrays
        when it is large (parsed in the JSON worker process: see `json_worker`)."""
        if body is None:
            body = await self.body()
        value = await self.parse(body)
        if not isinstance(value, dict):
            raise errors.InvalidArgument(
                "body", f"a JSON object expected, got {errors.json_type(value)}"
            )
        return value

    async def parse(self, body: bytes) -> Any:
        """Any JSON document (see `json`); InvalidArgument naming ``body`` if invalid."""
        if not body.strip():
            raise errors.InvalidArgument("body", "a JSON object expected, got an empty body")
        try:
            return await self.parser.parse(body)
        except JsonError as exc:
            raise errors.InvalidArgument("body", f"valid JSON expected: {exc}") from None


Handler = Callable[[HttpCall], Awaitable[Any]]
ModelOf = Callable[[web.Request], str]


class HttpApi:
    """Wraps the handlers of one HTTP API (see the module docstring)."""

    def __init__(
        self,
        protocol: types.Protocol,
        metrics: api.RequestMetrics,
        *,
        settings: Settings,
        model_label: Callable[[str], str] | None = None,
        check_token: Callable[[Any], errors.Unauthenticated | None] | None = None,
        replica: str = "",
        rejections: logs.RejectionSummary = logs.REJECTIONS,
        parser: JsonParser | None = None,
    ) -> None:
        self.protocol = protocol
        self.metrics = metrics
        self.timeout_s = settings.rest_timeout_s
        self.max_body_bytes = settings.max_message_bytes
        self._model_label = model_label
        self._check_token = check_token
        self._headers = {REPLICA_KEY: replica} if replica else None
        self._rejections = rejections
        self.parser = parser if parser is not None else JsonParser()

    def route(
        self,
        rpc: str,
        handler: Handler,
        *,
        model: ModelOf | None = None,
        public: bool = False,
    ) -> Callable[[web.Request], Awaitable[Any]]:
        """The aiohttp handler running `handler` as one counted request of `rpc`; `model`
        reads the model name the request names (for the `model` label); `public`
        endpoints need no token."""
        check = None if public else self._check_token

        async def handle(request: web.Request) -> Any:
            start = time.perf_counter()
            label = self._label(model, request)
            self.metrics.request_started(self.protocol, rpc, label)
            code = "OK"
            try:
                if check is not None:
                    presented = request.headers.get("Authorization")
                    problem = check(((auth.AUTHORIZATION_HEADER, presented),))
                    if problem is not None:
                        raise problem
                logs.begin_call(_Headers(request))
                deadline = time.monotonic() + self.timeout_s
                call = HttpCall(request, deadline, self.max_body_bytes, self.parser)
                scope = asyncio.timeout(self.timeout_s)
                try:
                    async with scope:
                        response = await handler(call)
                except TimeoutError:
                    if not scope.expired():
                        raise
                    # The runtime answers its own deadline first; this bounds the rest
                    # (a body that trickles in, a slow conversion).
                    raise errors.DeadlineExceeded(
                        f"{rpc}: no answer within --rest-timeout-s ({self.timeout_s:g} s)"
                    ) from None
                if self._headers is not None:
                    response.headers.update(self._headers)
                return response
            except asyncio.CancelledError:
                # The client went away (aiohttp cancels the handler): its work is dropped.
                code = "CANCELLED"
                raise
            except Exception as exc:
                status, grpc_code, message = errors.http_status_of(exc)
                code = grpc_code.name
                self._log_failure(rpc, exc, code, message)
                # Errors name the replica too, as gRPC's trailers do.
                failed = error_response(status, message)
                if self._headers is not None:
                    failed.headers.update(self._headers)
                return failed
            finally:
                self.metrics.request_finished(
                    self.protocol, rpc, code, time.perf_counter() - start, label
                )

        return handle

    def _label(self, model: ModelOf | None, request: web.Request) -> str:
        if model is None or self._model_label is None:
            return ""
        return self._model_label(model(request))

    def _log_failure(self, rpc: str, exc: Exception, code: str, message: str) -> None:
        if not isinstance(exc, errors.ServeError | errors.TensorError):
            log.error("%s %s failed", self.protocol, rpc, exc_info=exc)
        elif code == "INTERNAL":
            log.error("%s %s failed: %s", self.protocol, rpc, message)
        else:
            self._rejections.rejected(code, f"{self.protocol} {rpc}", message)


async def _not_found(request: web.Request) -> Any:
    return error_response(
        404,
        f"{request.method} {errors.shown(request.path)}: no such endpoint (see the README's "
        "HTTP/REST section for the endpoints served)",
    )


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> Any:
    """aiohttp's own answers (unknown path, method not allowed) as JSON errors too."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return json_response(
            {"error": f"{request.method} {errors.shown(request.path)}: {allowed} expected"},
            405,
            {"Allow": allowed},
        )
    except web.HTTPNotFound:
        return await _not_found(request)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS from --tls-cert/--tls-key (with --tls-client-ca: clients must present a
    certificate it signed), as the gRPC port has; None: plain HTTP."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca is not None:
            context.load_verify_locations(settings.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        from convserve.server.settings import SettingsError

        raise SettingsError(f"--tls-cert/--tls-key/--tls-client-ca: {exc}") from exc
    context.set_alpn_protocols(["http/1.1"])
    return context


Routes = Callable[[web.UrlDispatcher], None]


class HttpServer:
    """The running HTTP server (`start`, `port`, `stop`)."""

    def __init__(
        self,
        settings: Settings,
        routes: Iterable[Routes],
        parser: JsonParser | None = None,
        background: Iterable[Callable[[], Coroutine[Any, Any, None]]] = (),
        closers: Iterable[Callable[[], None]] = (),
    ) -> None:
        self.settings = settings
        self._parser = parser
        # Called once the server has stopped (e.g. to end a thread pool).
        self._closers = list(closers)
        # Coroutines that run while the server listens (e.g. sampling traffic).
        self._background = list(background)
        self._tasks: list[asyncio.Task[None]] = []
        app = web.Application(
            client_max_size=settings.max_message_bytes, middlewares=[_json_errors]
        )
        for add in routes:
            add(app.router)
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            shutdown_timeout=settings.grace_period_s,
        )
        self.port = 0

    async def start(self) -> int:
        """Listen; returns the bound port. Raises OSError when the port is unavailable."""
        await self._runner.setup()
        port = max(0, self.settings.rest_port)
        site = web.TCPSite(
            self._runner,
            bind_host(self.settings.host),
            port,
            ssl_context=ssl_context(self.settings),
            backlog=1024,
        )
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise StartupError(
                f"cannot serve HTTP on {self.settings.host}:{port}: {exc.strerror or exc}"
            ) from exc
        addresses = self._runner.addresses
        self.port = int(addresses[0][1]) if addresses else port
        self._tasks = [asyncio.create_task(run()) for run in self._background]
        return self.port

    async def stop(self) -> None:
        """Stop listening, let running requests finish within the grace period, close."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._runner.cleanup()
        finally:
            for close in self._closers:
                close()
            if self._parser is not None:
                self._parser.close()
