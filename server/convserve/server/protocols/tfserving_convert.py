"""TensorFlow Serving messages <-> convserve's typed values.

Pure functions: nothing here talks to the network or the runtime. Messages are
the ``tensorflow-serving-api`` package's generated classes with TensorFlow's
own ``TensorProto``, so a TF Serving client talks to convserve unchanged.

Conventions (as TF Serving serves the exported SavedModel):

- ``model_spec.name``: the model (empty: the default model); each configured
  image classifier is served under its name. [H,W,C] is the model's input
  shape and K its class count (ModelMetadata; [28,28,1] and 10 for MNIST).
  ``model_spec.version`` pins a loaded version; ``version_label`` names one by
  a version label of the model config file (they are one oneof). ``"latest"``
  means the serving version, and so does ``"stable"`` unless the model config
  file defines it (`model_versions.ModelManager.resolve`). Responses name the version
  that served, as TF Serving's do, not the label.
- ``model_spec.signature_name``: ``"serving_default"`` (or empty), input
  ``images`` DT_FLOAT in [0, 1]; or ``"predict_uint8"``, input ``images``
  DT_UINT8 in [0, 255]. Shape ``[N,H,W,C]`` (single-channel models also take
  ``[N,H,W]`` and ``[N,H*W]``). Output ``probabilities`` DT_FLOAT ``[N,K]``,
  returned in ``tensor_content``. ``output_filter`` selects outputs by name.
- ``GetModelStatus``: each version of the model with TF Serving's state; a
  version that failed to load is END with its error in ``status``.
- Input tensors carry their values in ``tensor_content`` or in the typed
  field of their dtype (``float_val`` for DT_FLOAT, ``int_val`` for
  DT_UINT8); a typed field must hold exactly one value per element. Typed
  values are read as the packed bytes protobuf carries them (see
  `wire.packed_payload`), never element by element.
- Shapes have at most `oip_convert.MAX_RANK` dimensions and must match the
  data's length before anything is allocated; versions are positive int64s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import error_codes_pb2, meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
    status_pb2,
)

from convserve.server import errors, types
from convserve.server.converters import check_label
from convserve.server.protocols.oip_convert import MAX_RANK, shown_names
from convserve.server.protocols.wire import (
    WireReader,
    fixed_values,
    packed_payload,
    small_varints,
    typed_limit_deserializer,
    varint_values,
)
from convserve.v1 import tensor_pb2 as convserve_tensor_pb2
from convserve.v1.tensor_codec import DTYPE_TO_PROTO, from_tensor

DEFAULT_SIGNATURE = "serving_default"
INPUT = "images"
OUTPUT = "probabilities"
# Signature name -> the TensorFlow dtype of its `images` input.
SIGNATURES: dict[str, int] = {
    DEFAULT_SIGNATURE: types_pb2.DT_FLOAT,
    "predict_uint8": types_pb2.DT_UINT8,
}
PREDICT_METHOD = "tensorflow/serving/predict"
SIGNATURE_DEF_FIELD = "signature_def"

NUMPY_OF: dict[int, np.dtype] = {
    types_pb2.DT_UINT8: np.dtype(np.uint8),
    types_pb2.DT_INT32: np.dtype(np.int32),
    types_pb2.DT_INT64: np.dtype(np.int64),
    types_pb2.DT_FLOAT: np.dtype(np.float32),
    types_pb2.DT_DOUBLE: np.dtype(np.float64),
}
TF_DTYPE_OF: dict[np.dtype, int] = {v: k for k, v in NUMPY_OF.items()}
# The typed TensorProto field that carries each dtype's values.
VALUES_FIELD = {
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
}
_VALUES_NUMBER = {
    dtype: tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name[name].number
    for dtype, name in VALUES_FIELD.items()
}


def dtype_name(dtype: int) -> str:
    """1 -> ``DT_FLOAT``; unknown values print as numbers."""
    try:
        return str(types_pb2.DataType.Name(dtype))
    except ValueError:
        return str(dtype)


def model_ref(spec: Any) -> types.ModelRef:
    """A ModelSpec -> the model and its version: pinned by number, by version label, or
    neither (the serving version). Whether the model has the label is the runtime's to
    say (NotFound); a label that no model could have is refused here."""
    choice = spec.WhichOneof("version_choice")
    label = spec.version_label if choice == "version_label" else None
    if label is not None:
        # Set but empty is a label too, as for TF Serving: one no model can have.
        check_label(label, "model_spec.version_label")
    version = spec.version.value if choice == "version" else None
    # Versions are positive, as in convserve.v1's ModelSpec.
    if version is not None and version < 1:
        raise errors.InvalidArgument(
            "model_spec.version", f"a positive version number expected, got {version}"
        )
    return types.ModelRef(name=spec.name or None, version=version, label=label)


def signature_of(spec: Any) -> str:
    """The signature a ModelSpec names (empty: serving_default)."""
    name = spec.signature_name or DEFAULT_SIGNATURE
    if name not in SIGNATURES:
        raise errors.InvalidArgument(
            "model_spec.signature_name",
            f"one of {', '.join(SIGNATURES)} expected, got {errors.shown(name)}",
        )
    return name


def array_from_proto(proto: Any, field: str) -> np.ndarray:
    """A TensorProto -> array, with the same checks as convserve.v1 tensors
    (known dtype, positive dimensions, content length)."""
    if proto.dtype not in NUMPY_OF:
        raise errors.InvalidArgument(
            f"{field}.dtype",
            f"one of {', '.join(dtype_name(d) for d in NUMPY_OF)} expected, "
            f"got {dtype_name(proto.dtype)}",
        )
    if proto.tensor_shape.unknown_rank:
        raise errors.InvalidArgument(f"{field}.tensor_shape", "a known shape expected")
    dtype = NUMPY_OF[proto.dtype]
    dims = proto.tensor_shape.dim
    if len(dims) > MAX_RANK:
        raise errors.InvalidArgument(
            f"{field}.tensor_shape", f"at most {MAX_RANK} dimensions expected, got {len(dims)}"
        )
    shape = [int(d.size) for d in dims]
    if proto.tensor_content:
        content = proto.tensor_content
    else:
        name = VALUES_FIELD[proto.dtype]
        array = _typed_values(proto, dtype, f"{field}.{name}")
        if shape and all(d > 0 for d in shape) and array.size != math.prod(shape):
            raise errors.InvalidArgument(
                f"{field}.{name}",
                f"{math.prod(shape)} values expected for shape {shape} "
                f"(or the data in tensor_content), got {array.size}",
            )
        content = array.astype(dtype.newbyteorder("<"), copy=False).tobytes()
    tensor = convserve_tensor_pb2.Tensor(dtype=DTYPE_TO_PROTO[dtype], shape=shape, content=content)
    return from_tensor(tensor, field)


def _typed_values(proto: Any, dtype: np.dtype, field: str) -> np.ndarray:
    payload = packed_payload(proto.SerializeToString(), _VALUES_NUMBER[proto.dtype], field)
    if dtype.kind == "f":
        return fixed_values(payload, dtype, field)
    if dtype == np.uint8:
        values = small_varints(payload)
        if values is None:
            raise errors.InvalidArgument(field, "DT_UINT8 values in [0, 255] expected")
        return values
    return varint_values(payload, dtype, field)


def request_bytes(request: Any) -> int:
    """About how many bytes of tensor data a PredictRequest carries, without serializing
    it (ByteSize would: as long as converting it)."""
    total = 0
    for proto in request.inputs.values():
        total += len(proto.tensor_content)
        for descriptor, values in proto.ListFields():
            if descriptor.is_repeated:
                total += 8 * len(values)
    # Each entry of these costs a little Python work.
    return total + 64 * (len(request.inputs) + len(request.output_filter))


_PREDICT_INPUTS = predict_pb2.PredictRequest.DESCRIPTOR.fields_by_name["inputs"].number
_MAP_KEY = predict_pb2.PredictRequest.InputsEntry.DESCRIPTOR.fields_by_name["key"].number
_MAP_VALUE = predict_pb2.PredictRequest.InputsEntry.DESCRIPTOR.fields_by_name["value"].number
# A TensorProto's fields that carry no typed values: its header and tensor_content.
_UNTYPED_NUMBERS = frozenset(
    tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name[name].number
    for name in ("dtype", "tensor_shape", "version_number", "tensor_content")
)
_MAX_KEY_BYTES = 256


def predict_typed_payloads(reader: WireReader) -> Iterator[tuple[str, int]]:
    """``(inputs[<name>], bytes)`` for each input of a serialized PredictRequest: the bytes
    of every TensorProto field but the header and tensor_content (float_val, int_val, ...)."""
    data = reader.data
    for entry in reader.fields(0, len(data)):
        if entry.number != _PREDICT_INPUTS or not entry.length_delimited:
            continue  # a mistyped field is an unknown field to protobuf
        key = b""
        size = 0
        for part in reader.fields(entry.start, entry.end):
            if not part.length_delimited:
                continue
            if part.number == _MAP_KEY:
                key = bytes(data[part.start : min(part.end, part.start + _MAX_KEY_BYTES)])
            elif part.number == _MAP_VALUE:
                size += sum(
                    value.end - value.start
                    for value in reader.fields(part.start, part.end)
                    if value.number not in _UNTYPED_NUMBERS
                )
        yield f"inputs[{errors.shown(key.decode('utf-8', 'replace'))}]", size


def predict_request_deserializer(limit: int) -> Callable[[bytes], Any]:
    """PredictRequest's deserializer: typed values of more than `limit` bytes in all are
    refused unparsed (`wire.typed_limit_deserializer`)."""
    return typed_limit_deserializer(
        predict_pb2.PredictRequest, predict_typed_payloads, limit, "*_val", "tensor_content"
    )


def proto_from_array(array: np.ndarray) -> Any:
    """An array -> TensorProto with its data in tensor_content (little-endian)."""
    dtype = array.dtype.newbyteorder("=")
    little = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<"))
    return tensor_pb2.TensorProto(
        dtype=TF_DTYPE_OF[dtype],
        tensor_shape=shape_proto(array.shape),
        tensor_content=little.tobytes(),
    )


def shape_proto(shape: Sequence[int]) -> Any:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in shape]
    )


def predict_request(request: Any) -> tuple[np.ndarray, types.ModelRef, str, list[str]]:
    """A PredictRequest -> (images as sent, model, signature name, output names).

    The images still need the runtime's check against the model (shape, range,
    limits).
    """
    ref = model_ref(request.model_spec)
    signature = signature_of(request.model_spec)
    extra = sorted(set(request.inputs) - {INPUT})
    if extra or INPUT not in request.inputs:
        raise errors.InvalidArgument(
            "inputs",
            f"exactly one input {INPUT!r} expected for signature {signature}, "
            f"got {shown_names(request.inputs) or 'none'}",
        )
    proto = request.inputs[INPUT]
    expected = SIGNATURES[signature]
    if proto.dtype != expected:
        others = [s for s, d in SIGNATURES.items() if d == proto.dtype]
        hint = f" (signature {others[0]} takes {dtype_name(proto.dtype)})" if others else ""
        raise errors.InvalidArgument(
            f"inputs[{INPUT}].dtype",
            f"{dtype_name(expected)} expected for signature {signature}, "
            f"got {dtype_name(proto.dtype)}{hint}",
        )
    images = array_from_proto(proto, f"inputs[{INPUT}]")
    outputs: list[str] = []
    for name in request.output_filter:
        if name != OUTPUT:
            raise errors.InvalidArgument(
                "output_filter",
                f"output names of signature {signature} ({OUTPUT}) expected, "
                f"got {errors.shown(name)}",
            )
        if name not in outputs:
            outputs.append(name)
    return images, ref, signature, outputs or [OUTPUT]


def served_spec(model_name: str, version: int, signature: str = "") -> Any:
    """The ModelSpec of a response: the model and version that served it."""
    spec = model_pb2.ModelSpec(name=model_name, signature_name=signature)
    spec.version.value = version
    return spec


def predict_response(result: types.PredictOutput, signature: str, outputs: Sequence[str]) -> Any:
    """A PredictResponse with the requested outputs (only ``probabilities`` exists)."""
    response = predict_pb2.PredictResponse(
        model_spec=served_spec(result.model_name, result.model_version, signature)
    )
    for name in outputs:
        response.outputs[name].CopyFrom(proto_from_array(result.probabilities))
    return response


def check_metadata_fields(request: Any) -> None:
    """GetModelMetadata serves ``signature_def`` only, as TF Serving does."""
    fields = list(request.metadata_field)
    if not fields:
        raise errors.InvalidArgument(
            "metadata_field", f"at least one field ({SIGNATURE_DEF_FIELD}) expected, got none"
        )
    unknown = {f for f in fields if f != SIGNATURE_DEF_FIELD}
    if unknown:
        raise errors.InvalidArgument(
            "metadata_field", f"only {SIGNATURE_DEF_FIELD} expected, got {shown_names(unknown)}"
        )


def _tensor_info(name: str, dtype: int, shape: Sequence[int]) -> Any:
    return meta_graph_pb2.TensorInfo(name=name, dtype=dtype, tensor_shape=shape_proto(shape))


def _only_spec(specs: Sequence[types.TensorSpecInfo], what: str) -> types.TensorSpecInfo:
    # An image classifier has one image input and one probability output.
    if not specs:
        raise errors.Internal(f"the model's metadata describes no {what}")
    return specs[0]


def signature_def_map(meta: types.ModelMetadata) -> Any:
    """The SignatureDefMap of the served signatures, named as TensorFlow names them, with
    the model's shapes: ``images`` [-1,H,W,C], ``probabilities`` [-1,K]."""
    images = _only_spec(meta.inputs, "input").shape
    probabilities = _only_spec(meta.outputs, "output").shape
    result = get_model_metadata_pb2.SignatureDefMap()
    for signature, dtype in SIGNATURES.items():
        sig = result.signature_def[signature]
        sig.method_name = PREDICT_METHOD
        sig.inputs[INPUT].CopyFrom(_tensor_info(f"{signature}_{INPUT}:0", dtype, images))
        sig.outputs[OUTPUT].CopyFrom(
            _tensor_info("StatefulPartitionedCall:0", types_pb2.DT_FLOAT, probabilities)
        )
    return result


