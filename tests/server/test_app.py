"""The assembled server's lifecycle: health, reflection, limits, logging, graceful stop.

These use a stand-in runtime so that start-up and shutdown can be held at
any point; tests/server/test_errors_over_wire.py and test_prometheus.py run
the real runtime with the trained model.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from convserve.server import app, errors
from convserve.server.app import RunningServer, grpc_options, start_server
from convserve.server.listen import StartupError
from convserve.server.logs import (
    REQUEST_ID,
    JsonFormatter,
    RequestIdFilter,
    RequestIds,
    configure_logging,
)
from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from convserve.v1.tensor_codec import to_tensor
from tests.fake_metrics import FakeMetrics
from tests.fake_runtime import FakeRuntime
from tests.polling import until, wait_for
from tests.reference import IMAGE7, W7, Y7, edge_image
from tests.server.wire_helpers import (
    kill_process,
    scrape,
    server_env,
    settings_for,
    start_server_process,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PREDICT = convserve_pb2.PredictRequest(images=to_tensor(np.full((1, 28, 28), 3, np.uint8)))
ALL_SERVICES = {
    "convserve.v1.ConvServe",
    "inference.GRPCInferenceService",
    "tensorflow.serving.PredictionService",
    "tensorflow.serving.ModelService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
}


def health_status(target: str, service: str = "") -> int:
    """The health status of `service` (blocking: run it in a thread beside the server)."""
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


@pytest.fixture
def bound_ports(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The ports a starting server has bound ("grpc", "metrics"), read back as it binds
    them (on port 0), before `start_server` returns."""
    ports: dict[str, int] = {}
    add_port, start_metrics_http = app._add_port, app._start_metrics_http

    def recorded_add_port(server: grpc.aio.Server, settings: Any) -> int:
        ports["grpc"] = add_port(server, settings)
        return ports["grpc"]

    def recorded_metrics_http(settings: Any, registry: Any) -> Any:
        httpd, thread = start_metrics_http(settings, registry)
        ports["metrics"] = httpd.server_port
        return httpd, thread

    monkeypatch.setattr(app, "_add_port", recorded_add_port)
    monkeypatch.setattr(app, "_start_metrics_http", recorded_metrics_http)
    return ports


@pytest.fixture
async def served() -> AsyncIterator[tuple[RunningServer, FakeRuntime]]:
    runtime = FakeRuntime()
    running = await start_server(settings_for(), runtime=runtime, metrics=FakeMetrics())
    try:
        yield running, runtime
    finally:
        await running.stop(0)


async def test_health_is_not_serving_until_the_model_is_warm(
    bound_ports: dict[str, int],
) -> None:
    runtime = FakeRuntime(start_gate=asyncio.Event())
    starting = asyncio.create_task(
        start_server(settings_for(), runtime=runtime, metrics=FakeMetrics())
    )
    port = await until(lambda: bound_ports.get("grpc"), what="the gRPC port bound")
    target = f"127.0.0.1:{port}"
    # Refused until the server listens; then NOT_SERVING while the model loads.
    await asyncio.to_thread(
        wait_for,
        lambda: health_status(target) == NOT_SERVING,
        what="health NOT_SERVING",
        retry_on=(grpc.RpcError,),
    )
    assert await asyncio.to_thread(health_status, target, "convserve.v1.ConvServe") == NOT_SERVING
    assert not starting.done()
    assert runtime.start_gate is not None
    runtime.start_gate.set()
    running = await starting
    try:
        assert running.port == port
        assert await asyncio.to_thread(health_status, target) == SERVING
        for service in ("convserve.v1.ConvServe", "inference.GRPCInferenceService"):
            assert await asyncio.to_thread(health_status, target, service) == SERVING
    finally:
        await running.stop(0)


async def test_listening_line_reports_the_chosen_ports(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="convserve")
    running = await start_server(settings_for(), runtime=FakeRuntime(), metrics=FakeMetrics())
    try:
        assert running.port > 0
        assert running.metrics_port > 0
        assert running.port != running.metrics_port
        expected = (
            f"convserve-server listening on 127.0.0.1:{running.port} "
            f"metrics on :{running.metrics_port}"
        )
        assert expected in caplog.messages
    finally:
        await running.stop(0)


