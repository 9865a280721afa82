"""The load generator over HTTP (TF Serving REST, KServe v2 with binary tensors) against a
small aiohttp server that answers as convserve's HTTP API does, with known behaviour."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from aiohttp import web

from convserve.client import bench, bench_config, bench_http, bench_requests, cli
from convserve.client.bench_config import BenchConfig, Phase
from convserve.client.channel import TlsConfig
from convserve.client.commands import bench as bench_command
from convserve.client.errors import (
    InputError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
    UnavailableError,
)

from .conftest import Certs
from .fakes import nothing_listens

IMAGES, _ = bench_requests.synthetic_digits(32)
MODEL = "mnist"
# A model whose KServe v2 metadata declares no inputs (as MLServer's default).
UNDECLARED = "undeclared"
CLASSES = 10

# --- The server ------------------------------------------------------------------------


@dataclass
class HttpBehaviour:
    """How the fake HTTP server answers; what it saw."""

    delay_s: float = 0.0
    # Predict / infer: the first `fail_after` succeed, then `fail_next` answer `fail_status`.
    fail_after: int = 0
    fail_next: int = 0
    fail_status: int = 503
    token: str | None = None
    # The TF Serving signatures the model has: name -> (dtype, shape).
    signatures: dict[str, tuple[str, list[int]]] = field(
        default_factory=lambda: {
            "serving_default": ("DT_FLOAT", [-1, 28, 28, 1]),
            "predict_uint8": ("DT_UINT8", [-1, 28, 28, 1]),
        }
    )
    replica: str | None = None
    rows_answered: int | None = None  # answer this many rows whatever was asked (bad server)
    calls: Counter[str] = field(default_factory=Counter)
    # Predict: (signature_name, instances as an array); infer: (JSON header, input array).
    requests: list[tuple[Any, np.ndarray]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _app(behaviour: HttpBehaviour) -> web.Application:
    def refused(request: web.Request, model: str) -> web.Response | None:
        """The answer to a request without the token or for an unknown model, if any."""
        token = behaviour.token
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return _error(401, "missing or wrong bearer token")
        if model not in (MODEL, UNDECLARED):
            return _error(404, f"unknown model '{model}'")
        return None

    async def answer_or_fail(request: web.Request, method: str) -> web.Response | None:
        behaviour.calls[method] += 1
        behaviour.headers.append(dict(request.headers))
        await asyncio.sleep(behaviour.delay_s)
        n = behaviour.calls[method]
        if behaviour.fail_after < n <= behaviour.fail_after + behaviour.fail_next:
            return _error(behaviour.fail_status, "failing on purpose")
        return None

    def replica_headers() -> dict[str, str]:
        return {bench_http.REPLICA_HEADER: behaviour.replica} if behaviour.replica else {}

    async def tf_metadata(request: web.Request) -> web.Response:
        model = request.match_info["name"]
        if (failure := refused(request, model)) is not None:
            return failure
        signatures = {
            name: {
                "inputs": {
                    "images": {
                        "dtype": dtype,
                        "tensor_shape": {"dim": [{"size": str(d)} for d in shape]},
                    }
                },
                "outputs": {"probabilities": {"dtype": "DT_FLOAT"}},
            }
            for name, (dtype, shape) in behaviour.signatures.items()
        }
        return web.json_response(
            {
                "model_spec": {"name": model, "version": "1"},
                "metadata": {"signature_def": {"signature_def": signatures}},
            }
        )

    async def predict(request: web.Request) -> web.Response:
        if (failure := refused(request, request.match_info["name"])) is not None:
            return failure
        body = json.loads(await request.read())
        if (failure := await answer_or_fail(request, "predict")) is not None:
            return failure
        instances = np.asarray(body["instances"])
        behaviour.requests.append((body["signature_name"], instances))
        rows = len(instances) if behaviour.rows_answered is None else behaviour.rows_answered
        predictions = [[1.0 / CLASSES] * CLASSES for _ in range(rows)]
        return web.json_response({"predictions": predictions}, headers=replica_headers())

    async def v2_metadata(request: web.Request) -> web.Response:
        model = request.match_info["name"]
        if (failure := refused(request, model)) is not None:
            return failure
        inputs = [] if model == UNDECLARED else [
            {"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28, 1]}
        ]  # fmt: skip
        return web.json_response({"name": model, "versions": ["1"], "inputs": inputs})

    async def infer(request: web.Request) -> web.Response:
        if (failure := refused(request, request.match_info["name"])) is not None:
            return failure
        body = await request.read()
        if (failure := await answer_or_fail(request, "infer")) is not None:
            return failure
        size = int(request.headers[bench_http.BINARY_HEADER])
        header = json.loads(body[:size])
        (tensor,) = header["inputs"]
        dtype = {"UINT8": "u1", "FP32": "<f4"}[tensor["datatype"]]
        values = np.frombuffer(body[size:], dtype).reshape(tensor["shape"])
        behaviour.requests.append((header, values))
        rows = values.shape[0] if behaviour.rows_answered is None else behaviour.rows_answered
        probabilities = np.full((rows, CLASSES), 1.0 / CLASSES, "<f4").tobytes()
        digits = np.zeros(rows, "<i4").tobytes()
        answer = json.dumps(
            {
                "model_name": request.match_info["name"],
                "outputs": [
                    {"name": "probabilities", "datatype": "FP32", "shape": [rows, CLASSES],
                     "parameters": {"binary_data_size": len(probabilities)}},
                    {"name": "digits", "datatype": "INT32", "shape": [rows],
                     "parameters": {"binary_data_size": len(digits)}},
                ],
            }
        ).encode()  # fmt: skip
        return web.Response(
            body=answer + probabilities + digits,
            content_type="application/octet-stream",
            headers={bench_http.BINARY_HEADER: str(len(answer)), **replica_headers()},
        )

    app = web.Application()
    app.router.add_get("/v1/models/{name}/metadata", tf_metadata)
    app.router.add_post("/v1/models/{name:[^/:]+}:predict", predict)
    app.router.add_get("/v2/models/{name}", v2_metadata)
    app.router.add_post("/v2/models/{name}/infer", infer)
    return app


@contextmanager
def serve_http(
    behaviour: HttpBehaviour, tls: ssl.SSLContext | None = None
) -> Iterator[str]:  # fmt: skip
    """The fake server on its own event loop thread; yields its ``127.0.0.1:PORT``."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(_app(behaviour), access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def config(target: str, protocol: str = "rest", **kwargs: Any) -> BenchConfig:
    defaults: dict[str, Any] = {"duration_s": 0.5, "warmup_s": 0.2, "model_name": MODEL}
    defaults.update(kwargs)
    return BenchConfig(target=target, images=IMAGES, protocol=protocol, **defaults)


