"""TensorFlow Serving's REST API on the HTTP port.

    GET  /v1/models/{name}[/versions/{v}|/labels/{label}]            model status
    GET  /v1/models/{name}[/versions/{v}|/labels/{label}]/metadata   model metadata
    POST /v1/models/{name}[/versions/{v}|/labels/{label}]:predict    predict

``:classify`` and ``:regress`` answer 501 (the SavedModels export predict
signatures only, as over gRPC). Request and response shapes are in
`tfserving_rest_convert`; handlers only translate and delegate to the runtime,
as the gRPC adapter (`tfserving`) does, so both share models, batches and limits.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from convserve.server import api, errors, types
from convserve.server.protocols import tfserving_rest_convert as convert
from convserve.server.protocols.calls import off_loop
from convserve.server.protocols.http import (
    JSON,
    HttpApi,
    HttpCall,
    json_response,
)

PROTOCOL: types.Protocol = "tfserving-rest"
# The three ways a URL names a model's version (name, versions/{v}, labels/{label}).
_MODEL = "/v1/models/{name:[^/:]+}"
_VERSIONED = (_MODEL, _MODEL + "/versions/{version:[^/:]+}", _MODEL + "/labels/{label:[^/:]+}")
UNSUPPORTED_METHODS = ("classify", "regress")


def _name(request: web.Request) -> str:
    return str(request.match_info.get("name", ""))


def _ref(call: HttpCall) -> types.ModelRef:
    return convert.model_ref(call.match("name"), call.match("version"), call.match("label"))


def _predict_input(body: dict[str, Any], ref: types.ModelRef) -> tuple[types.PredictInput, bool]:
    images, _, field, row = convert.predict_request(body)
    return types.PredictInput(images, ref, field=field), row


class TfServingRest:
    """The handlers of TF Serving's REST API over the shared runtime."""

    def __init__(self, runtime: api.RuntimeApi, http: HttpApi) -> None:
        self._runtime = runtime
        self._http = http

    def add_routes(self, router: web.UrlDispatcher) -> None:
        route = self._http.route
        for path in _VERSIONED:
            router.add_get(path, route("GetModelStatus", self.status, model=_name))
            router.add_get(
                path + "/metadata", route("GetModelMetadata", self.metadata, model=_name)
            )
            router.add_post(path + ":predict", route("Predict", self.predict, model=_name))
            for method in UNSUPPORTED_METHODS:
                router.add_post(
                    f"{path}:{method}",
                    route(method.capitalize(), self._unsupported(method), model=_name),
                )

    async def status(self, call: HttpCall) -> Any:
        ref = _ref(call)
        status = self._runtime.model_status(ref.name or self._runtime.default_model)
        version = None
        if ref.version is not None or ref.label is not None:
            version = self._runtime.version_of(ref)
        return json_response(convert.status_json(status, version))

    async def metadata(self, call: HttpCall) -> Any:
        ref = _ref(call)
        meta = self._runtime.metadata(ref)
        version = self._runtime.version_of(ref)
        return json_response(convert.metadata_json(meta, version))

    async def predict(self, call: HttpCall) -> Any:
        ref = _ref(call)
        body = await call.body()
        value = await call.json(body)
        # Converting large images runs in a thread (`off_loop`): the JSON worker has read
        # them into arrays already, so that the event loop holds nothing proportional.
        predict, row = await off_loop(_predict_input, value, ref, size_bytes=len(body))
        result = await self._runtime.predict(predict, deadline=call.deadline)
        answer = await off_loop(
            convert.predict_response, result, row, size_bytes=result.probabilities.nbytes
        )
        return web.Response(body=answer, content_type=JSON)

    @staticmethod
    def _unsupported(method: str) -> Any:
        async def answer(call: HttpCall) -> Any:
            raise errors.Unimplemented(
                f":{method} is not implemented by convserve: its SavedModels export predict "
                "signatures only; use :predict"
            )

        return answer
