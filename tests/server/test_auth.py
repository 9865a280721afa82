"""Bearer-token authentication and (mutual) TLS, over real gRPC."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from convserve.server.app import RunningServer, start_server
from convserve.server.auth import BearerTokenInterceptor, service_of
from convserve.v1 import convserve_pb2, convserve_pb2_grpc
from convserve.v1.tensor_codec import to_tensor
from tests.conftest import require_tool
from tests.fake_metrics import FakeMetrics
from tests.fake_runtime import FakeModel, FakeRuntime
from tests.server.wire_helpers import settings_for

TOKEN = "t0ken-for-tests-5d1e"
REJECTIONS_LOGGER = "convserve.server.rejections"
PREDICT = convserve_pb2.PredictRequest(images=to_tensor(np.zeros((1, 28, 28), np.uint8)))


def test_service_of_method_path() -> None:
    assert service_of("/convserve.v1.ConvServe/Predict") == "convserve.v1.ConvServe"
    assert service_of("/grpc.health.v1.Health/Check") == "grpc.health.v1.Health"


@pytest.mark.parametrize(
    ("metadata", "accepted"),
    [
        ((("authorization", f"Bearer {TOKEN}"),), True),
        ((("authorization", f"bearer {TOKEN}"),), True),
        ((("x-other", "1"), ("authorization", f"Bearer  {TOKEN} ")), True),
        ((), False),
        (None, False),
        ((("authorization", TOKEN),), False),
        ((("authorization", f"Basic {TOKEN}"),), False),
        ((("authorization", f"Bearer {TOKEN}x"),), False),
        ((("authorization", f"Bearer {TOKEN[:-1]}"),), False),
        ((("authorization", "Bearer "),), False),
        ((("authorization", b"binary"),), False),
    ],
)
def test_token_check(metadata: object, accepted: bool) -> None:
    assert (BearerTokenInterceptor(TOKEN).check(metadata) is None) is accepted


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        BearerTokenInterceptor("")


@pytest.fixture
async def authed() -> AsyncIterator[RunningServer]:
    running = await start_server(
        settings_for(auth_token=TOKEN), runtime=FakeRuntime(), metrics=FakeMetrics()
    )
    try:
        yield running
    finally:
        await running.stop(0)


async def call_code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_calls_need_the_token(
    authed: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with grpc.aio.insecure_channel(authed.target) as channel:
        stub = convserve_pb2_grpc.ConvServeStub(channel)
        code, details = await call_code(stub.Predict(PREDICT))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "missing credentials" in details
        code, details = await call_code(
            stub.Predict(PREDICT, metadata=(("authorization", "Bearer wrong-token"),))
        )
        assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        reply = await stub.Predict(PREDICT, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert reply.model_name == "mnist"
    assert TOKEN not in caplog.text
    assert "wrong-token" not in caplog.text


async def test_rejections_are_logged_at_debug_and_counted_at_info(
    authed: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=REJECTIONS_LOGGER)
    async with grpc.aio.insecure_channel(authed.target) as channel:
        stub = convserve_pb2_grpc.ConvServeStub(channel)
        for _ in range(20):
            code, _ = await call_code(
                stub.Predict(PREDICT, metadata=(("authorization", "Bearer wrong-token"),))
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED
    records = [r for r in caplog.records if r.name == REJECTIONS_LOGGER]
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert (
        debug
        == ["rejected '/convserve.v1.ConvServe/Predict' with UNAUTHENTICATED: invalid bearer token"]
        * 20
    )
    # At most one INFO line per 10 s: the first rejection after a quiet spell, and a
    # timer an earlier test may have left due (the summary is shared by the process).
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert len(info) <= 2
    assert all(line.startswith("rejected ") and "UNAUTHENTICATED" in line for line in info)
    assert "wrong-token" not in caplog.text


async def test_other_protocols_and_unknown_methods_need_the_token(authed: RunningServer) -> None:
    async with grpc.aio.insecure_channel(authed.target) as channel:
        oip = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        code, _ = await call_code(oip.ServerLive(service_pb2.ServerLiveRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        live = await oip.ServerLive(
            service_pb2.ServerLiveRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        assert live.live
        unknown = channel.unary_unary("/convserve.v1.ConvServe/NoSuchMethod")
        code, _ = await call_code(unknown(b""))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = await call_code(unknown(b"", metadata=(("authorization", f"Bearer {TOKEN}"),)))
        assert code == grpc.StatusCode.UNIMPLEMENTED


async def test_health_and_reflection_stay_open(authed: RunningServer) -> None:
    async with grpc.aio.insecure_channel(authed.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflect.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        await call.done_writing()
        names = {s.name for s in answer.list_services_response.service}
        assert "convserve.v1.ConvServe" in names


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def _issue(cwd: Path, name: str, subject: str, ca: str | None, extensions: str) -> None:
    """Writes <name>.key and <name>.pem: self-signed when `ca` is None, else signed by it."""
    (cwd / f"{name}.ext").write_text(extensions + "\n")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=cwd)  # fmt: skip
    signer = (
        ["-signkey", f"{name}.key"] if ca is None else ["-CA", f"{ca}.pem", "-CAkey", f"{ca}.key"]
    )
    _openssl("x509", "-req", "-in", f"{name}.csr", *signer, "-days", "2", "-sha256",
             "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all from the CA."""
    root = tmp_path_factory.mktemp("pki")
    _issue(root, "ca", "/CN=convserve test CA", None, "basicConstraints=critical,CA:TRUE")
    _issue(root, "server", "/CN=localhost", "ca",
           "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")  # fmt: skip
    _issue(root, "client", "/CN=client", "ca", "extendedKeyUsage=clientAuth")
    return root


