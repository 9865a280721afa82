"""TensorFlow Serving's REST API (JSON) <-> convserve's typed values.

Pure functions: nothing here talks to the network or the runtime. The shapes
are those of TF Serving's REST API documentation, with the signatures the gRPC
adapter serves (`tfserving_convert`):

- Predict request: ``{"signature_name": ..., "instances": [...]}`` (row format)
  or ``{"signature_name": ..., "inputs": ...}`` (columnar format). The one input
  ``images`` may be named (``{"images": ...}`` per instance, or as the columnar
  object) or not (each instance, or ``inputs``, is the value itself).
  ``serving_default`` (or no ``signature_name``) takes numbers in [0, 1] (float32);
  ``predict_uint8`` takes integers in [0, 255]. Images are [H,W,C] per instance
  ([H,W] and [H*W] for single-channel models), so ``inputs`` is [N,H,W,C].
- Predict response: ``{"predictions": [[p0, ..., pK-1], ...]}`` (row) or
  ``{"outputs": [[...], ...]}`` (columnar): the signature's one output,
  ``probabilities``, per image.
- Model status and metadata: the JSON form of TF Serving's
  GetModelStatusResponse and GetModelMetadataResponse, as TF Serving writes them
  (int64 as strings, enums by name, the signature_def map unpacked).

Base64 (``{"b64": ...}``) values are not accepted: they are for signatures that
take strings, and no convserve signature does. Every number is checked before
numpy converts it: integers for predict_uint8 are in [0, 255], no strings or
nulls, rectangular nesting only (an array of booleans is refused; a boolean
among numbers reads as 0 or 1, as numpy reads it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from google.protobuf import json_format

from convserve.server import errors, types
from convserve.server.converters import check_label
from convserve.server.json_worker import RefusedArray
from convserve.server.protocols import tfserving_convert
from convserve.server.protocols.json_values import to_array
from convserve.server.protocols.oip_convert import parse_version, shown_names

INPUT = tfserving_convert.INPUT
OUTPUT = tfserving_convert.OUTPUT
DEFAULT_SIGNATURE = tfserving_convert.DEFAULT_SIGNATURE
UINT8_SIGNATURE = "predict_uint8"
PREDICT_FIELDS = ("signature_name", "instances", "inputs")


def model_ref(name: str, version: str = "", label: str = "") -> types.ModelRef:
    """The model a URL names: ``/v1/models/{name}[/versions/{version}|/labels/{label}]``."""
    if label:
        check_label(label, "label")
        return types.ModelRef(name=name, label=label)
    return types.ModelRef(name=name, version=parse_version(version, "version"))


def signature_of(body: dict[str, Any]) -> str:
    name = body.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(name, str):
        raise errors.InvalidArgument(
            "signature_name", f"a string expected, got {errors.json_type(name)}"
        )
    name = name or DEFAULT_SIGNATURE
    if name not in tfserving_convert.SIGNATURES:
        raise errors.InvalidArgument(
            "signature_name",
            f"one of {', '.join(tfserving_convert.SIGNATURES)} expected, got {errors.shown(name)}",
        )
    return name


def predict_request(body: dict[str, Any]) -> tuple[np.ndarray, str, str, bool]:
    """A predict body -> (images as sent, signature name, the field they came in, row
    format?). The images still need the runtime's check against the model."""
    unknown = set(body) - set(PREDICT_FIELDS)
    if unknown:
        raise errors.InvalidArgument(
            "body", f"only {', '.join(PREDICT_FIELDS)} expected, got {shown_names(unknown)}"
        )
    signature = signature_of(body)
    if ("instances" in body) == ("inputs" in body):
        raise errors.InvalidArgument(
            "body", 'exactly one of "instances" (row format) or "inputs" (columnar) expected'
        )
    dtype = np.dtype(np.uint8) if signature == UINT8_SIGNATURE else np.dtype(np.float32)
    if "instances" in body:
        instances = body["instances"]
        if isinstance(instances, RefusedArray):
            raise errors.InvalidArgument("instances", instances.reason)
        if not isinstance(instances, list | np.ndarray) or len(instances) == 0:
            raise errors.InvalidArgument(
                "instances",
                f"a non-empty array expected, got {errors.json_type(instances, empty=True)}",
            )
        if isinstance(instances, list) and isinstance(instances[0], dict):
            instances = [_named(item, f"instances[{i}]") for i, item in enumerate(instances)]
        return (
            to_array(instances, dtype, "instances", f"signature {signature}"),
            signature,
            "instances",
            True,
        )
    inputs = body["inputs"]
    if isinstance(inputs, dict):
        inputs = _named(inputs, "inputs")
    return to_array(inputs, dtype, "inputs", f"signature {signature}"), signature, "inputs", False


def _named(item: object, field: str) -> Any:
    """The value of the one input of a named instance (``{"images": ...}``)."""
    if not isinstance(item, dict):
        raise errors.InvalidArgument(
            field,
            f'an object {{"{INPUT}": ...}} expected (as the first instance), '
            f"got {errors.json_type(item)}",
        )
    if set(item) != {INPUT}:
        raise errors.InvalidArgument(
            field,
            f"exactly the input {INPUT!r} expected, got {shown_names(item) or 'none'}",
        )
    return item[INPUT]


def predict_response(result: types.PredictOutput, row: bool) -> bytes:
    """The JSON body answering a predict request in the request's format."""
    key = "predictions" if row else "outputs"
    return orjson.dumps({key: result.probabilities}, option=orjson.OPT_SERIALIZE_NUMPY)


def _as_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def status_json(status: types.ModelStatus, version: int | None) -> dict[str, Any]:
    """GetModelStatusResponse as JSON (`tfserving_convert.model_status_response`)."""
    return _as_json(tfserving_convert.model_status_response(status, version))


def metadata_json(meta: types.ModelMetadata, version: int) -> dict[str, Any]:
    """GetModelMetadataResponse as TF Serving's REST API writes it: the model spec, and
    the signature_def map under ``metadata.signature_def``."""
    spec = tfserving_convert.served_spec(meta.model_name, version)
    return {
        "model_spec": _as_json(spec),
        "metadata": {
            tfserving_convert.SIGNATURE_DEF_FIELD: _as_json(
                tfserving_convert.signature_def_map(meta)
            )
        },
    }
