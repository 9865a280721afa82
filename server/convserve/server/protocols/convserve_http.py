"""convserve's own API over HTTP, in JSON: convolution, kernel fitting, feature maps and
the model list, on the HTTP port beside TF Serving's and KServe's APIs.

    POST /v1/convserve/convolve        {"input": [[...]], "kernel": [[1, -1]], "bias": [...],
                                        "options": {"strides": [1, 1], "padding": "SAME", ...}}
                                       -> {"output": [[...]]}
    POST /v1/convserve/fit_kernel      {"inputs": ..., "targets": ..., "kernel_shape": [1, 2],
                                        "fit_bias": false, "learning_rate": 0.03, ...}
                                       -> {"kernel": ..., "bias": ..., "loss": [...],
                                           "steps": n, "stop_reason": "converged"}
    POST /v1/convserve/feature_maps    {"model_spec": {"name": "mnist"}, "image": [[...]],
                                        "layers": [...]}
                                       -> {"model_name", "model_version",
                                           "feature_maps": [{"layer", "activations"}]}
    GET  /v1/convserve/models          -> {"default_model", "models": [...]}
    GET  /v1/convserve/models/{name}[/versions/{v}|/labels/{label}]/metadata

Requests are the JSON form of convserve.v1's messages (field names as in the
proto; enums by name, ``"SAME"`` or ``"PADDING_SAME"``), except that tensors
are nested arrays of numbers (float64; a feature-map image of integers is
uint8 in [0, 255], of other numbers float32 in [0, 1]) or
``{"dtype": "float32", "shape": [...], "data": [...]}``.
Each request is turned into its convserve.v1 message and then read by the
same converters as gRPC (`converters`), so checks, field names in errors and
limits are the same on both. Answers are JSON with tensors as nested arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from aiohttp import web
from google.protobuf import json_format

from convserve.server import api, converters, errors, types
from convserve.server.protocols.calls import off_loop
from convserve.server.protocols.http import HttpApi, HttpCall, json_response
from convserve.server.protocols.json_values import json_array, to_array
from convserve.server.protocols.oip_convert import MAX_RANK, parse_version
from convserve.v1 import convserve_pb2
from convserve.v1.tensor_codec import to_tensor

PROTOCOL: types.Protocol = "convserve-http"
PREFIX = "/v1/convserve"
TENSOR_DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype(np.uint8),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}


def json_tensor(value: Any, field: str, default: Callable[[np.ndarray], np.dtype]) -> np.ndarray:
    """A tensor as JSON -> an array: nested numbers (their dtype `default(array)`), or
    ``{"dtype", "shape", "data"}`` with data flat or nested."""
    if isinstance(value, dict):
        unknown = set(value) - {"dtype", "shape", "data"}
        if unknown or "data" not in value:
            raise errors.InvalidArgument(
                field, 'nested arrays of numbers or {"dtype", "shape", "data"} expected'
            )
        name = value.get("dtype", "float64")
        if not isinstance(name, str) or name not in TENSOR_DTYPES:
            raise errors.InvalidArgument(
                f"{field}.dtype",
                f"one of {', '.join(TENSOR_DTYPES)} expected, got {errors.shown(name)}",
            )
        dtype = TENSOR_DTYPES[name]
        array = to_array(value["data"], dtype, f"{field}.data", dtype.name)
        if "shape" in value:
            shape = value["shape"]
            if (
                not isinstance(shape, list)
                or len(shape) > MAX_RANK
                or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape
                )
            ):
                raise errors.InvalidArgument(
                    f"{field}.shape",
                    f"at most {MAX_RANK} non-negative integer dimensions expected",
                )
            if math.prod(shape) != array.size:
                raise errors.InvalidArgument(
                    f"{field}.shape",
                    f"{array.size} values given, so a shape of {array.size} elements expected, "
                    f"got {shape}",
                )
            array = array.reshape(shape)
        return array
    array = json_array(value, field)
    dtype = default(array)
    return to_array(value, dtype, field, dtype.name) if dtype == np.uint8 else array.astype(dtype)


def _float64(array: np.ndarray) -> np.dtype:
    return np.dtype(np.float64)


def _image_dtype(array: np.ndarray) -> np.dtype:
    # An image of integers is pixels in [0, 255]; of other numbers, float32 in [0, 1].
    return np.dtype(np.uint8) if array.dtype.kind in "iu" else np.dtype(np.float32)


def message_from_json(
    body: dict[str, Any],
    message: Any,
    tensors: Mapping[str, Callable[[np.ndarray], np.dtype]],
) -> Any:
    """`body` as the convserve.v1 `message` (filled in place): tensors from JSON arrays,
    everything else by protobuf's JSON mapping."""
    rest = {key: value for key, value in body.items() if key not in tensors}
    options = rest.get("options")
    if isinstance(options, dict):
        rest["options"] = {**options, **_enum_names(options)}
    try:
        json_format.ParseDict(rest, message)
    except json_format.ParseError as exc:
        raise errors.InvalidArgument("body", str(exc).replace("\n", " ")) from None
    for name, default in tensors.items():
        if name in body and body[name] is not None:
            array = json_tensor(body[name], name, default)
            getattr(message, name).CopyFrom(to_tensor(array, array.dtype))
    return message


