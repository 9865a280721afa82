"""`HttpApi.route` and the app's JSON error answers, on a small aiohttp app.

Handlers stand in for the APIs' own; what is checked is what every endpoint
shares: the status and JSON body of each error, the metrics' `code` label,
the bearer token, the body limit and content type, the replica header and
the request timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from convserve.server import auth, errors, logs, types
from convserve.server.protocols import http
from convserve.server.settings import Settings
from convserve.v1.tensor_codec import TensorError

PROTOCOL: types.Protocol = "tfserving-rest"
TOKEN = "open-sesame"
MAX_BODY = 1024


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CONVSERVE_"):
            monkeypatch.delenv(name)


class RecordingMetrics:
    """Records the request accounting calls `HttpApi.route` makes."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str, str]] = []
        # (protocol, rpc, code, model label) of each finished request.
        self.finished: list[tuple[str, str, str, str]] = []
        self.any_finished = asyncio.Event()

    def request_started(self, protocol: str, rpc: str, model: str = "") -> None:
        self.started.append((protocol, rpc, model))

    def request_finished(
        self, protocol: str, rpc: str, code: str, seconds: float, model: str = ""
    ) -> None:
        assert seconds >= 0
        self.finished.append((protocol, rpc, code, model))
        self.any_finished.set()


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_base_path": tmp_path,
        "max_message_bytes": MAX_BODY,
        "rest_timeout_s": 30.0,
    }
    values.update(overrides)
    return Settings(**values)


Handler = Callable[[http.HttpCall], Awaitable[Any]]


async def echo(call: http.HttpCall) -> Any:
    return http.json_response(await call.json())


def raising(exc: BaseException) -> Handler:
    async def handler(call: http.HttpCall) -> Any:
        raise exc

    return handler


@asynccontextmanager
async def serving(
    tmp_path: Path,
    routes: Mapping[str, Handler],
    *,
    settings_overrides: dict[str, Any] | None = None,
    get: Mapping[str, Handler] | None = None,
    public: frozenset[str] = frozenset(),
    **api: Any,
) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], RecordingMetrics]]:
    """A client of an app serving each POST route of `routes` (and GET route of `get`)
    through one `HttpApi`, named by the path's last part; `api` goes to `HttpApi`."""
    metrics = RecordingMetrics()
    config = settings(tmp_path, **(settings_overrides or {}))
    api.setdefault("rejections", logs.RejectionSummary(logging.getLogger("test.rejections")))
    api_ = http.HttpApi(PROTOCOL, metrics, settings=config, **api)
    app = web.Application(client_max_size=config.max_message_bytes, middlewares=[http._json_errors])
    for method, table in (("POST", routes), ("GET", get or {})):
        for path, handler in table.items():
            rpc = path.strip("/").split("/")[0].capitalize()
            model = (lambda r: r.match_info.get("name", "")) if "{name}" in path else None
            app.router.add_route(
                method, path, api_.route(rpc, handler, model=model, public=path in public)
            )
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, metrics
    finally:
        await client.close()
        api_.parser.close()


async def error_of(response: Any) -> str:
    assert response.content_type == "application/json"
    body = await response.json()
    assert list(body) == ["error"]
    return str(body["error"])


# -- answers and their codes ---------------------------------------------------------


async def test_an_answer_is_counted_as_ok(tmp_path: Path) -> None:
    async with serving(tmp_path, {"/echo": echo}) as (client, metrics):
        response = await client.post("/echo", json={"a": [1, 2]})
        assert response.status == 200
        assert await response.json() == {"a": [1, 2]}
    assert metrics.started == [(PROTOCOL, "Echo", "")]
    assert metrics.finished == [(PROTOCOL, "Echo", "OK", "")]


@pytest.mark.parametrize(
    ("exc", "status", "code", "message"),
    [
        (
            errors.InvalidArgument("images", "at most 8 images expected, got 9"),
            400,
            "INVALID_ARGUMENT",
            "images: at most 8 images expected, got 9",
        ),
        (
            errors.NotFound("model_spec.name: unknown model 'x'"),
            404,
            "NOT_FOUND",
            "model_spec.name: unknown model 'x'",
        ),
        (
            errors.FailedPrecondition("the model has no feature maps"),
            400,
            "FAILED_PRECONDITION",
            "the model has no feature maps",
        ),
        (errors.ResourceExhausted("queue full"), 429, "RESOURCE_EXHAUSTED", "queue full"),
        (errors.Unavailable("no model is ready"), 503, "UNAVAILABLE", "no model is ready"),
        (
            errors.Unimplemented(":classify is not implemented by convserve"),
            501,
            "UNIMPLEMENTED",
            ":classify is not implemented by convserve",
        ),
        (TensorError("kernel", "3 bytes for 4 values"), 400, "INVALID_ARGUMENT", "kernel: "),
    ],
)
async def test_errors_are_json_with_their_status_and_code(
    tmp_path: Path, exc: Exception, status: int, code: str, message: str
) -> None:
    async with serving(tmp_path, {"/fail": raising(exc)}) as (client, metrics):
        response = await client.post("/fail", json={})
        assert response.status == status
        assert (await error_of(response)).startswith(message)
    assert metrics.finished == [(PROTOCOL, "Fail", code, "")]