# --- TF Serving REST ---------------------------------------------------------------------


def test_rest_closed_loop_latency_and_rate_follow_a_fixed_server_delay() -> None:
    delay_s = 0.050
    behaviour = HttpBehaviour(delay_s=delay_s)
    with serve_http(behaviour) as target:
        result = bench.measure(target, "rest", MODEL, IMAGES, 2, 1.0, warmup_s=0.2)
    assert result.errors == {}
    # The server sleeps at least delay_s, so no honest sample can be shorter.
    assert float(result.latencies_s.min()) >= delay_s
    assert result.percentile_s(50) <= delay_s * 1.5
    # Little's law: two users, each waiting out one request at a time.
    assert result.requests_per_s == pytest.approx(2 / result.latencies_s.mean(), rel=0.15)
    assert behaviour.calls["predict"] >= result.ok + 1  # and the first request
    # uint8 pixels through the uint8 signature, one image per request in the model's shape.
    signature, first = behaviour.requests[0]
    assert signature == "predict_uint8"
    assert first.dtype.kind == "i"
    np.testing.assert_array_equal(first, IMAGES[:1, :, :, np.newaxis])
    assert {s for s, _ in behaviour.requests} == {"predict_uint8"}
    assert {r.shape for _, r in behaviour.requests} == {(1, 28, 28, 1)}
    assert behaviour.headers[0]["Content-Type"] == "application/json"


