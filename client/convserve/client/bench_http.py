"""HTTP load for ``convserve bench``: TF Serving's REST predict and KServe v2 infer.

* ``rest``: ``POST /v1/models/{model}:predict`` with a JSON body in TF Serving's
  row format, ``{"signature_name": ..., "instances": [...]}``. The signature
  is ``predict_uint8`` (pixels 0-255) when the model's metadata
  (``GET /v1/models/{model}/metadata``) offers it, else ``serving_default``
  with the pixels as floats in [0, 1]; the images take the shape of the
  signature's input.
* ``oip-http``: ``POST /v2/models/{model}/infer`` with the binary tensor data
  extension: a JSON header (its length in ``Inference-Header-Content-Length``)
  followed by the input's raw little-endian bytes, and every output asked
  for in binary (``binary_data_output``). The input is the model's first
  declared input (``GET /v2/models/{model}``) or ``--input``.

As over gRPC, the bodies are serialized once before the run. In the timed loop
a request is one POST on a kept-alive connection of one aiohttp session (one
connection per user); the answer's bytes are read and its status kept, nothing
parsed, so that the generator's CPU goes to HTTP and not to JSON. Only the first
answer, before the load, is checked to be a prediction of the right size.

An HTTP status counts as the gRPC status the server derives it from (`code_of`:
404 NOT_FOUND, 503 UNAVAILABLE, ...), so that tables, error counts and exit
codes read the same for every protocol. A target is ``HOST:PORT`` (http, or
https with TLS settings) or an ``http://`` / ``https://`` URL.

aiohttp and orjson are the client's optional ``http`` extra, imported only
when an HTTP protocol is used.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from convserve.client.bench_config import BenchConfig, SetupError, base_url
from convserve.client.bench_requests import OipInput, first_input, little_endian_bytes, oip_arrays
from convserve.client.channel import TlsConfig
from convserve.client.errors import InputError

# The response header a convserve server names its replica with (as gRPC's trailing metadata).
REPLICA_HEADER = "convserve-replica"
BINARY_HEADER = "Inference-Header-Content-Length"
# The TF Serving signatures a rest load can use, preferred first: uint8 pixels are
# the smallest JSON and need no scaling on either side.
REST_SIGNATURES = ("predict_uint8", "serving_default")
# An error body is quoted in messages up to this many characters.
ERROR_TEXT_LIMIT = 300

_CODES = {
    200: grpc.StatusCode.OK,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    # A proxy's "no server behind me", as gRPC reads it.
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# TensorFlow dtypes of a signature input -> the OIP datatype of the same values.
_TF_DATATYPES = {
    "DT_UINT8": "UINT8",
    "DT_UINT16": "UINT16",
    "DT_INT16": "INT16",
    "DT_INT32": "INT32",
    "DT_INT64": "INT64",
    "DT_HALF": "FP16",
    "DT_FLOAT": "FP32",
    "DT_DOUBLE": "FP64",
}

# What a sender returns: the status, and the replica that answered (None: not named).
HttpAnswer = tuple[grpc.StatusCode, str | None]


def code_of(status: int) -> grpc.StatusCode:
    """The gRPC status an HTTP status stands for (UNKNOWN for one the server never sends)."""
    return _CODES.get(status, grpc.StatusCode.UNKNOWN)


def import_http(protocol: str) -> tuple[Any, Any]:
    """The aiohttp and orjson modules; ImportError naming the extra when one is missing."""
    try:
        import aiohttp
        import orjson
    except ImportError as exc:
        missing = exc.name or "aiohttp"
        raise ImportError(
            f"--protocol {protocol} needs {missing}: pip install 'convserve[http]'"
        ) from exc
    return aiohttp, orjson


def model_path(prefix: str, model: str) -> str:
    """``prefix/<model>``, the model name quoted as one path segment."""
    return f"{prefix}/{urllib.parse.quote(model, safe='')}"


# --- Requests ------------------------------------------------------------------------


def rest_input(metadata: Any, model: str) -> tuple[str, OipInput]:
    """(signature name, its input) from a TF Serving REST metadata answer.

    ``predict_uint8`` when the model has it, else ``serving_default``; the
    signature must have exactly one input. InputError when no signature fits.
    """
    try:
        signatures = metadata["metadata"]["signature_def"]["signature_def"]
        names = list(signatures)
    except (KeyError, TypeError):
        raise InputError(
            f"model {model!r}: expected metadata.signature_def.signature_def in its "
            "metadata (TF Serving's GET /v1/models/NAME/metadata)"
        ) from None
    signature = next((name for name in REST_SIGNATURES if name in names), None)
    if signature is None:
        raise InputError(
            f"model {model!r} has no {' or '.join(REST_SIGNATURES)} signature "
            f"(it has {', '.join(map(repr, names)) or 'none'})"
        )
    where = f"signature {signature!r} of model {model!r}"
    inputs = (
        signatures[signature].get("inputs") if isinstance(signatures[signature], dict) else None
    )
    if not isinstance(inputs, dict) or len(inputs) != 1:
        count = len(inputs) if isinstance(inputs, dict) else 0
        raise InputError(f"{where}: expected exactly one input, got {count}")
    ((name, info),) = inputs.items()
    try:
        dtype = str(info.get("dtype", ""))
        # Protobuf's JSON writes int64 sizes as strings.
        shape = tuple(int(d.get("size", -1)) for d in info["tensor_shape"].get("dim", []))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise InputError(f"{where}: input {name!r} has no readable tensor_shape") from None
    datatype = _TF_DATATYPES.get(dtype, dtype or "none")
    return signature, OipInput(name, datatype, shape, given_as=f"input {name!r} of {where}")


def rest_body(signature: str, values: np.ndarray) -> bytes:
    """A predict body in TF Serving's row format: each of `values` (one per image) an instance."""
    _, orjson = import_http("rest")
    body: bytes = orjson.dumps(
        {"signature_name": signature, "instances": np.ascontiguousarray(values)},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    return body


def rest_bodies(
    signature: str, spec: OipInput, images: np.ndarray, per_request: int
) -> list[bytes]:
    """The predict bodies of a load (see `bench_requests.oip_arrays` for shapes and values)."""
    return [rest_body(signature, values) for values in oip_arrays(spec, images, per_request)]


def oip_http_input(metadata: Any, model: str) -> OipInput:
    """The first input of a KServe v2 model metadata answer (``GET /v2/models/NAME``)."""
    try:
        inputs = [
            OipInput(str(i["name"]), str(i["datatype"]), tuple(int(d) for d in i["shape"]))
            for i in metadata.get("inputs") or []
        ]
    except (AttributeError, KeyError, TypeError, ValueError):
        raise InputError(
            f"model {model!r}: expected its metadata's inputs as [{{name, datatype, shape}}]"
        ) from None
    return first_input(model, inputs)


def oip_http_body(name: str, datatype: str, values: np.ndarray) -> tuple[dict[str, str], bytes]:
    """(headers, body) of an infer request with the binary tensor data extension: `values`
    as the raw input `name` of `datatype`, every output asked for in binary."""
    _, orjson = import_http("oip-http")
    data = little_endian_bytes(values)
    header: bytes = orjson.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(values.shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    headers = {"Content-Type": "application/octet-stream", BINARY_HEADER: str(len(header))}
    return headers, header + data


def oip_http_bodies(
    spec: OipInput, images: np.ndarray, per_request: int
) -> tuple[dict[str, str], list[bytes]]:
    """(headers, bodies) of a load's infer requests (see `bench_requests.oip_arrays`).

    Every body has the same JSON header (one shape, one size), so the headers
    are the same for all of them.
    """
    requests = [
        oip_http_body(spec.name, spec.datatype, values)
        for values in oip_arrays(spec, images, per_request)
    ]
    return requests[0][0], [body for _, body in requests]


# --- Answers -------------------------------------------------------------------------


def check_rest_answer(body: bytes, per_request: int) -> None:
    """ValueError unless `body` is ``{"predictions": [...]}`` with one row per image."""
    answer = json.loads(body)
    predictions = answer.get("predictions") if isinstance(answer, dict) else None
    if not isinstance(predictions, list) or len(predictions) != per_request:
        found = len(predictions) if isinstance(predictions, list) else "no list"
        raise ValueError(f'expected {{"predictions": [...]}} with {per_request} rows, got {found}')


def check_oip_http_answer(headers: Any, body: bytes, per_request: int) -> None:
    """ValueError unless `body` is a binary-extension infer answer for `per_request` images:
    a JSON header of `BINARY_HEADER` bytes whose outputs' binary data sizes add up to the
    rest of the body, each output with `per_request` rows."""
    length = headers.get(BINARY_HEADER)
    if length is None:
        raise ValueError(f"expected binary outputs (a {BINARY_HEADER} header), got none")
    size = int(length)
    if not 0 <= size <= len(body):
        raise ValueError(f"{BINARY_HEADER} {size} is not within the body's {len(body)} bytes")
    header = json.loads(body[:size])
    outputs = header.get("outputs") if isinstance(header, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise ValueError("expected a JSON header with outputs, got none")
    try:
        binary = sum(int(o["parameters"]["binary_data_size"]) for o in outputs)
        rows = {str(o["name"]): int(o["shape"][0]) for o in outputs}
    except (KeyError, TypeError, IndexError, ValueError):
        raise ValueError(
            "expected every output with a name, a shape and parameters.binary_data_size"
        ) from None
    if binary != len(body) - size:
        raise ValueError(
            f"the outputs' binary_data_size add up to {binary} bytes, "
            f"but {len(body) - size} follow the header"
        )
    if any(n != per_request for n in rows.values()):
        raise ValueError(f"expected {per_request} rows per output, got {rows}")


def error_text(body: bytes) -> str:
    """What an error answer says: its JSON ``error``, else the start of its text."""
    try:
        message = json.loads(body).get("error")
    except (ValueError, AttributeError):
        message = None
    if isinstance(message, str):
        return message[:ERROR_TEXT_LIMIT]
    return body[:ERROR_TEXT_LIMIT].decode("utf-8", "replace").strip() or "(empty body)"


# --- One worker's session --------------------------------------------------------------


def ssl_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """TLS of an https target: `tls`'s CA (default: the system's roots) and client certificate."""
    tls = tls or TlsConfig()
    if (tls.client_cert is None) != (tls.client_key is None):
        raise ValueError("TLS: client_cert and client_key must be given together")
    try:
        if isinstance(tls.root_ca, bytes):
            context = ssl.create_default_context(cadata=tls.root_ca.decode("ascii"))
        else:
            root = None if tls.root_ca is None else os.fspath(tls.root_ca)
            context = ssl.create_default_context(cafile=root)
    except (OSError, ValueError) as exc:
        raise ValueError(f"TLS root_ca: cannot read {tls.root_ca!r}: {exc}") from exc
    if tls.client_cert is not None and tls.client_key is not None:
        # ssl reads certificates from files only: PEM bytes go through a temporary one.
        with ExitStack() as stack:
            files = []
            for pem in (tls.client_cert, tls.client_key):
                if isinstance(pem, bytes):
                    file = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".pem"))
                    file.write(pem)
                    file.flush()
                    files.append(file.name)
                else:
                    files.append(os.fspath(pem))
            try:
                context.load_cert_chain(files[0], files[1])
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"TLS client certificate: cannot load it: {exc}") from exc
    return context


