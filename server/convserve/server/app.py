"""Assembling and running the server: gRPC services, health, reflection, metrics.

`start_server` builds one grpc.aio server carrying the protocols' services
(`protocols.ADAPTERS`), ``grpc.health.v1`` and reflection, starts the Prometheus
``/metrics`` endpoint, loads and warms the model and returns once the server
reports SERVING. `RunningServer.stop` shuts down in the order load balancers
need: health turns NOT_SERVING first, then every client connection gets an
HTTP/2 GOAWAY at once (so clients reconnect elsewhere while this server still
finishes their accepted calls), then the runtime drains and releases the models.

Connections also end on their own: the server sends GOAWAY to each after
`max_connection_age_s` (see `Settings.connection_options`), so clients that
connected before a scale-up re-resolve DNS and spread over the new replicas.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
import prometheus_client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.exposition import ThreadingWSGIServer

from convserve.server import api, auth, types
from convserve.server.json_worker import JsonParser
from convserve.server.listen import StartupError, bind_host
from convserve.server.logs import REJECTIONS
from convserve.server.metrics import Metrics
from convserve.server.protocols import ADAPTERS
from convserve.server.protocols.calls import AdapterOptions
from convserve.server.protocols.http import HttpApi, HttpServer
from convserve.server.protocols.oip import OipModels
from convserve.server.settings import Settings

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Health service names of the server itself. Liveness: SERVING from the moment the
# server listens until it stops, whatever its models do (a blocked event loop fails it
# by not answering), so that a model that cannot load never gets a replica restarted.
# Readiness, also the overall name "": the runtime's `ready` (see runtime.Runtime).
LIVENESS = "liveness"
READINESS = "readiness"


class RunningServer:
    """A started server. `port` and `metrics_port` are the bound ports (never 0)."""

    def __init__(
        self,
        *,
        settings: Settings,
        server: grpc.aio.Server,
        health: auth.GuardedHealthServicer,
        runtime: api.RuntimeApi,
        metrics: Metrics,
        port: int,
        metrics_http: tuple[WSGIServer, threading.Thread] | None,
        services: list[str],
        http: HttpServer | None = None,
    ) -> None:
        self.settings = settings
        self.server = server
        self.health = health
        self.runtime = runtime
        self.metrics = metrics
        self.port = port
        self.metrics_port = metrics_http[0].server_port if metrics_http is not None else 0
        self.services = services
        self._metrics_http = metrics_http
        # The HTTP APIs' server (None: --rest-port 0); `rest_port` is its bound port.
        self.http = http
        self.rest_port = http.port if http is not None else 0
        self.stopping = False  # set when a graceful stop begins
        self.stopped_cleanly = True  # False: the stop abandoned work that would not stop
        self._stop_lock = asyncio.Lock()
        self._stopped = asyncio.Event()
        self._health_updates: set[asyncio.Task[None]] = set()
        # Model names that have had a health status (removed models turn NOT_SERVING).
        self._model_services: set[str] = set()

    @property
    def target(self) -> str:
        """``host:port`` a local client can dial (wildcard hosts become loopback)."""
        host = self.settings.host
        if host in ("0.0.0.0", "", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def listening_line(self) -> str:
        """The line announcing the bound ports (subprocess callers parse it)."""
        line = (
            f"convserve-server listening on {self.settings.host}:{self.port} "
            f"metrics on :{self.metrics_port}"
        )
        return line + (f" rest on :{self.rest_port}" if self.http is not None else "")

    @property
    def rest_url(self) -> str:
        """The base URL a local client reaches the HTTP APIs at ("" without them)."""
        if self.http is None:
            return ""
        scheme = "https" if self.settings.tls_enabled else "http"
        return f"{scheme}://{self.target.rsplit(':', 1)[0]}:{self.rest_port}"

    @property
    def serving(self) -> bool:
        """Ready and not stopping: what the HTTP readiness endpoint answers."""
        return not self.stopping and self.runtime.ready

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    async def set_serving(self, serving: bool) -> None:
        """Readiness (the overall status, `READINESS` and every service's), liveness, and
        each model's own status under its name (SERVING while it is ready; NOT_SERVING
        once it is removed or while stopping)."""
        status = SERVING if serving else NOT_SERVING
        await self.health.set(LIVENESS, SERVING)
        for name in ("", READINESS, *self.services):
            await self.health.set(name, status)
        models = [] if self.stopping else self.runtime.models()
        # A model named like a gRPC service would overwrite that service's status.
        ready = {m.name: m.ready for m in models if m.name not in self.services}
        for name in sorted(set(ready) | self._model_services):
            await self.health.set(name, SERVING if ready.get(name, False) else NOT_SERVING)
        self._model_services |= set(ready)

    def follow_readiness(self, ready: bool) -> asyncio.Task[None] | None:
        """Health follows the runtime's readiness (called on the event loop), until stopping.

        Returns the task that updates health (None while stopping).
        """
        if self.stopping or self._stopped.is_set():
            return None
        task = asyncio.get_running_loop().create_task(self.set_serving(ready))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)
        return task

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop gracefully within `grace_s` (default: the grace_period_s setting).

        Health turns NOT_SERVING at once (readiness probes fail before anything
        else changes), then gRPC's shutdown stops listening and sends GOAWAY
        on every connection straight away: clients stop sending new calls here
        and reconnect (re-resolving DNS), while accepted calls get until the
        grace period ends to finish; then the runtime stops. Safe to call twice.
        """
        grace = self.settings.grace_period_s if grace_s is None else max(0.0, grace_s)
        async with self._stop_lock:
            if self._stopped.is_set():
                return
            self.stopping = True
            deadline = time.monotonic() + grace
            log.info("shutting down: health NOT_SERVING, draining for up to %.1f s", grace)
            await self.health.enter_graceful_shutdown()
            try:
                # grpc core's shutdown sends GOAWAY first and only cancels the calls
                # still running when the grace ends; the HTTP server stops listening and
                # lets its running requests finish within the same grace period.
                stops = [self.server.stop(grace)]
                if self.http is not None:
                    stops.append(self.http.stop())
                await asyncio.gather(*stops)
                # False: work the runtime had to abandon (a thread that would not stop).
                self.stopped_cleanly = await self.runtime.stop(
                    max(0.0, deadline - time.monotonic())
                )
            finally:
                self._stop_metrics_http()
                # Rejections not yet summarised in the log are, before the process ends.
                REJECTIONS.flush()
                self._stopped.set()
            log.info("convserve-server stopped")

    async def wait_for_termination(self) -> None:
        """Returns once `stop` has finished."""
        await self._stopped.wait()

    def _stop_metrics_http(self) -> None:
        if self._metrics_http is None:
            return
        httpd, thread = self._metrics_http
        self._metrics_http = None
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def grpc_options(settings: Settings) -> list[tuple[str, Any]]:
    """The grpc.aio server's channel arguments: message limits, connection age, keepalive."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Port 0 must mean a port of our own, never one shared with another server.
        ("grpc.so_reuseport", 0),
        *settings.connection_options(),
    ]


def _interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor] | None:
    # None unless a token is set: with any interceptor, grpc.aio finds every call's
    # handler through a chain of coroutines (request ids are set by `Calls` instead).
    token = settings.read_auth_token()
    if token is None:
        return None
    return [auth.BearerTokenInterceptor(token)]


def _add_port(server: grpc.aio.Server, settings: Settings) -> int:
    host = settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    address = f"{host}:{settings.port}"
    credentials = auth.server_credentials(settings)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise StartupError(f"cannot listen on {address} (in use or not a local address)")
    return port


# Connections the /metrics endpoint serves at once (each has a thread); more are closed.
METRICS_MAX_CONNECTIONS = 64
# Seconds one /metrics connection gets for its request, however it trickles in: a
# per-read timeout alone lets a client sending a byte every few seconds keep its
# thread (and with a few more like it, every slot) for good.
METRICS_TIMEOUT_S = 10.0


class _DeadlineSocketReader(io.RawIOBase):
    """A socket's reads, each given only what is left of one deadline for them all."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no request within {METRICS_TIMEOUT_S} s")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _QuietHandler(WSGIRequestHandler):
    # Applied to the connection's socket: also bounds writing the answer to a slow reader.
    timeout = METRICS_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        deadline = time.monotonic() + METRICS_TIMEOUT_S
        self.rfile = io.BufferedReader(_DeadlineSocketReader(self.connection, deadline))

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, at most METRICS_MAX_CONNECTIONS of them at once."""

    # socketserver's default backlog of 5 would leave connections past it waiting for
    # SYN retries (seconds) instead of being accepted and served, or closed at once.
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(METRICS_MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Every slot is taken (idle or slow clients): refuse rather than grow.
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away is worth a debug line, not a traceback."""
        log.debug("/metrics connection from %s failed", client_address, exc_info=True)