def test_rest_sends_floats_to_serving_default_when_the_model_has_no_uint8_signature() -> None:
    behaviour = HttpBehaviour(signatures={"serving_default": ("DT_FLOAT", [-1, 784])})
    with serve_http(behaviour) as target:
        (result,) = bench.run(config(target, images_per_request=2), [Phase(rate=20)])
    assert result.errors == {}
    assert result.ok == 10  # exactly the requests scheduled in the 0.5 s window
    assert result.images_per_s == 2 * result.requests_per_s
    signature, first = behaviour.requests[0]
    assert signature == "serving_default"
    assert first.shape == (2, 784)
    np.testing.assert_allclose(first, IMAGES[:2].reshape(2, 784) / 255.0, rtol=1e-6)


def test_rest_needs_a_signature_it_can_fill() -> None:
    behaviour = HttpBehaviour(signatures={"classify": ("DT_STRING", [-1])})
    no_signature = "has no predict_uint8 or serving_default signature"
    with serve_http(behaviour) as target, pytest.raises(InputError, match=no_signature):
        bench.run(config(target), [Phase(rate=1)])
    assert behaviour.calls["predict"] == 0


# --- KServe v2 with binary tensors -------------------------------------------------------


def test_oip_http_sends_binary_tensors_and_asks_for_binary_outputs() -> None:
    behaviour = HttpBehaviour(delay_s=0.005)
    with serve_http(behaviour) as target:
        cfg = config(target, "oip-http", images_per_request=4)
        (result,) = bench.run(cfg, [Phase(rate=20)])
    assert result.errors == {}
    assert result.ok == 10
    assert result.images_per_s == 4 * result.requests_per_s
    header, first = behaviour.requests[0]
    assert header == {
        "inputs": [
            {
                "name": "images", "shape": [4, 28, 28, 1], "datatype": "UINT8",
                "parameters": {"binary_data_size": 4 * 28 * 28},
            }
        ],
        "parameters": {"binary_data_output": True},
    }  # fmt: skip
    np.testing.assert_array_equal(first, IMAGES[:4, :, :, np.newaxis])
    # The requests cycle through a pool of distinct batches of the images, in order.
    # 32 images make 8 distinct batches of 4.
    batches = [IMAGES[4 * k : 4 * k + 4, :, :, np.newaxis] for k in range(8)]
    sent = [
        next(k for k, batch in enumerate(batches) if np.array_equal(values, batch))
        for _, values in behaviour.requests
    ]
    # After the first request (before the load), batch 0 again, then the next ones.
    assert sent[1:] == [k % 8 for k in range(len(sent) - 1)]
    assert len(sent) > 10
    assert behaviour.headers[0]["Content-Type"] == "application/octet-stream"


def test_oip_http_input_flag_drives_a_model_whose_metadata_declares_none() -> None:
    behaviour = HttpBehaviour()
    with serve_http(behaviour) as target:
        with pytest.raises(InputError, match="'undeclared' declares no inputs"):
            bench.run(config(target, "oip-http", model_name=UNDECLARED), [Phase(rate=1)])
        spec = bench_requests.parse_oip_input("pixels:FP32:-1,28,28")
        cfg = config(target, "oip-http", model_name=UNDECLARED, oip_input=spec)
        (result,) = bench.run(cfg, [Phase(rate=10)])
    assert result.ok == 5
    header, first = behaviour.requests[0]
    assert header["inputs"][0]["datatype"] == "FP32"
    assert first.shape == (1, 28, 28)
    np.testing.assert_allclose(first, IMAGES[:1] / 255.0, rtol=1e-6)


# --- Answers and failures ----------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["rest", "oip-http"])
def test_error_answers_are_counted_by_the_status_they_stand_for(protocol: str) -> None:
    # The first request (before the load) succeeds, then five are refused as overloaded.
    behaviour = HttpBehaviour(fail_after=1, fail_next=5, fail_status=429)
    with serve_http(behaviour) as target:
        cfg = config(target, protocol, warmup_s=0.0, duration_s=0.5)
        (result,) = bench.run(cfg, [Phase(rate=40)])
    assert result.errors == {"RESOURCE_EXHAUSTED": 5}
    assert result.ok == 15
    # The first request, then exactly the 20 scheduled ones: nothing was sent again.
    assert sum(behaviour.calls.values()) == 21


def test_the_token_is_sent_and_the_replica_header_counted() -> None:
    behaviour = HttpBehaviour(token="s3cret", replica="r7")
    with serve_http(behaviour) as target:
        (result,) = bench.run(config(target, token="s3cret"), [Phase(concurrency=1)])
        assert result.errors == {}
        assert result.replicas == {"r7": result.ok}
        with pytest.raises(UnauthenticatedError, match="HTTP 401 UNAUTHENTICATED: missing or"):
            bench.run(config(target, token="wrong"), [Phase(concurrency=1)])