@dataclass(frozen=True)
class HttpLoad:
    """What a worker sends: one URL, headers shared by every request, pre-serialized bodies."""

    url: str
    headers: dict[str, str]
    bodies: list[bytes]


def _status_failure(what: str, status: int, body: bytes) -> SetupError:
    code = code_of(status)
    return SetupError(f"{what} failed: HTTP {status} {code.name}: {error_text(body)}", code)


def _no_answer(what: str, exc: Exception) -> SetupError:
    if isinstance(exc, TimeoutError):
        return SetupError(f"{what} failed: DEADLINE_EXCEEDED", grpc.StatusCode.DEADLINE_EXCEEDED)
    return SetupError(f"{what} failed: UNAVAILABLE: {exc}", grpc.StatusCode.UNAVAILABLE)


async def _get_json(session: Any, client_error: type[Exception], url: str, what: str) -> Any:
    try:
        async with session.get(url) as response:
            body = await response.read()
            status = response.status
    except (TimeoutError, client_error) as exc:
        raise _no_answer(what, exc) from exc
    if status != 200:
        raise _status_failure(what, status, body)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise SetupError(f"{what}: the answer is not JSON ({exc})") from exc


# The check of a load's first answer: (headers, body) -> ValueError unless it is a
# prediction of the request's images.
AnswerCheck = Callable[[Any, bytes], None]


