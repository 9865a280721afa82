"""KServe v2 / the Open Inference Protocol over HTTP, on the HTTP port.

    GET  /v2/health/live, /v2/health/ready        200, or 503 when not ready
    GET  /v2                                      server metadata
    GET  /v2/models/{name}[/versions/{v}]         model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready   200, or 503 when not ready
    POST /v2/models/{name}[/versions/{v}]/infer   inference (JSON, or JSON + binary data)
    POST /v2/repository/index                     the models and their states

Inference requests may carry tensors in JSON or, with the binary tensor data
extension, as raw bytes after the JSON header (``Inference-Header-Content-Length``,
``binary_data_size``), and ask for binary outputs (``binary_data``,
``binary_data_output``), so the stock ``tritonclient.http`` works either way.
`oip_http_convert` turns each request into the protocol's gRPC message and each
answer back; in between, `oip.OipModels` does exactly what it does for gRPC
(same models, conv2d, checks, errors and limits). Loading and unloading models
through the repository API answer 501: the model config file says which models
are served.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from aiohttp import web

from convserve.server import errors, types
from convserve.server.protocols import oip_http_convert as convert
from convserve.server.protocols.calls import off_loop
from convserve.server.protocols.http import (
    JSON,
    JSON_TYPES,
    HttpApi,
    HttpCall,
    json_response,
)
from convserve.server.protocols.oip import _MODELS_ARE_CONFIGURED, OipModels

PROTOCOL: types.Protocol = "oip-http"
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY = "application/octet-stream"
_MODEL = "/v2/models/{name:[^/]+}"
_VERSIONED = (_MODEL, _MODEL + "/versions/{version:[^/]+}")


def _name(request: web.Request) -> str:
    return str(request.match_info.get("name", ""))


def _empty(status: int) -> Any:
    # The protocol answers health and readiness by status code alone.
    return web.Response(status=status)


class OipHttp:
    """The handlers of the Open Inference Protocol's HTTP API over the shared runtime."""

    def __init__(self, models: OipModels, http: HttpApi, *, serving: Callable[[], bool]) -> None:
        self._models = models
        self._http = http
        # Readiness as the server sees it: the runtime's, and False once stopping.
        self._serving = serving

    def add_routes(self, router: web.UrlDispatcher) -> None:
        route = self._http.route
        router.add_get("/v2/health/live", route("ServerLive", self.live, public=True))
        router.add_get("/v2/health/ready", route("ServerReady", self.ready, public=True))
        router.add_get("/v2", route("ServerMetadata", self.server_metadata))
        router.add_post("/v2/repository/index", route("RepositoryIndex", self.index))
        for action in ("load", "unload"):
            router.add_post(
                f"/v2/repository/models/{{name:[^/]+}}/{action}",
                route(f"RepositoryModel{action.capitalize()}", self._not_offered, model=_name),
            )
        for path in _VERSIONED:
            router.add_get(path, route("ModelMetadata", self.model_metadata, model=_name))
            router.add_get(path + "/ready", route("ModelReady", self.model_ready, model=_name))
            router.add_post(path + "/infer", route("ModelInfer", self.infer, model=_name))

    async def live(self, call: HttpCall) -> Any:
        return _empty(200)

    async def ready(self, call: HttpCall) -> Any:
        return _empty(200 if self._serving() else 503)

    async def server_metadata(self, call: HttpCall) -> Any:
        return json_response(convert.server_metadata_json(self._models.server_metadata()))

    async def model_metadata(self, call: HttpCall) -> Any:
        response = self._models.model_metadata(call.match("name"), call.match("version"))
        return json_response(convert.model_metadata_json(response))

    async def model_ready(self, call: HttpCall) -> Any:
        ready = self._models.model_ready(call.match("name"), call.match("version"))
        return _empty(200 if ready else 503)

    async def index(self, call: HttpCall) -> Any:
        body = await call.body()
        ready_only = convert.index_request(await call.parse(body) if body.strip() else {})
        response = self._models.repository_index("", ready_only)
        return json_response(convert.repository_index_json(response))

    async def _not_offered(self, call: HttpCall) -> Any:
        raise errors.Unimplemented(
            f"{call.request.path.rsplit('/', 1)[-1]} is not implemented by convserve: "
            + _MODELS_ARE_CONFIGURED
        )

    async def infer(self, call: HttpCall) -> Any:
        header_length = _header_length(call.request.headers.get(HEADER_LENGTH))
        body = await call.body(JSON_TYPES | {BINARY})
        header, binary = convert.split_body(body, header_length)
        # A large JSON object is parsed in the JSON worker process (`json_worker`).
        document = await call.json(bytes(header))
        request, output_format = await off_loop(
            functools.partial(
                convert.infer_request_from_document,
                header_sent=header_length is not None,
                model_name=call.match("name"),
                model_version=call.match("version"),
            ),
            document,
            binary,
            size_bytes=len(body),
        )
        response = await self._models.infer(request, deadline=call.deadline)
        size = sum(len(raw) for raw in response.raw_output_contents)
        answer, json_length = await off_loop(
            convert.infer_response, response, output_format, size_bytes=size
        )
        if json_length is None:
            return web.Response(body=answer, content_type=JSON)
        return web.Response(
            body=answer, content_type=BINARY, headers={HEADER_LENGTH: str(json_length)}
        )


def _header_length(text: str | None) -> int | None:
    if text is None:
        return None
    value = text.strip()
    if not value.isdigit() or len(value) > 18:
        raise errors.InvalidArgument(
            HEADER_LENGTH,
            f"the JSON header's length in bytes (a non-negative integer) expected, "
            f"got {errors.shown(text)}",
        )
    return int(value)