async def test_client_errors_go_to_the_rejection_summary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.rejections")
    exc = errors.InvalidArgument("images", "numbers expected")
    async with serving(tmp_path, {"/invalid": raising(exc)}) as (client, _):
        assert (await client.post("/invalid", json={})).status == 400
    rejected = [r.getMessage() for r in caplog.records if r.name == "test.rejections"]
    assert f"rejected {PROTOCOL} Invalid with INVALID_ARGUMENT: images: numbers expected" in (
        rejected
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_unexpected_exception_is_500_and_logged_not_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=http.__name__)
    handler = raising(RuntimeError("secret detail of the failure"))
    async with serving(tmp_path, {"/boom": handler}) as (client, metrics):
        response = await client.post("/boom", json={})
        assert response.status == 500
        assert await error_of(response) == "internal error; see the server log"
    assert metrics.finished == [(PROTOCOL, "Boom", "INTERNAL", "")]
    [record] = [r for r in caplog.records if r.name == http.__name__]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == f"{PROTOCOL} Boom failed"
    assert record.exc_info is not None
    assert "secret detail of the failure" in str(record.exc_info[1])


async def test_an_internal_error_is_logged_with_its_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger=http.__name__)
    handler = raising(errors.Internal("the model returned NaN"))
    async with serving(tmp_path, {"/boom": handler}) as (client, _):
        response = await client.post("/boom", json={})
        assert response.status == 500
        assert await error_of(response) == "the model returned NaN"
    assert [r.getMessage() for r in caplog.records if r.name == http.__name__] == [
        f"{PROTOCOL} Boom failed: the model returned NaN"
    ]


async def test_the_model_label_of_the_requested_model(tmp_path: Path) -> None:
    def label(name: str) -> str:
        return name if name == "mnist" else "_unknown"

    async def named(call: http.HttpCall) -> Any:
        return http.json_response({"name": call.match("name")})

    get = {"/models/{name}": named}
    async with serving(tmp_path, {}, get=get, model_label=label) as (client, metrics):
        response = await client.get("/models/mnist")
        assert await response.json() == {"name": "mnist"}
        assert (await client.get("/models/other")).status == 200
    assert metrics.started == [(PROTOCOL, "Models", "mnist"), (PROTOCOL, "Models", "_unknown")]
    assert [f[3] for f in metrics.finished] == ["mnist", "_unknown"]


# -- bodies --------------------------------------------------------------------------


async def test_a_body_over_the_limit_is_413_before_it_is_parsed(tmp_path: Path) -> None:
    body = b'{"a": "' + b"x" * MAX_BODY + b'"}'
    async with serving(tmp_path, {"/echo": echo}) as (client, metrics):
        response = await client.post(
            "/echo", data=body, headers={"Content-Type": "application/json"}
        )
        assert response.status == 413
        assert await error_of(response) == (
            f"body: at most {MAX_BODY} bytes expected (--max-message-bytes), got {len(body)} bytes"
        )
    assert metrics.finished == [(PROTOCOL, "Echo", "RESOURCE_EXHAUSTED", "")]


async def test_a_chunked_body_over_the_limit_is_413_too(tmp_path: Path) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"a": "'
        for _ in range(4):
            yield b"x" * 512
        yield b'"}'

    async with serving(tmp_path, {"/echo": echo}) as (client, metrics):
        response = await client.post(
            "/echo", data=chunks(), headers={"Content-Type": "application/json"}
        )
        assert response.status == 413
        assert await error_of(response) == (
            f"body: at most {MAX_BODY} bytes expected (--max-message-bytes), got more"
        )
    assert metrics.finished == [(PROTOCOL, "Echo", "RESOURCE_EXHAUSTED", "")]


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/x-www-form-urlencoded",  # what `curl -d` sends
        "text/plain",
        None,
    ],
)
async def test_json_bodies_in_every_accepted_content_type(
    tmp_path: Path, content_type: str | None
) -> None:
    async with serving(tmp_path, {"/echo": echo}) as (client, _):
        if content_type is None:
            response = await client.post(
                "/echo", data=b'{"a": 1}', skip_auto_headers=["Content-Type"]
            )
        else:
            response = await client.post(
                "/echo", data=b'{"a": 1}', headers={"Content-Type": content_type}
            )
        assert response.status == 200, await response.text()
        assert await response.json() == {"a": 1}