async def test_tls(pki: Path) -> None:
    settings = settings_for(tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    running = await start_server(settings, runtime=FakeRuntime(), metrics=FakeMetrics())
    try:
        credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
        async with grpc.aio.secure_channel(running.target, credentials) as channel:
            reply = await convserve_pb2_grpc.ConvServeStub(channel).Predict(PREDICT)
            assert reply.model_version == 2
        async with grpc.aio.insecure_channel(running.target) as plain:
            code, _ = await call_code(
                convserve_pb2_grpc.ConvServeStub(plain).Predict(PREDICT, timeout=10)
            )
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)


async def test_mutual_tls_needs_a_client_certificate(pki: Path) -> None:
    settings = settings_for(
        tls_cert=pki / "server.pem", tls_key=pki / "server.key", tls_client_ca=pki / "ca.pem"
    )
    running = await start_server(settings, runtime=FakeRuntime(), metrics=FakeMetrics())
    try:
        ca = (pki / "ca.pem").read_bytes()
        anonymous = grpc.ssl_channel_credentials(ca)
        async with grpc.aio.secure_channel(running.target, anonymous) as channel:
            code, _ = await call_code(
                convserve_pb2_grpc.ConvServeStub(channel).Predict(PREDICT, timeout=10)
            )
            assert code == grpc.StatusCode.UNAVAILABLE
        identified = grpc.ssl_channel_credentials(
            ca, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes()
        )
        async with grpc.aio.secure_channel(running.target, identified) as channel:
            reply = await convserve_pb2_grpc.ConvServeStub(channel).Predict(PREDICT)
            assert reply.model_name == "mnist"
    finally:
        await running.stop(0)


# -- health: open for probes, but no list of the models without the token ------------

BEARER = (("authorization", f"Bearer {TOKEN}"),)
WRONG = (("authorization", "Bearer wrong-token"),)
MISSING = "missing credentials: send metadata 'authorization: Bearer <token>'"
OK = grpc.StatusCode.OK
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_check(
    health: health_pb2_grpc.HealthStub, service: str, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[grpc.StatusCode, str, int | None]:
    """(code, details, status) of a Check; status None when the call failed."""
    try:
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service=service), metadata=metadata
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", None
    return OK, "", reply.status


async def test_the_servers_own_health_names_need_no_token(authed: RunningServer) -> None:
    async with grpc.aio.insecure_channel(authed.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "liveness", "readiness", "convserve.v1.ConvServe"):
            assert await health_check(health, name) == (OK, "", SERVING), name
            # Nor does a wrong token matter where none is needed.
            assert await health_check(health, name, WRONG) == (OK, "", SERVING), name


async def test_model_health_needs_the_token_whether_or_not_the_model_exists(
    authed: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    caplog.set_level(logging.DEBUG, logger=REJECTIONS_LOGGER)
    async with grpc.aio.insecure_channel(authed.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        # The same answers for a model that exists and one that does not: without the
        # token, health cannot be used to list the models.
        for name in ("mnist", "no-such-model"):
            assert await health_check(health, name) == (unauthenticated, MISSING, None)
            assert await health_check(health, name, WRONG) == (
                unauthenticated,
                "invalid bearer token",
                None,
            )
        assert await health_check(health, "mnist", BEARER) == (OK, "", SERVING)
        assert await health_check(health, "no-such-model", BEARER) == (
            grpc.StatusCode.NOT_FOUND,
            "",
            None,
        )
    debug = [
        r.getMessage()
        for r in caplog.records
        if r.name == REJECTIONS_LOGGER and r.levelno == logging.DEBUG
    ]
    # One line per rejected call, without the name asked about.
    rejected = [
        f"rejected health with UNAUTHENTICATED: {MISSING}",
        "rejected health with UNAUTHENTICATED: invalid bearer token",
    ]
    assert debug == rejected * 2
    assert "wrong-token" not in caplog.text
    assert TOKEN not in caplog.text


async def test_watching_model_health_needs_the_token(authed: RunningServer) -> None:
    async with grpc.aio.insecure_channel(authed.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("mnist", "no-such-model"):
            call = health.Watch(health_pb2.HealthCheckRequest(service=name))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
            assert (caught.value.code(), caught.value.details()) == (
                grpc.StatusCode.UNAUTHENTICATED,
                MISSING,
            )
        for name, metadata in (("mnist", BEARER), ("readiness", ())):
            call = health.Watch(health_pb2.HealthCheckRequest(service=name), metadata=metadata)
            reply = await call.read()
            call.cancel()
            assert reply.status == SERVING, name


async def test_liveness_stays_serving_while_no_model_is_ready() -> None:
    runtime = FakeRuntime([FakeModel("mnist", ready=False)])
    running = await start_server(
        settings_for(auth_token=TOKEN), runtime=runtime, metrics=FakeMetrics()
    )
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert await health_check(health, "liveness") == (OK, "", SERVING)
            assert await health_check(health, "readiness") == (OK, "", NOT_SERVING)
            assert await health_check(health, "") == (OK, "", NOT_SERVING)
            assert await health_check(health, "mnist", BEARER) == (OK, "", NOT_SERVING)
            code, _, _ = await health_check(health, "mnist")
            assert code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await running.stop(0)


async def test_without_a_token_model_health_is_open(
    stub: tuple[RunningServer, FakeRuntime, FakeMetrics],
) -> None:
    running, _, _ = stub
    async with grpc.aio.insecure_channel(running.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert await health_check(health, "mnist") == (OK, "", SERVING)
        assert await health_check(health, "no-such-model") == (grpc.StatusCode.NOT_FOUND, "", None)