def _start_metrics_http(settings: Settings, registry: Any) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on a daemon thread (prometheus_client's app and threading server).

    Built here rather than with `prometheus_client.start_http_server` for a
    short shutdown poll: stopping the server must not stall for half a second.
    """
    host = bind_host(settings.host)

    class Server(_BoundedServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        httpd = make_server(
            host,
            settings.metrics_port,
            prometheus_client.make_wsgi_app(registry),
            Server,
            handler_class=_QuietHandler,
        )
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {settings.host}:{settings.metrics_port}: {exc}"
        ) from exc
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="metrics-http", daemon=True
    )
    thread.start()
    return httpd, thread


def _http_server(
    settings: Settings,
    runtime: api.RuntimeApi,
    metrics: Metrics,
    token: str | None,
    replica: str,
    serving: Callable[[], bool],
) -> HttpServer:
    """The HTTP server of the three HTTP APIs over `runtime` (not listening yet)."""
    from convserve.server.protocols import convserve_http, oip_http, tfserving_rest

    check = auth.BearerTokenInterceptor(token).check if token is not None else None
    parser = JsonParser()

    def http_api(protocol: types.Protocol, model_label: Callable[[str], str]) -> HttpApi:
        return HttpApi(
            protocol,
            metrics,
            settings=settings,
            model_label=model_label,
            check_token=check,
            replica=replica,
            parser=parser,
        )

    oip_models = OipModels(runtime)
    oip = oip_http.OipHttp(
        oip_models, http_api(oip_http.PROTOCOL, oip_models.model_label), serving=serving
    )
    apis: list[Any] = [
        tfserving_rest.TfServingRest(
            runtime, http_api(tfserving_rest.PROTOCOL, runtime.model_label)
        ),
        oip,
        convserve_http.ConvserveHttp(
            runtime, http_api(convserve_http.PROTOCOL, runtime.model_label)
        ),
    ]
    background = []
    closers = []
    if settings.console:
        from convserve.server.protocols.console import Console
        from convserve.server.traffic import Traffic

        traffic = Traffic(
            metrics.registry,
            interval_s=settings.traffic_interval_s,
            window_s=settings.traffic_window_s,
        )
        background.append(traffic.run)
        console = Console(
            runtime,
            http_api(convserve_http.PROTOCOL, runtime.model_label),
            settings,
            traffic,
            token_required=token is not None,
            replica=replica,
        )
        apis.append(console)
        closers.append(console.close)
    return HttpServer(settings, [api.add_routes for api in apis], parser, background, closers)


async def start_server(
    settings: Settings, *, runtime: api.RuntimeApi | None = None, metrics: Metrics | None = None
) -> RunningServer:
    """Start serving `settings`; returns once every configured model has had its first
    load (a model that cannot load is retried in the background) and health follows the
    runtime's readiness.

    `runtime` and `metrics` default to a new `runtime.Runtime` and
    `metrics.Metrics`; tests may pass stand-ins: any `api.RuntimeApi`, and metrics with
    `Metrics`' request accounting (`api.RequestMetrics`) and registry.
    Raises StartupError (port unavailable), SettingsError (unreadable TLS
    or token files) or the runtime's errors (e.g. no loadable model with
    exit_on_load_error).
    """
    if metrics is None:
        metrics = Metrics()
    if runtime is None:
        from convserve.server.runtime import Runtime

        runtime = Runtime(settings, metrics)

    server = grpc.aio.server(interceptors=_interceptors(settings), options=grpc_options(settings))
    replica = settings.resolved_replica_name()
    options = AdapterOptions(
        max_typed_payload_bytes=settings.max_typed_payload_bytes,
        max_stream_in_flight=settings.max_stream_in_flight,
        replica=replica,
    )
    services: list[str] = []
    for adapter in ADAPTERS:
        services += adapter.add_to_server(server, runtime, metrics, options)
    token = settings.read_auth_token()
    health = auth.GuardedHealthServicer(
        auth.BearerTokenInterceptor(token).check if token is not None else None
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*services, HEALTH_SERVICE, reflection.SERVICE_NAME], server
    )
    health.public |= {LIVENESS, READINESS, *services}
    port = _add_port(server, settings)
    metrics_http = _start_metrics_http(settings, metrics.registry)
    http = None
    if settings.rest_port != 0:
        # `running` is assigned below, before any request can reach the server.
        http = _http_server(settings, runtime, metrics, token, replica, lambda: running.serving)

    running = RunningServer(
        settings=settings,
        server=server,
        health=health,
        runtime=runtime,
        metrics=metrics,
        port=port,
        metrics_http=metrics_http,
        services=services,
        http=http,
    )
    try:
        # Probes may connect while the model loads; they must see NOT_SERVING, not an error.
        await running.set_serving(False)
        await server.start()
        if http is not None:
            running.rest_port = await http.start()
        await runtime.start()
    except BaseException:
        await server.stop(0)
        if http is not None:
            await http.stop()
        running._stop_metrics_http()
        raise
    # Ready unless a model configured at start-up is not (e.g. an empty config file).
    await running.set_serving(runtime.ready)

    def follow(ready: bool) -> None:
        # The health update runs as a task of its own: nothing for the runtime to await.
        running.follow_readiness(ready)

    runtime.add_ready_listener(follow)
    log.info("%s", running.listening_line)
    if http is not None and settings.console:
        log.info("console page on %s/console/", running.rest_url)
    return running