@pytest.mark.parametrize("content_type", ["text/html", "application/octet-stream"])
async def test_other_content_types_are_415(tmp_path: Path, content_type: str) -> None:
    async with serving(tmp_path, {"/echo": echo}) as (client, metrics):
        response = await client.post(
            "/echo", data=b'{"a": 1}', headers={"Content-Type": content_type}
        )
        assert response.status == 415
        assert await error_of(response) == (
            "Content-Type: application/json or application/x-www-form-urlencoded or "
            f"text/plain expected, got {content_type!r}"
        )
    # 415 is an HTTP status without a gRPC code of its own: the label is INVALID_ARGUMENT.
    assert metrics.finished == [(PROTOCOL, "Echo", "INVALID_ARGUMENT", "")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "body: a JSON object expected, got an empty body"),
        (b"  \n", "body: a JSON object expected, got an empty body"),
        (b"[1, 2]", "body: a JSON object expected, got an array"),
        (b'"text"', "body: a JSON object expected, got a string"),
        (b'{"a": ', "body: valid JSON expected: "),
        (b"{'a': 1}", "body: valid JSON expected: "),
    ],
)
async def test_bodies_that_are_not_a_json_object_are_400(
    tmp_path: Path, body: bytes, message: str
) -> None:
    async with serving(tmp_path, {"/echo": echo}) as (client, metrics):
        response = await client.post(
            "/echo", data=body, headers={"Content-Type": "application/json"}
        )
        assert response.status == 400
        assert (await error_of(response)).startswith(message)
    assert metrics.finished == [(PROTOCOL, "Echo", "INVALID_ARGUMENT", "")]


# -- token and replica ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "status", "message"),
    [
        (None, 401, "missing credentials: send metadata 'authorization: Bearer <token>'"),
        ("Basic b3Blbjpz", 401, "missing credentials: "),
        ("Bearer wrong-token", 401, "invalid bearer token"),
        (f"Bearer {TOKEN}", 200, ""),
        (f"bearer {TOKEN}", 200, ""),
    ],
)
async def test_the_bearer_token_is_checked(
    tmp_path: Path, authorization: str | None, status: int, message: str
) -> None:
    check = auth.BearerTokenInterceptor(TOKEN).check
    headers = {} if authorization is None else {"Authorization": authorization}
    async with serving(tmp_path, {"/echo": echo}, check_token=check) as (client, metrics):
        response = await client.post("/echo", json={"a": 1}, headers=headers)
        assert response.status == status
        if status == 200:
            assert await response.json() == {"a": 1}
        else:
            assert (await error_of(response)).startswith(message)
    code = "OK" if status == 200 else "UNAUTHENTICATED"
    assert metrics.finished == [(PROTOCOL, "Echo", code, "")]


async def test_public_endpoints_need_no_token(tmp_path: Path) -> None:
    async def live(call: http.HttpCall) -> Any:
        return http.json_response({"live": True})

    check = auth.BearerTokenInterceptor(TOKEN).check
    get = {"/live": live, "/private": live}
    async with serving(tmp_path, {}, get=get, public=frozenset({"/live"}), check_token=check) as (
        client,
        _,
    ):
        assert (await client.get("/live")).status == 200
        assert (await client.get("/private")).status == 401


async def test_answers_name_the_replica(tmp_path: Path) -> None:
    async with serving(tmp_path, {"/echo": echo}, replica="replica-a") as (client, _):
        response = await client.post("/echo", json={})
        assert response.status == 200
        assert response.headers["convserve-replica"] == "replica-a"
    async with serving(tmp_path, {"/echo": echo}) as (client, _):
        response = await client.post("/echo", json={})
        assert "convserve-replica" not in response.headers


async def test_errors_name_the_replica_too(tmp_path: Path) -> None:
    routes = {"/fail": raising(errors.NotFound("no such model"))}
    async with serving(tmp_path, routes, replica="replica-a") as (client, _):
        response = await client.post("/fail", json={})
        assert response.status == 404
        assert response.headers["convserve-replica"] == "replica-a"


# -- paths and methods -----------------------------------------------------------------


async def test_an_unknown_path_is_a_json_404(tmp_path: Path) -> None:
    async with serving(tmp_path, {"/echo": echo}) as (client, metrics):
        response = await client.get("/v1/nope")
        assert response.status == 404
        assert await error_of(response) == (
            "GET '/v1/nope': no such endpoint (see the README's HTTP/REST section for the "
            "endpoints served)"
        )
        long = "/" + "x" * 3000
        response = await client.get(long)
        assert response.status == 404
        assert "(3001 characters)" in await error_of(response)
    assert metrics.started == []