async def _rest_load(
    session: Any, client_error: type[Exception], config: BenchConfig, base: str
) -> tuple[HttpLoad, AnswerCheck]:
    model, per_request = config.model_name, config.images_per_request
    path = model_path(f"{base}/v1/models", model)
    what = f"GET {path}/metadata for model {model!r}"
    metadata = await _get_json(session, client_error, f"{path}/metadata", what)
    signature, spec = rest_input(metadata, model)
    bodies = rest_bodies(signature, spec, config.images, per_request)
    load = HttpLoad(f"{path}:predict", {"Content-Type": "application/json"}, bodies)
    return load, lambda headers, body: check_rest_answer(body, per_request)


async def _oip_http_load(
    session: Any, client_error: type[Exception], config: BenchConfig, base: str
) -> tuple[HttpLoad, AnswerCheck]:
    model, per_request = config.model_name, config.images_per_request
    path = model_path(f"{base}/v2/models", model)
    spec = config.oip_input
    if spec is None:
        metadata = await _get_json(session, client_error, path, f"GET {path} for model {model!r}")
        spec = oip_http_input(metadata, model)
    headers, bodies = oip_http_bodies(spec, config.images, per_request)
    load = HttpLoad(f"{path}/infer", headers, bodies)
    return load, lambda answer_headers, body: check_oip_http_answer(
        answer_headers, body, per_request
    )