# The short names of ConvolutionOptions' enums ("SAME"), as the other protocols take them.
_ENUM_PREFIXES = {"padding": "PADDING_", "mode": "CONVOLUTION_MODE_"}


def _enum_names(options: dict[str, Any]) -> dict[str, Any]:
    """``{"padding": "SAME"}`` -> ``{"padding": "PADDING_SAME"}`` (full names pass as given)."""
    named = {}
    for field, prefix in _ENUM_PREFIXES.items():
        value = options.get(field)
        if isinstance(value, str) and value and not value.startswith(prefix):
            named[field] = prefix + value
    return named


def convolve_request(body: dict[str, Any]) -> types.ConvolveInput:
    tensors = {"input": _float64, "kernel": _float64, "bias": _float64}
    request = message_from_json(body, convserve_pb2.ConvolveRequest(), tensors)
    return converters.convolve_request_from_proto(request)


def fit_kernel_request(body: dict[str, Any]) -> types.FitKernelInput:
    tensors = {"inputs": _float64, "targets": _float64}
    request = message_from_json(body, convserve_pb2.FitKernelRequest(), tensors)
    return converters.fit_kernel_request_from_proto(request)


def feature_maps_request(body: dict[str, Any]) -> types.FeatureMapsInput:
    request = message_from_json(
        body, convserve_pb2.GetFeatureMapsRequest(), {"image": _image_dtype}
    )
    return converters.feature_maps_request_from_proto(request)


def fit_kernel_json(value: types.FitKernelOutput) -> dict[str, Any]:
    return {
        "kernel": value.kernel,
        "bias": value.bias,
        "loss": [float(v) for v in value.loss],
        "steps": value.steps,
        "stop_reason": value.stop_reason,
    }


def feature_maps_json(value: types.FeatureMapsOutput) -> dict[str, Any]:
    return {
        "model_name": value.model_name,
        "model_version": value.model_version,
        "feature_maps": [{"layer": name, "activations": maps} for name, maps in value.maps],
    }


def model_status_json(status: types.ModelStatus) -> dict[str, Any]:
    return {
        "name": status.name,
        "ready": status.ready,
        "versions": [dataclasses.asdict(v) for v in status.versions],
        "error": status.error,
        "memory_bytes": status.memory_bytes,
        "labels": dict(status.labels),
        "label_errors": list(status.label_errors),
    }


def metadata_json(meta: types.ModelMetadata) -> dict[str, Any]:
    value = dataclasses.asdict(meta)
    value["training"] = dict(meta.training)
    return value


def _name(request: web.Request) -> str:
    return str(request.match_info.get("name", ""))


class ConvserveHttp:
    """The handlers of convserve's JSON API over the shared runtime."""

    def __init__(self, runtime: api.RuntimeApi, http: HttpApi) -> None:
        self._runtime = runtime
        self._http = http

    def add_routes(self, router: web.UrlDispatcher) -> None:
        route = self._http.route
        router.add_post(f"{PREFIX}/convolve", route("Convolve", self.convolve))
        router.add_post(f"{PREFIX}/fit_kernel", route("FitKernel", self.fit_kernel))
        router.add_post(f"{PREFIX}/feature_maps", route("GetFeatureMaps", self.feature_maps))
        router.add_get(f"{PREFIX}/models", route("ListModels", self.models))
        model = f"{PREFIX}/models/{{name:[^/]+}}"
        for path in (
            model,
            f"{model}/versions/{{version:[^/]+}}",
            f"{model}/labels/{{label:[^/]+}}",
        ):
            router.add_get(
                f"{path}/metadata", route("GetModelMetadata", self.metadata, model=_name)
            )

    async def _body(self, call: HttpCall, convert: Callable[[dict[str, Any]], Any]) -> Any:
        body = await call.body()
        value = await call.json(body)
        return await off_loop(convert, value, size_bytes=len(body))

    async def convolve(self, call: HttpCall) -> Any:
        value = await self._body(call, convolve_request)
        result = await self._runtime.convolve(value, deadline=call.deadline)
        return await off_loop(
            lambda: json_response({"output": result.output}), size_bytes=result.output.nbytes
        )

    async def fit_kernel(self, call: HttpCall) -> Any:
        value = await self._body(call, fit_kernel_request)
        result = await self._runtime.fit_kernel(value, deadline=call.deadline)
        return json_response(fit_kernel_json(result))

    async def feature_maps(self, call: HttpCall) -> Any:
        value = await self._body(call, feature_maps_request)
        result = await self._runtime.feature_maps(value, deadline=call.deadline)
        size = sum(maps.nbytes for _, maps in result.maps)
        return await off_loop(lambda: json_response(feature_maps_json(result)), size_bytes=size)

    async def models(self, call: HttpCall) -> Any:
        return json_response(
            {
                "default_model": self._runtime.default_model,
                "models": [model_status_json(s) for s in self._runtime.models()],
            }
        )

    async def metadata(self, call: HttpCall) -> Any:
        label = call.match("label")
        if label:
            converters.check_label(label, "label")
        ref = types.ModelRef(
            name=call.match("name"),
            version=None if label else parse_version(call.match("version"), "version"),
            label=label or None,
        )
        return json_response(metadata_json(self._runtime.metadata(ref)))