async def test_a_wrong_method_is_a_json_405_with_allow(tmp_path: Path) -> None:
    async with serving(tmp_path, {"/echo": echo}) as (client, metrics):
        response = await client.put("/echo", json={})
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert await error_of(response) == "PUT '/echo': POST expected"
    assert metrics.started == []


# -- deadlines and cancellation --------------------------------------------------------------


async def test_a_handler_slower_than_the_rest_timeout_is_504(tmp_path: Path) -> None:
    budgets: list[float] = []

    async def slow(call: http.HttpCall) -> Any:
        budgets.append(call.deadline - time.monotonic())
        await asyncio.Event().wait()  # never set: only the timeout ends it

    overrides = {"rest_timeout_s": 0.2}
    async with serving(tmp_path, {"/slow": slow}, settings_overrides=overrides) as (
        client,
        metrics,
    ):
        response = await client.post("/slow", json={})
        assert response.status == 504
        assert await error_of(response) == "Slow: no answer within --rest-timeout-s (0.2 s)"
    assert metrics.finished == [(PROTOCOL, "Slow", "DEADLINE_EXCEEDED", "")]
    # The handler's deadline (what the runtime gets) is the same timeout.
    [budget] = budgets
    assert 0 < budget <= 0.2


async def test_a_timeout_raised_by_the_handler_itself_is_internal(tmp_path: Path) -> None:
    async with serving(tmp_path, {"/own": raising(TimeoutError("own timeout"))}) as (
        client,
        metrics,
    ):
        response = await client.post("/own", json={})
        assert response.status == 500
    assert metrics.finished == [(PROTOCOL, "Own", "INTERNAL", "")]


async def test_a_client_that_goes_away_cancels_the_handler(tmp_path: Path) -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def waits(call: http.HttpCall) -> Any:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serving(tmp_path, {"/waits": waits}) as (client, metrics):
        request = asyncio.create_task(client.post("/waits", json={}))
        await asyncio.wait_for(entered.wait(), 30)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.wait_for(metrics.any_finished.wait(), 30)
        assert cancelled.is_set()
    assert metrics.finished == [(PROTOCOL, "Waits", "CANCELLED", "")]


# -- the HTTP status of every error ------------------------------------------------------------

# Every ServeError subclass, built as the server raises it, with the HTTP status a client gets.
SERVE_ERRORS: list[tuple[errors.ServeError, int]] = [
    (errors.ServeError("x"), 500),
    (errors.InvalidArgument("field", "problem"), 400),
    (errors.NotFound("x"), 404),
    (errors.FailedPrecondition("x"), 400),
    (errors.ResourceExhausted("x"), 429),
    (errors.DeadlineExceeded("x"), 504),
    (errors.Cancelled("x"), 499),
    (errors.Unavailable("x"), 503),
    (errors.Unauthenticated("x"), 401),
    (errors.PayloadTooLarge("x"), 413),
    (errors.UnsupportedMediaType("Content-Type", "x"), 415),
    (errors.Unimplemented("x"), 501),
    (errors.Internal("x"), 500),
]


def _subclasses(cls: type) -> set[type]:
    found = {cls}
    sub: type
    for sub in cls.__subclasses__():
        found |= _subclasses(sub)
    return found


def test_the_table_covers_every_serve_error() -> None:
    assert {type(exc) for exc, _ in SERVE_ERRORS} == _subclasses(errors.ServeError)


@pytest.mark.parametrize(("exc", "status"), SERVE_ERRORS, ids=lambda v: type(v).__name__)
def test_http_status_of_every_serve_error(exc: errors.ServeError, status: int) -> None:
    got_status, code, message = errors.http_status_of(exc)
    assert got_status == status
    assert (code, message) == errors.status_of(exc)
    assert code == exc.code
    if not hasattr(exc, "http_status"):
        # One mapping: the status of the gRPC code.
        assert status == errors.HTTP_STATUS[exc.code]


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (TensorError("kernel", "bad"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (RuntimeError("detail"), 500, grpc.StatusCode.INTERNAL),
        (KeyError("detail"), 500, grpc.StatusCode.INTERNAL),
    ],
)
def test_http_status_of_other_exceptions(
    exc: Exception, status: int, code: grpc.StatusCode
) -> None:
    got_status, got_code, message = errors.http_status_of(exc)
    assert (got_status, got_code) == (status, code)
    if code == grpc.StatusCode.INTERNAL:
        assert message == "internal error; see the server log"
    else:
        assert message == "kernel: bad"


def test_every_grpc_code_has_an_http_status() -> None:
    assert set(errors.HTTP_STATUS) == set(grpc.StatusCode)
    assert errors.HTTP_STATUS[grpc.StatusCode.OK] == 200
    assert all(400 <= s < 600 for c, s in errors.HTTP_STATUS.items() if c != grpc.StatusCode.OK)