def test_setup_failures_name_the_request_and_the_status() -> None:
    with serve_http(HttpBehaviour()) as target:
        with pytest.raises(
            NotFoundError,
            match=rf"GET http://{target}/v1/models/nope/metadata for model 'nope' failed: "
            "HTTP 404 NOT_FOUND: unknown model 'nope'",
        ):
            bench.run(config(target, model_name="nope"), [Phase(rate=1)])
        with pytest.raises(NotFoundError, match=rf"GET http://{target}/v2/models/nope for"):
            bench.run(config(target, "oip-http", model_name="nope"), [Phase(rate=1)])
    refused = "the first request failed: HTTP 400 INVALID_ARGUMENT: failing on purpose"
    with (
        serve_http(HttpBehaviour(fail_next=1, fail_status=400)) as target,
        pytest.raises(InvalidArgumentError, match=refused),
    ):
        bench.run(config(target), [Phase(concurrency=1)])
    with (
        nothing_listens() as unreachable,
        pytest.raises(UnavailableError, match="for model 'mnist' failed: UNAVAILABLE"),
    ):
        bench.run(config(unreachable, "oip-http"), [Phase(concurrency=1)])


@pytest.mark.parametrize(
    ("protocol", "problem"),
    [
        ("rest", r'expected \{"predictions": \[...\]\} with 2 rows, got 3'),
        ("oip-http", r"expected 2 rows per output, got \{'probabilities': 3, 'digits': 3\}"),
    ],
)
def test_a_first_answer_that_is_not_a_prediction_fails_the_run(protocol: str, problem: str) -> None:
    with (
        serve_http(HttpBehaviour(rows_answered=3)) as target,
        pytest.raises(InternalError, match=f"is not a prediction: {problem}"),
    ):
        bench.run(config(target, protocol, images_per_request=2), [Phase(concurrency=1)])


def test_answer_checks() -> None:
    headers = {bench_http.BINARY_HEADER: "2"}
    with pytest.raises(ValueError, match="not within the body's 1 bytes"):
        bench_http.check_oip_http_answer(headers, b"{", 1)
    with pytest.raises(ValueError, match="got none"):
        bench_http.check_oip_http_answer({}, b"{}", 1)
    output = {"name": "p", "shape": [1], "parameters": {"binary_data_size": 4}}
    header = json.dumps({"outputs": [output]}).encode()
    size = {bench_http.BINARY_HEADER: str(len(header))}
    bench_http.check_oip_http_answer(size, header + b"abcd", 1)
    with pytest.raises(ValueError, match="add up to 4 bytes, but 3 follow"):
        bench_http.check_oip_http_answer(size, header + b"abc", 1)
    assert bench_http.error_text(b'{"error": "model not ready"}') == "model not ready"
    assert bench_http.error_text(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert bench_http.error_text(b"") == "(empty body)"


def test_http_status_codes_read_as_the_grpc_status_they_stand_for() -> None:
    assert bench_http.code_of(200) == grpc.StatusCode.OK
    assert bench_http.code_of(404) == grpc.StatusCode.NOT_FOUND
    assert bench_http.code_of(499) == grpc.StatusCode.CANCELLED
    assert bench_http.code_of(503) == grpc.StatusCode.UNAVAILABLE
    assert bench_http.code_of(504) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert bench_http.code_of(418) == grpc.StatusCode.UNKNOWN


# --- Targets, TLS, processes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "tls", "url"),
    [
        ("127.0.0.1:8501", False, "http://127.0.0.1:8501"),
        ("localhost:8501", True, "https://localhost:8501"),
        ("[::1]:8501", False, "http://[::1]:8501"),
        ("http://h:80", False, "http://h:80"),
        ("https://h", False, "https://h"),
        ("https://h:8443/serving/", True, "https://h:8443/serving"),
    ],
)
def test_http_targets(target: str, tls: bool, url: str) -> None:
    assert bench_config.base_url(target, TlsConfig() if tls else None) == url