@asynccontextmanager
async def open_load(
    config: BenchConfig, connections: int
) -> AsyncIterator[tuple[Callable[[bytes], Awaitable[HttpAnswer]], list[bytes]]]:
    """(send, bodies) for one worker of `config` (a BenchConfig with an HTTP protocol).

    One session with at most `connections` connections (0: no limit, for an
    open loop); the model's metadata read, the bodies built, and one request
    sent and its answer checked before the load. Raises SetupError.
    """
    aiohttp, _ = import_http(config.protocol)
    base = base_url(config.target, config.tls)
    tls = ssl_context(config.tls) if base.startswith("https://") else True
    server_name = config.tls.server_name_override if config.tls is not None else None
    headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
    client_error = aiohttp.ClientError
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, ssl=tls),
        timeout=aiohttp.ClientTimeout(total=config.timeout_s),
        headers=headers,
    ) as session:
        prepare = _rest_load if config.protocol == "rest" else _oip_http_load
        load, check = await prepare(session, client_error, config, base)
        post = session.post
        url, request_headers = load.url, load.headers

        async def send(body: bytes) -> HttpAnswer:
            try:
                async with post(
                    url, data=body, headers=request_headers, server_hostname=server_name
                ) as response:
                    # Read to the end, so that the connection can take the next request.
                    await response.read()
                    return code_of(response.status), response.headers.get(REPLICA_HEADER)
            except TimeoutError:
                return grpc.StatusCode.DEADLINE_EXCEEDED, None
            except client_error:
                return grpc.StatusCode.UNAVAILABLE, None

        # One request first: a server that is down or rejects the request fails
        # the run now, not with a table of errors.
        what = "the first request"
        try:
            async with post(
                url, data=load.bodies[0], headers=request_headers, server_hostname=server_name
            ) as response:
                body = await response.read()
                status, answer_headers = response.status, response.headers
        except (TimeoutError, client_error) as exc:
            raise _no_answer(what, exc) from exc
        if status != 200:
            raise _status_failure(what, status, body)
        try:
            check(answer_headers, body)
        except ValueError as exc:
            raise SetupError(
                f"the first answer of POST {url} is not a prediction: {exc}",
                grpc.StatusCode.INTERNAL,
            ) from exc
        yield send, load.bodies