async def test_reflection_lists_every_service(served: tuple[RunningServer, FakeRuntime]) -> None:
    def listed() -> tuple[set[str], list[str], list[str]]:
        with grpc.insecure_channel(served[0].target) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            from google.protobuf.descriptor_pool import DescriptorPool

            pool = DescriptorPool(database)
            service = pool.FindServiceByName("convserve.v1.ConvServe")
            streaming = [
                m.name for m in service.methods if m.client_streaming and m.server_streaming
            ]
            return services, [m.name for m in service.methods], streaming

    services, methods, streaming = await asyncio.to_thread(listed)
    assert services == ALL_SERVICES
    assert methods == [
        "Predict", "PredictStream", "Convolve", "FitKernel", "GetFeatureMaps", "GetModelMetadata",
        "ListModels",
    ]  # fmt: skip
    assert streaming == ["PredictStream"]


async def test_metrics_endpoint_serves_the_registry(
    served: tuple[RunningServer, FakeRuntime],
) -> None:
    async with grpc.aio.insecure_channel(served[0].target) as channel:
        await convserve_pb2_grpc.ConvServeStub(channel).Predict(PREDICT)
    samples = await asyncio.to_thread(scrape, served[0].metrics_port)
    key = (
        "convserve_requests_total",
        (("code", "OK"), ("protocol", "convserve"), ("rpc", "Predict")),
    )
    assert samples[key] == 1.0


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes `sock` (recv returns b"") within `within_s`."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        return True