def model_metadata_response(meta: types.ModelMetadata, version: int | None) -> Any:
    """A GetModelMetadataResponse of `version` (None: the serving one): the signature_def
    map packed in an Any."""
    response = get_model_metadata_pb2.GetModelMetadataResponse(
        model_spec=served_spec(
            meta.model_name, meta.serving_version if version is None else version
        )
    )
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_def_map(meta))
    return response


_STATES = get_model_status_pb2.ModelVersionStatus.State


def model_status_response(status: types.ModelStatus, version: int | None) -> Any:
    """A GetModelStatusResponse: every version of the model (or only the pinned one,
    NotFound if the model has no such version) with its state; a version that failed
    to load carries its error (error_code UNKNOWN) in ``status``."""
    versions = [v for v in status.versions if version is None or v.version == version]
    if version is not None and not versions:
        known = ", ".join(str(v.version) for v in status.versions) or "none"
        raise errors.NotFound(
            f"model_spec.version: model {errors.shown(status.name)} has no version {version} "
            f"(versions: {known})"
        )
    response = get_model_status_pb2.GetModelStatusResponse()
    for v in versions:
        problem = (
            status_pb2.StatusProto(error_code=error_codes_pb2.UNKNOWN, error_message=v.error)
            if v.error
            else status_pb2.StatusProto()
        )
        response.model_version_status.add(
            version=v.version, state=_STATES.Value(v.state), status=problem
        )
    return response