@pytest.mark.parametrize(
    "target", ["localhost", "dns:///h:8501", "h:http", "http://h:1/?x=1", "http://u@h:1", ""]
)
def test_bad_http_targets_are_refused(target: str) -> None:
    with pytest.raises(InputError, match="expected HOST:PORT or an http:// or https:// URL"):
        bench_config.base_url(target, None)
    with pytest.raises(InputError, match=r"^target: expected HOST:PORT"):
        config(target)


def test_https_with_the_servers_ca(certs: Certs) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(certs.server_cert, certs.server_key)
    with serve_http(HttpBehaviour(), server_tls) as target:
        port = target.rsplit(":", 1)[1]
        tls = TlsConfig(root_ca=str(certs.ca))
        for address in (target, f"https://localhost:{port}"):
            (result,) = bench.run(config(address, tls=tls), [Phase(rate=10)])
            assert result.ok == 5
        pem = TlsConfig(root_ca=certs.ca.read_bytes())
        (result,) = bench.run(config(f"https://localhost:{port}", tls=pem), [Phase(rate=10)])
        assert result.ok == 5
        # The system's roots do not know the test CA: the certificate is checked.
        with pytest.raises(UnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            bench.run(config(f"https://localhost:{port}"), [Phase(rate=10)])


def test_several_processes_are_merged() -> None:
    behaviour = HttpBehaviour(delay_s=0.02)
    with serve_http(behaviour) as target:
        cfg = config(target, "oip-http", processes=2, duration_s=0.6)
        (result,) = bench.run(cfg, [Phase(concurrency=4)])
    assert len(result.cpu_s) == 2
    assert result.errors == {}
    assert float(result.latencies_s.min()) >= 0.02
    # Four users over two processes, each waiting out one request at a time.
    assert result.requests_per_s == pytest.approx(4 / result.latencies_s.mean(), rel=0.15)


# --- The command line --------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--concurrency", "1", "--duration-s", "0.3", "--warmup-s", "0.1", "--no-progress"]


def test_compare_rest_with_oip_http(capsys: pytest.CaptureFixture[str]) -> None:
    behaviour = HttpBehaviour(delay_s=0.005)
    with serve_http(behaviour) as target:
        code, out, err = run_cli(
            capsys, "--target", f"rest@http://{target}", "--json", "bench", "--model", MODEL,
            "--compare", f"oip-http@{target}", *FAST,
        )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert [(t["protocol"], t["target"]) for t in data["targets"]] == [
        ("rest", f"http://{target}"),
        ("oip-http", target),
    ]
    a, b = data["phases"]
    assert a["requests_ok"] > 0
    assert b["requests_ok"] > 0
    assert b["ratio_to_first_target"] == pytest.approx(
        b["requests_per_s"] / a["requests_per_s"], rel=1e-3
    )
    assert behaviour.calls["predict"] >= a["requests_ok"]
    assert behaviour.calls["infer"] >= b["requests_ok"]


def test_http_protocols_default_to_the_rest_port(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVSERVE_TARGET", raising=False)
    with serve_http(HttpBehaviour()) as target:
        monkeypatch.setattr(bench_command, "DEFAULT_REST_TARGET", target)
        code, out, err = run_cli(
            capsys, "--json", "bench", "--protocol", "oip-http", "--model", MODEL, *FAST
        )
    assert code == 0, err
    assert json.loads(out)["target"] == target


@pytest.mark.parametrize(("module", "protocol"), [("aiohttp", "rest"), ("orjson", "oip-http")])
def test_a_missing_http_extra_fails_before_any_request(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, module: str, protocol: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what a missing package looks like
    behaviour = HttpBehaviour()
    with serve_http(behaviour) as target:
        code, _, err = run_cli(
            capsys, "--target", target, "bench", "--protocol", protocol, "--model", MODEL, *FAST
        )
        assert code == 1
        assert f"--protocol {protocol} needs {module}: pip install 'convserve[http]'" in err
        with pytest.raises(ImportError, match=rf"--protocol {protocol} needs {module}"):
            bench.run(config(target, protocol), [Phase(rate=1)])
    assert behaviour.calls == {}


def test_unknown_protocols_are_refused() -> None:
    with pytest.raises(
        InputError, match="protocol: expected one of convserve, oip, rest, oip-http"
    ):
        config("127.0.0.1:1", "soap")