async def test_metrics_endpoint_bounds_its_connections_and_their_idle_time(
    served: tuple[RunningServer, FakeRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    port = served[0].metrics_port
    limit = app.METRICS_MAX_CONNECTIONS
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(limit + 8)]
    try:
        # Past the limit, connections are closed at once instead of each getting a thread
        # (the server accepts one at a time: generous bound); the others stay open.
        closed = await asyncio.gather(
            *(asyncio.to_thread(_closed_by_server, s, 5) for s in idle[limit:])
        )
        assert all(closed), closed
        still_open = [not await asyncio.to_thread(_closed_by_server, s, 0.01) for s in idle[:2]]
        assert all(still_open)
        handlers = [t for t in threading.enumerate() if "process_request" in t.name]
        assert len(handlers) <= limit
    finally:
        for sock in idle:
            sock.close()
    # An idle connection loses its thread after the timeout (10 s; 0.5 s here).
    monkeypatch.setattr(app, "METRICS_TIMEOUT_S", 0.5)
    with socket.create_connection(("127.0.0.1", port)) as lingering:
        assert await asyncio.to_thread(_closed_by_server, lingering, 10)
    # Scrapes are served again.
    async with grpc.aio.insecure_channel(served[0].target) as channel:
        await convserve_pb2_grpc.ConvServeStub(channel).Predict(PREDICT)
    samples = await asyncio.to_thread(scrape, port)
    assert any(name == "convserve_requests_total" for name, _ in samples)


async def test_clients_trickling_their_requests_hold_no_scrape_back(
    served: tuple[RunningServer, FakeRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 connections sending a byte at a time, each well within a per-read timeout,
    once held every slot; now each gets one deadline for its whole request."""

    monkeypatch.setattr(app, "METRICS_TIMEOUT_S", 1.0)
    port = served[0].metrics_port
    async with grpc.aio.insecure_channel(served[0].target) as channel:
        await convserve_pb2_grpc.ConvServeStub(channel).Predict(PREDICT)
    trickling = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
    stop = asyncio.Event()

    async def trickle(sock: socket.socket) -> bool:
        """Sends a byte every 0.3 s until the server closes the connection."""
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 100
        for byte in request:
            if stop.is_set():
                return False
            try:
                await asyncio.to_thread(sock.send, bytes([byte]))
            except OSError:
                return True
            if await asyncio.to_thread(_closed_by_server, sock, 0.3):
                return True
        return False

    try:
        tasks = [asyncio.create_task(trickle(sock)) for sock in trickling]
        # Scrapes meanwhile: every one answered.
        for _ in range(5):
            samples = await asyncio.to_thread(scrape, port)
            assert any(name == "convserve_requests_total" for name, _ in samples)
        # Each trickling connection is closed at its deadline (1 s here), not kept.
        closed = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        assert all(closed), closed
    finally:
        stop.set()
        for sock in trickling:
            sock.close()


async def test_health_follows_the_runtimes_readiness(
    served: tuple[RunningServer, FakeRuntime],
) -> None:
    running = served[0]

    async def status() -> int:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            return int(reply.status)

    assert await status() == health_pb2.HealthCheckResponse.SERVING
    update = running.follow_readiness(False)  # e.g. every model worker hung
    assert update is not None
    await update
    assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
    update = running.follow_readiness(True)
    assert update is not None
    await update
    assert await status() == health_pb2.HealthCheckResponse.SERVING
    running.stopping = True  # a stop in progress: health is the stop's to set
    assert running.follow_readiness(True) is None


async def test_messages_over_the_limit_are_refused_by_grpc() -> None:
    running = await start_server(
        settings_for(max_message_bytes=100_000), runtime=FakeRuntime(), metrics=FakeMetrics()
    )
    try:
        big = convserve_pb2.PredictRequest(images=to_tensor(np.zeros((200, 784), np.uint8)))
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = convserve_pb2_grpc.ConvServeStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Predict(big)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await stub.Predict(PREDICT)).model_name == "mnist"
    finally:
        await running.stop(0)


async def test_graceful_stop_turns_health_off_first_and_finishes_accepted_calls() -> None:
    runtime = FakeRuntime(gate=asyncio.Event())
    running = await start_server(settings_for(), runtime=runtime, metrics=FakeMetrics())
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = convserve_pb2_grpc.ConvServeStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        accepted = [asyncio.ensure_future(stub.Predict(PREDICT)) for _ in range(8)]
        await until(lambda: runtime.started_predictions == 8, what="8 predictions started")
        stopping = asyncio.create_task(running.stop(30))
        # Readiness turns false while the accepted calls are still running.
        assert (await watch.read()).status == NOT_SERVING
        watch.cancel()
        assert not any(call.done() for call in accepted)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Predict(PREDICT, timeout=10)
        # Refused: UNAVAILABLE once the client has read the GOAWAY; a call already on its
        # way when the server stopped taking streams is reset, which gRPC core reports
        # as CANCELLED. Either way it never reached the runtime.
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert runtime.started_predictions == 8
        assert "runtime.stop" not in runtime.events
        assert runtime.gate is not None
        runtime.gate.set()
        replies = await asyncio.gather(*accepted)
        await stopping
    assert [r.digits[0] for r in replies] == [(3 * 784) % 10] * 8
    assert runtime.events == ["runtime.start", "runtime.stop"]
    assert running.stopped
    await running.wait_for_termination()
    await running.stop()  # a second stop is harmless


async def test_the_drain_sends_goaway_at_once_while_accepted_calls_finish() -> None:
    """A client with an open connection is told to go (GOAWAY) as soon as the stop begins,
    long before the server is gone; the call it had in flight still completes."""
    runtime = FakeRuntime(gate=asyncio.Event())
    running = await start_server(settings_for(), runtime=runtime, metrics=FakeMetrics())
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = convserve_pb2_grpc.ConvServeStub(channel)
        accepted = asyncio.ensure_future(stub.Predict(PREDICT))
        await until(lambda: runtime.started_predictions == 1, what="the prediction started")
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        stopping = asyncio.create_task(running.stop(30))
        # GOAWAY takes the connection out of service for new calls: the channel
        # leaves READY while the accepted call still runs on that connection.
        await until(
            lambda: channel.get_state() != grpc.ChannelConnectivity.READY,
            what="the channel to leave READY",
            timeout_s=10,
        )
        assert not accepted.done()
        assert not stopping.done()
        assert runtime.gate is not None
        runtime.gate.set()
        reply = await accepted
        await stopping
    assert reply.digits[0] == (3 * 784) % 10
    assert runtime.started_predictions == 1


async def test_every_answer_names_the_replica_that_gave_it() -> None:
    """`convserve-replica` trailing metadata on unary answers of every protocol, on
    errors too, and at the end of a PredictStream stream."""
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    running = await start_server(
        settings_for(replica_name="replica-b"), runtime=FakeRuntime(), metrics=FakeMetrics()
    )
    expected = ("convserve-replica", "replica-b")
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = convserve_pb2_grpc.ConvServeStub(channel)
            call = stub.Predict(PREDICT)
            await call
            assert expected in tuple(await call.trailing_metadata())

            bad = stub.Predict(convserve_pb2.PredictRequest())  # no images
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await bad
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert expected in tuple(failed.value.trailing_metadata())

            stream = stub.PredictStream(
                iter([convserve_pb2.PredictStreamRequest(id=7, request=PREDICT)])
            )
            answers = [answer.id async for answer in stream]
            assert answers == [7]
            assert expected in tuple(await stream.trailing_metadata())

            oip = service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(
                service_pb2.ServerLiveRequest()
            )
            await oip
            assert expected in tuple(await oip.trailing_metadata())

            tfs = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                predict_pb2.PredictRequest()
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await tfs
            assert expected in tuple(await tfs.trailing_metadata())
    finally:
        await running.stop(0)


def test_replica_name_defaults_to_the_host_name() -> None:
    assert settings_for().resolved_replica_name() == socket.gethostname()


def test_server_options_carry_connection_age_and_keepalive() -> None:
    options = dict(grpc_options(settings_for(max_connection_age_s=2.5, keepalive_time_s=45)))
    assert options["grpc.max_connection_age_ms"] == 2500
    assert options["grpc.max_connection_age_grace_ms"] == 60_000
    assert options["grpc.keepalive_time_ms"] == 45_000
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0
    # 0 leaves gRPC's default, connections that never age.
    ageless = dict(grpc_options(settings_for(max_connection_age_s=0, max_connection_age_grace_s=0)))
    assert "grpc.max_connection_age_ms" not in ageless
    assert "grpc.max_connection_age_grace_ms" not in ageless


async def test_connections_are_closed_after_the_max_connection_age() -> None:
    age_s = 0.5
    running = await start_server(
        settings_for(max_connection_age_s=age_s), runtime=FakeRuntime(), metrics=FakeMetrics()
    )
    clock = asyncio.get_running_loop().time
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = convserve_pb2_grpc.ConvServeStub(channel)
            # The channel connects for this first call, so its connection is younger than this.
            connecting = clock()
            reply = await stub.Predict(PREDICT, timeout=10)
            assert reply.digits[0] == (3 * 784) % 10
            # The server's GOAWAY after the age: the channel drops the connection (IDLE).
            # If that already happened (a slow machine), the wait returns at once; a
            # connection that never ages makes it time out.
            await asyncio.wait_for(
                channel.wait_for_state_change(grpc.ChannelConnectivity.READY), timeout=10
            )
            lived_s = clock() - connecting
            assert channel.get_state() != grpc.ChannelConnectivity.READY
            # Not closed early (gRPC's jitter takes up to 10 percent off the age); a late
            # close only makes this longer, so a busy machine cannot fail it.
            assert lived_s >= 0.8 * age_s
            # A new call reconnects.
            reply = await stub.Predict(PREDICT, timeout=10)
            assert reply.digits[0] == (3 * 784) % 10
    finally:
        await running.stop(0)


async def test_calls_still_running_when_the_grace_period_ends_are_cancelled() -> None:
    runtime = FakeRuntime(gate=asyncio.Event())
    running = await start_server(settings_for(), runtime=runtime, metrics=FakeMetrics())
    async with grpc.aio.insecure_channel(running.target) as channel:
        call = asyncio.ensure_future(convserve_pb2_grpc.ConvServeStub(channel).Predict(PREDICT))
        await until(lambda: runtime.started_predictions == 1, what="the prediction started")
        await asyncio.wait_for(running.stop(0.2), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert runtime.stopped_with is not None
    assert runtime.stopped_with <= 0.2


async def test_failed_model_load_releases_the_ports(bound_ports: dict[str, int]) -> None:
    with pytest.raises(errors.Unavailable, match="no loadable model"):
        await start_server(
            settings_for(), runtime=FakeRuntime(fail_start=True), metrics=FakeMetrics()
        )
    # Both ports the failed start had bound are free again: a new server can take them.
    ports = (bound_ports["grpc"], bound_ports["metrics"])
    settings = settings_for(port=ports[0], metrics_port=ports[1])
    running = await start_server(settings, runtime=FakeRuntime(), metrics=FakeMetrics())
    try:
        assert (running.port, running.metrics_port) == ports
    finally:
        await running.stop(0)


async def test_a_taken_port_is_a_clear_startup_error(
    served: tuple[RunningServer, FakeRuntime],
) -> None:
    with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{served[0].port}"):
        await start_server(
            settings_for(port=served[0].port), runtime=FakeRuntime(), metrics=FakeMetrics()
        )
    with pytest.raises(StartupError, match="cannot serve metrics"):
        await start_server(
            settings_for(metrics_port=served[0].metrics_port),
            runtime=FakeRuntime(),
            metrics=FakeMetrics(),
        )


def test_json_log_lines() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("convserve.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        token = REQUEST_ID.set("req-7")
        logger.warning("model %s loaded", "v3", extra={"version": 3})
        REQUEST_ID.reset(token)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines() if line[:1] == "{")
    assert first["message"] == "model v3 loaded"
    assert (first["level"], first["request_id"], first["version"]) == ("WARNING", "req-7", 3)
    assert first["time"].endswith("+00:00")
    assert second["request_id"] == "-"
    assert "ValueError: boom" in second["exception"]


def test_configure_logging_text_format() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("text", "warning", stream)
        logging.getLogger("convserve.test.text").info("hidden")
        logging.getLogger("convserve.test.text").warning("shown")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "hidden" not in stream.getvalue()
    assert "WARNING convserve.test.text [-] shown" in stream.getvalue()


def test_request_ids_come_from_the_caller_or_are_made_up() -> None:
    ids = RequestIds()
    assert ids.request_id((("x-request-id", "abc-123"),)) == "abc-123"
    made = {ids.request_id(()) for _ in range(3)}
    assert len(made) == 3
    hostile = ids.request_id((("x-request-id", "a\nb"),))
    assert "\n" not in hostile


async def test_every_log_line_of_a_call_carries_its_request_id(
    served: tuple[RunningServer, FakeRuntime],
) -> None:
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "predicting":
                seen.append(record.request_id)  # type: ignore[attr-defined]

    handler = Collect()
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("convserve.test.rid")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    runtime = served[1]
    real = runtime.predict

    async def logging_predict(value: object, **kwargs: object) -> object:
        logger.info("predicting")
        result = await real(value, **kwargs)  # type: ignore[arg-type]
        logger.info("predicting")  # the same call: the same id, however it was made
        return result

    runtime.predict = logging_predict  # type: ignore[assignment, method-assign]
    try:
        async with grpc.aio.insecure_channel(served[0].target) as channel:
            stub = convserve_pb2_grpc.ConvServeStub(channel)
            await stub.Predict(PREDICT, metadata=(("x-request-id", "client-id-1"),))
            await stub.Predict(PREDICT)
    finally:
        logger.removeHandler(handler)
    assert seen[:2] == ["client-id-1", "client-id-1"]
    assert seen[2] == seen[3]
    assert seen[2] not in ("client-id-1", "-")


# -- the real server ---------------------------------------------------------

SEVEN = np.array(IMAGE7, dtype=np.float64)
SEVEN_W = np.array(W7, dtype=np.float64)


@pytest.fixture(scope="module")
def real_server(model_base_path: Path) -> Iterator[Any]:
    from tests.interop.loop_thread import serving

    with serving(settings_for(model_base_path)) as server:
        yield server


@pytest.fixture(scope="module")
def client(real_server: Any) -> Iterator[Any]:
    from convserve.client import ConvServeClient

    with ConvServeClient(real_server.target, timeout_s=120) as sdk:
        yield sdk


@pytest.mark.slow
def test_reference_cross_correlation(client: Any) -> None:
    x = np.arange(9, dtype=np.float64).reshape(3, 3)
    y = client.convolve(x, np.array([[0.0, 1.0], [2.0, 3.0]]))
    np.testing.assert_allclose(y, [[19, 25], [37, 43]])


@pytest.mark.slow
def test_reference_seven_by_seven_with_bias(client: Any) -> None:
    y = client.convolve(SEVEN, SEVEN_W, np.array([1.0]))
    np.testing.assert_allclose(y, Y7)


@pytest.mark.slow
def test_reference_edge_detection(client: Any) -> None:
    y = client.convolve(edge_image(), np.array([[1.0, -1.0]]))
    expected = np.zeros((6, 7))
    expected[:, 1] = 1
    expected[:, 5] = -1
    np.testing.assert_allclose(y, expected)
    flipped = client.convolve(edge_image(), np.array([[-1.0, 1.0]]), mode="convolution")
    np.testing.assert_allclose(flipped, expected)


@pytest.mark.slow
def test_reference_fit_kernel_recovers_the_edge_detector(client: Any) -> None:
    x = edge_image()
    y = client.convolve(x, np.array([[1.0, -1.0]]))
    result = client.fit_kernel(x, y, [1, 2], tolerance=1e-8)
    np.testing.assert_allclose(result.kernel, [[1.0, -1.0]], atol=0.05)
    assert result.loss[-1] < result.loss[0]


@pytest.mark.slow
def test_real_server_health_metadata_and_prediction(
    real_server: Any, client: Any, sample_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    assert client.health() == "SERVING"
    meta = client.metadata()
    assert meta.model_name == "mnist"
    images, labels = sample_digits
    result = client.predict(images[:32])
    digits = [p.digit for p in result.predictions]
    assert np.mean(np.array(digits) == labels[:32]) > 0.5
    assert result.model_version == 1


@pytest.mark.slow
def test_real_server_streams_64_concurrent_callers(
    real_server: Any, client: Any, sample_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    from convserve.client import AsyncConvServeClient

    digits = sample_digits[0]
    # Shifted copies: 64 different images from the 20 held-out digits.
    shifted = [np.roll(digits, shift, axis=axis) for axis in (1, 2) for shift in (-1, 1)]
    images = np.concatenate([digits, *shifted])[:64]
    unary = client.predict(images)

    async def streamed() -> list[Any]:
        async with (
            AsyncConvServeClient(real_server.target, timeout_s=120) as sdk,
            sdk.predict_stream() as one,
            sdk.predict_stream() as two,
        ):
            streams = (one, two)
            return await asyncio.gather(*(streams[i % 2].predict(images[i]) for i in range(64)))

    results = asyncio.run(streamed())
    for i, result in enumerate(results):
        (prediction,) = result.predictions
        assert prediction.digit == unary.predictions[i].digit
        np.testing.assert_allclose(
            prediction.probabilities, unary.predictions[i].probabilities, atol=1e-6
        )


# -- the command ---------------------------------------------------------------


def test_main_refuses_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from convserve.server.__main__ import main

    assert main(["--port", "not-a-port", "--max-batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert "--port / CONVSERVE_PORT" in err
    assert "--max-batch-size / CONVSERVE_MAX_BATCH_SIZE" in err
    assert main(["--bogus"]) == 2
    assert main(["--help"]) == 0
    assert "--max-queued-images" in capsys.readouterr().out


def test_main_sets_the_switch_interval_before_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    from convserve.server import __main__ as entry

    order: list[object] = []
    monkeypatch.setattr(entry.sys, "setswitchinterval", lambda s: order.append(s))

    def run(coroutine: Any) -> int:
        coroutine.close()  # the server itself is not the point here
        order.append("serve")
        return 0

    monkeypatch.setattr(entry.asyncio, "run", run)
    monkeypatch.setattr(entry, "configure_logging", lambda *args: None)
    assert entry.main(["--model-base-path", "m", "--switch-interval-us", "250"]) == 0
    assert order == [pytest.approx(250e-6), "serve"]


@pytest.mark.slow
def test_main_without_a_loadable_model_exits_2_with_exit_on_load_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "1").mkdir()  # a version directory without a SavedModel
    result = subprocess.run(
        [sys.executable, "-m", "convserve.server", "--model-base-path", str(tmp_path),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--exit-on-load-error", "true"],
        capture_output=True, text=True, timeout=240,
        env=server_env(),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot start" in result.stderr


@pytest.mark.slow
def test_sigterm_under_load_finishes_accepted_requests(
    model_base_path: Path, sample_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    import signal
    import threading
    import time

    server = start_server_process(
        ["--model-base-path", str(model_base_path), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", "--grace-period-s", "30", "--log-format", "json"]
    )  # fmt: skip
    try:
        assert any('"message": "convserve-server listening on' in line for line in server.lines)
        # Large requests keep calls in flight (several batches each) when the signal lands.
        images = np.resize(np.asarray(sample_digits[0], dtype=np.uint8), (128, 28, 28))
        request = convserve_pb2.PredictRequest(images=to_tensor(images))
        # (code, sent, answered) per call, on time.monotonic().
        outcomes: list[tuple[grpc.StatusCode, float, float]] = []
        lock = threading.Lock()
        answered = threading.Event()

        def client_loop() -> None:
            with grpc.insecure_channel(server.target) as channel:
                stub = convserve_pb2_grpc.ConvServeStub(channel)
                code = grpc.StatusCode.OK
                while code == grpc.StatusCode.OK:
                    sent = time.monotonic()
                    try:
                        stub.Predict(request, timeout=60)
                    except grpc.RpcError as exc:
                        code = exc.code()
                    with lock:
                        outcomes.append((code, sent, time.monotonic()))
                    answered.set()

        threads = [threading.Thread(target=client_loop) for _ in range(8)]
        for thread in threads:
            thread.start()
        assert answered.wait(120)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        exit_code = server.process.wait(timeout=60)
        for thread in threads:
            thread.join(timeout=120)
        assert exit_code == 0, "".join(server.lines[-30:])
        codes = {code for code, _, _ in outcomes}
        # After the signal, calls are refused: UNAVAILABLE, or CANCELLED for a call the
        # transport had received but gRPC had not yet handed to the server (gRPC core's
        # shutdown behaviour, grpc/grpc#41785); no handler ran for those.
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
        # Calls already running when the signal came were finished, not dropped.
        running_at_signal = [
            code for code, sent, done in outcomes if sent < signalled - 0.1 and done > signalled
        ]
        assert all(code == grpc.StatusCode.OK for code in running_at_signal), running_at_signal
        assert sum(code == grpc.StatusCode.OK for code, _, _ in outcomes) > 0
        assert any("stopped" in line for line in server.lines)
    finally:
        kill_process(server)


async def test_serve_stops_gracefully_on_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from convserve.server import __main__ as command

    runtime = FakeRuntime(gate=asyncio.Event())
    started: list[RunningServer] = []
    real_start = app.start_server

    async def start_with_stub(settings: Any) -> RunningServer:
        running = await real_start(settings, runtime=runtime, metrics=FakeMetrics())
        started.append(running)
        return running

    monkeypatch.setattr(app, "start_server", start_with_stub)
    serving = asyncio.create_task(command.serve(settings_for(grace_period_s=30)))
    await until(lambda: started, what="the server started")
    async with grpc.aio.insecure_channel(started[0].target) as channel:
        call = asyncio.ensure_future(convserve_pb2_grpc.ConvServeStub(channel).Predict(PREDICT))
        await until(lambda: runtime.started_predictions == 1, what="the prediction started")
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: started[0].stopping, what="the drain to begin")
        assert not serving.done()
        assert runtime.gate is not None
        runtime.gate.set()
        assert (await call).model_name == "mnist"
    assert await serving == 0
    assert runtime.events == ["runtime.start", "runtime.stop"]


async def test_serve_exits_cleanly_when_stopped_during_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import signal

    from convserve.server import __main__ as command

    runtime = FakeRuntime(start_gate=asyncio.Event())
    real_start = app.start_server

    async def start_with_stub(settings: Any) -> RunningServer:
        return await real_start(settings, runtime=runtime, metrics=FakeMetrics())

    monkeypatch.setattr(app, "start_server", start_with_stub)
    serving = asyncio.create_task(command.serve(settings_for()))
    await until(lambda: runtime.events == ["runtime.start"], what="the model to be loading")
    os.kill(os.getpid(), signal.SIGINT)
    assert await asyncio.wait_for(serving, timeout=30) == 0


async def test_serve_reports_a_failed_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from convserve.server import __main__ as command

    real_start = app.start_server

    async def start_with_stub(settings: Any) -> RunningServer:
        return await real_start(
            settings, runtime=FakeRuntime(fail_start=True), metrics=FakeMetrics()
        )

    monkeypatch.setattr(app, "start_server", start_with_stub)
    assert await command.serve(settings_for()) == 2
    assert "cannot start: no loadable model version" in capsys.readouterr().err
