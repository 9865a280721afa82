"""Open Inference Protocol (KServe v2) over HTTP <-> the gRPC messages of `oip_convert`.

Pure functions: nothing here talks to the network or the runtime. An HTTP infer
request is transcoded into the ``inference.ModelInferRequest`` the gRPC service
takes, with every input's data in ``raw_input_contents`` (little-endian, C
order), so that `oip_convert.predict_request` and `oip_convert.convolve_request`
check it exactly as they check a gRPC request: the same field names in errors,
the same limits. The server answers with a ModelInferResponse built with raw
output contents, which `infer_response` turns into the HTTP body. Requests and
answers follow KServe's REST protocol with Triton's binary tensor data
extension, as ``tritonclient.http`` writes and reads them.

About 600 lines, a fifth of them the description below: the HTTP body's
grammar and its transcoding to the gRPC messages read best in one place.

Infer requests (`infer_request`)
--------------------------------
The body is a JSON object, optionally followed by binary tensor data; the
``Inference-Header-Content-Length`` header gives the JSON object's length in
bytes when data follows it. Members:

- ``id`` (string, optional): echoed in the answer.
- ``parameters`` (object, optional): each value a boolean, an integer that fits
  int64 or a string, becoming the request parameter's ``bool_param``,
  ``int64_param`` or ``string_param`` (see `oip_convert` for those a model
  takes). ``binary_data_output`` (boolean) is the HTTP answer's own: true
  returns every output as binary data unless the output says otherwise.
- ``inputs`` (array, required): objects with ``name``, ``datatype`` and
  ``shape``, and either ``data`` (a flat or nested JSON array of numbers,
  read in row-major order) or the parameter ``binary_data_size``: that many
  bytes follow the JSON object, the inputs' data in the order of the inputs.
  ``data`` holds numbers for FP32 and FP64, integers of the datatype's range
  for UINT8, INT32 and INT64 (no booleans, strings or null), with equal-length
  rows when nested. Other input parameters are passed on (and refused by
  `oip_convert`: shared memory is not supported).
- ``outputs`` (array, optional): objects with ``name`` and optional
  ``parameters``; ``binary_data`` (boolean) returns that output as binary data.
  Other output parameters are passed on (and refused by `oip_convert`).

Unknown members of these objects are ignored, as Triton does. An object holds at
most `MAX_ENTRIES` parameters, inputs or outputs, more than any model takes.

Infer answers (`infer_response`)
--------------------------------
A JSON object ``{"model_name", "model_version", "id" (when not empty),
"parameters" (when any), "outputs"}``; each output is ``{"name", "datatype",
"shape", "data"}`` with its values as a flat row-major array (BYTES values as
strings), or, when binary, ``{"name", "datatype", "shape", "parameters":
{"binary_data_size": n}}`` with its n bytes after the JSON object (BYTES values
as Triton writes them: a 4-byte little-endian length, then the bytes).

The other answers
-----------------
`server_metadata_json`, `model_metadata_json` and `repository_index_json` give
the JSON values (for orjson to write) of ``GET /v2``,
``GET /v2/models/{name}[/versions/{v}]`` and ``POST /v2/repository/index`` from
the gRPC responses; `index_request` reads the index request's optional body
``{"ready": boolean}``.

Tensor data is converted by numpy and orjson, never element by element in
Python: a 64 MiB body holds millions of values.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from tritonclient.grpc import service_pb2

from convserve.server import errors
from convserve.server.json_worker import RefusedArray
from convserve.server.protocols.oip_convert import DATATYPES, INT64_MAX, MAX_RANK

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA_OUTPUT = "binary_data_output"
BINARY_DATA = "binary_data"
BINARY_DATA_SIZE = "binary_data_size"
# Triton names this extension in its server metadata; clients look for it there.
BINARY_EXTENSION = "binary_tensor_data"
# No model takes more than three inputs, three outputs or seven parameters; the
# bound keeps a body of millions of tiny entries from costing a Python loop each.
MAX_ENTRIES = 64
INT64_MIN = -INT64_MAX - 1

# Names that read unambiguously inside a field path such as ``inputs[images]``;
# any other name is quoted and cut by `errors.shown`.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
_FLOATS = ("FP32", "FP64")
_MISSING = object()


@dataclass(frozen=True)
class OutputFormat:
    """Which outputs an HTTP answer carries as binary data after its JSON object.

    `default_binary` is the request parameter ``binary_data_output``; `binary`
    holds each requested output's ``binary_data`` parameter, where given.
    """

    default_binary: bool = False
    binary: dict[str, bool] = field(default_factory=dict)

    def is_binary(self, name: str) -> bool:
        """Whether output `name` goes as binary data."""
        return self.binary.get(name, self.default_binary)


def _label(name: str) -> str:
    return name if _PLAIN_NAME.fullmatch(name) else errors.shown(name)


def _described(value: object) -> str:
    """A JSON value as a message names what was sent instead of what was expected:
    its type, and a number's or a string's value."""
    if value is _MISSING:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return f"{errors.json_type(value)} ({errors.shown(value)})"
    return errors.json_type(value)


def _object(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise errors.InvalidArgument(name, f"a JSON object expected, got {_described(value)}")
    return value


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise errors.InvalidArgument(name, f"a JSON string expected, got {_described(value)}")
    return value


def _boolean(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise errors.InvalidArgument(name, f"true or false expected, got {_described(value)}")
    return value


def _entries(value: object, name: str, what: str) -> list[Any]:
    """A JSON array of at most `MAX_ENTRIES` entries."""
    if not isinstance(value, list):
        raise errors.InvalidArgument(
            name, f"a JSON array of {what} expected, got {_described(value)}"
        )
    if len(value) > MAX_ENTRIES:
        raise errors.InvalidArgument(
            name, f"at most {MAX_ENTRIES} {what} expected, got {len(value)}"
        )
    return value


def _parameters(value: object, name: str) -> dict[str, Any]:
    """A ``parameters`` object of at most `MAX_ENTRIES` entries."""
    parameters = _object(value, name)
    if len(parameters) > MAX_ENTRIES:
        raise errors.InvalidArgument(
            name, f"at most {MAX_ENTRIES} parameters expected, got {len(parameters)}"
        )
    return parameters


def _set_parameter(target: Any, key: str, value: object, name: str) -> None:
    """Store a JSON parameter value in an ``InferParameter`` map."""
    if isinstance(value, bool):
        target[key].bool_param = value
    elif isinstance(value, int) and INT64_MIN <= value <= INT64_MAX:
        target[key].int64_param = value
    elif isinstance(value, str):
        target[key].string_param = value
    else:
        raise errors.InvalidArgument(
            name,
            "true, false, an integer that fits int64 or a string expected, "
            f"got {_described(value)}",
        )


def _shape(value: object, name: str) -> list[int]:
    if not isinstance(value, list):
        raise errors.InvalidArgument(
            name, f"a JSON array of integers expected, got {_described(value)}"
        )
    dims = value
    if len(dims) > MAX_RANK:
        raise errors.InvalidArgument(
            name, f"at most {MAX_RANK} dimensions expected, got {len(dims)}"
        )
    for dim in dims:
        # Range-checked for protobuf's int64; oip_convert then wants them positive.
        if isinstance(dim, bool) or not isinstance(dim, int) or not INT64_MIN <= dim <= INT64_MAX:
            raise errors.InvalidArgument(
                name, f"a JSON array of integers expected, got {_described(dim)} in it"
            )
    return dims


def _element_count(shape: list[int]) -> int | None:
    """The element count `shape` describes; None when oip_convert refuses the shape itself."""
    if not shape or min(shape) <= 0:
        return None
    return math.prod(shape)


_KIND_NAMES = {
    bool: "true or false",
    float: "a number with a fraction or an exponent",
    str: "a string",
    type(None): "null",
    dict: "an object",
}


def _values(data: object, datatype: str, shape: list[int], name: str) -> bytes:
    """JSON ``data`` -> the raw little-endian bytes of `datatype`, checked value by value
    in numpy."""
    if isinstance(data, RefusedArray):
        raise errors.InvalidArgument(name, f"{data.reason} of {datatype} values")
    if isinstance(data, np.ndarray):
        return _array_values(data, datatype, shape, name)
    if not isinstance(data, list):
        raise errors.InvalidArgument(
            name, f"a JSON array of {datatype} values expected, got {_described(data)}"
        )
    dtype = DATATYPES[datatype]
    if datatype in _FLOATS:
        expected = f"{datatype} values (numbers) expected"
        allowed: tuple[type, ...] = (int, float)
    else:
        limits = np.iinfo(dtype)
        expected = f"{datatype} values (integers in [{limits.min}, {limits.max}]) expected"
        allowed = (int,)
    ragged = errors.InvalidArgument(
        name,
        f"a flat or nested JSON array of {datatype} values expected, its nested arrays "
        "of equal lengths; got ragged ones",
    )
    # The set of element types, gathered in C: no Python code runs per element.
    values: list[Any] = data
    kinds = set(map(type, values))
    if list in kinds:
        # Nested arrays of equal lengths become dimensions; a ragged one stays a list.
        try:
            values = np.array(data, dtype=object).ravel().tolist()
        except ValueError:
            raise ragged from None
        kinds = set(map(type, values))
        if list in kinds:
            raise ragged
    unexpected = kinds - set(allowed)
    if unexpected:
        got = ", ".join(sorted(_KIND_NAMES.get(kind, kind.__name__) for kind in unexpected))
        raise errors.InvalidArgument(name, f"{expected}, got {got}")
    count = _element_count(shape)
    if count is not None and len(values) != count:
        raise errors.InvalidArgument(
            name, f"{count} values expected for shape {shape}, got {len(values)}"
        )
    if datatype in _FLOATS:
        with np.errstate(over="ignore"):
            array = np.fromiter(values, dtype=dtype, count=len(values))
        if not np.isfinite(array).all():
            finfo = np.finfo(dtype)
            raise errors.InvalidArgument(
                name, f"{expected} within ±{finfo.max!s}, got a larger magnitude"
            )
    else:
        try:
            wide = np.fromiter(values, dtype=np.int64, count=len(values))
        except OverflowError:
            raise errors.InvalidArgument(name, f"{expected}, got one beyond int64") from None
        if wide.size:
            low, high = int(wide.min()), int(wide.max())
            if low < limits.min or high > limits.max:
                bad = low if low < limits.min else high
                raise errors.InvalidArgument(name, f"{expected}, got {bad}")
        array = wide.astype(dtype)
    return np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()


def _array_values(array: np.ndarray, datatype: str, shape: list[int], name: str) -> bytes:
    """Data the JSON worker read into an array (`json_worker`) -> raw little-endian bytes
    of `datatype`, with the checks `_values` makes."""
    dtype = DATATYPES[datatype]
    count = _element_count(shape)
    if count is not None and array.size != count:
        raise errors.InvalidArgument(
            name, f"{count} values expected for shape {shape}, got {array.size}"
        )
    if datatype in _FLOATS:
        with np.errstate(over="ignore"):
            values = array.astype(dtype)
        if not np.isfinite(values).all():
            finfo = np.finfo(dtype)
            raise errors.InvalidArgument(
                name,
                f"{datatype} values (numbers) expected within ±{finfo.max!s}, "
                "got a larger magnitude",
            )
    else:
        limits = np.iinfo(dtype)
        expected = f"{datatype} values (integers in [{limits.min}, {limits.max}]) expected"
        if array.dtype.kind not in "iu":
            raise errors.InvalidArgument(name, f"{expected}, got numbers with fractions")
        if array.size:
            low, high = int(array.min()), int(array.max())
            if low < limits.min or high > limits.max:
                raise errors.InvalidArgument(
                    name, f"{expected}, got {low if low < limits.min else high}"
                )
        values = array.astype(dtype)
    return np.ascontiguousarray(values.ravel(), dtype=dtype.newbyteorder("<")).tobytes()


def _document(text: bytes | memoryview) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidArgument("body", f"a JSON object expected: {exc}") from None


class _BinaryData:
    """The bytes after the JSON object, taken in turn by the inputs that declare
    ``binary_data_size``."""

    def __init__(self, payload: memoryview, header_sent: bool) -> None:
        self._payload = payload
        self._header_sent = header_sent
        self._offset = 0

    def take(self, size: int, name: str) -> bytes:
        left = len(self._payload) - self._offset
        if size > left:
            hint = "" if self._header_sent else f"; no {HEADER_LENGTH} header was sent"
            raise errors.InvalidArgument(
                name,
                f"at most {left} bytes expected (those after the JSON object not taken "
                f"by earlier inputs), got {size}{hint}",
            )
        start = self._offset
        self._offset += size
        return bytes(self._payload[start : self._offset])

    def check_all_taken(self) -> None:
        if self._offset != len(self._payload):
            raise errors.InvalidArgument(
                HEADER_LENGTH,
                f"the length of the JSON object expected: {len(self._payload)} bytes follow "
                f"it, but the inputs' parameters.{BINARY_DATA_SIZE} add up to {self._offset}",
            )


def _binary_size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.InvalidArgument(
            name, f"a non-negative integer (bytes) expected, got {_described(value)}"
        )
    return value


def _add_input(request: Any, index: int, value: object, binary_data: _BinaryData) -> None:
    """Add one input of the JSON object to `request`, its data to raw_input_contents."""
    entry = _object(value, f"inputs[{index}]")
    name = _string(entry.get("name", _MISSING), f"inputs[{index}].name")
    where = f"inputs[{_label(name)}]"
    datatype = _string(entry.get("datatype", _MISSING), f"{where}.datatype")
    shape = _shape(entry.get("shape", _MISSING), f"{where}.shape")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    size: int | None = None
    for key, parameter in _parameters(entry.get("parameters", {}), f"{where}.parameters").items():
        if key == BINARY_DATA_SIZE:
            size = _binary_size(parameter, f"{where}.parameters.{BINARY_DATA_SIZE}")
        else:
            _set_parameter(tensor.parameters, key, parameter, f"{where}.parameters[{_label(key)}]")
    data = entry.get("data", _MISSING)
    if size is not None:
        if data is not _MISSING:
            raise errors.InvalidArgument(
                where, f"either data or parameters.{BINARY_DATA_SIZE} expected, not both"
            )
        raw = binary_data.take(size, f"{where}.parameters.{BINARY_DATA_SIZE}")
    elif data is not _MISSING:
        # An unknown datatype is refused by oip_convert, naming it, as over gRPC.
        raw = _values(data, datatype, shape, f"{where}.data") if datatype in DATATYPES else b""
    elif len(tensor.parameters):
        raw = b""  # oip_convert names the parameters it does not support
    else:
        raise errors.InvalidArgument(
            f"{where}.data",
            f"a JSON array of values (or parameters.{BINARY_DATA_SIZE} and the bytes "
            "after the JSON object) expected, got nothing",
        )
    request.raw_input_contents.append(raw)


def _add_output(request: Any, index: int, value: object, binary: dict[str, bool]) -> None:
    """Add one requested output to `request`; its ``binary_data`` goes to `binary`."""
    entry = _object(value, f"outputs[{index}]")
    name = _string(entry.get("name", _MISSING), f"outputs[{index}].name")
    where = f"outputs[{_label(name)}]"
    output = request.outputs.add(name=name)
    for key, parameter in _parameters(entry.get("parameters", {}), f"{where}.parameters").items():
        if key == BINARY_DATA:
            binary[name] = _boolean(parameter, f"{where}.parameters.{BINARY_DATA}")
        else:
            _set_parameter(output.parameters, key, parameter, f"{where}.parameters[{_label(key)}]")


def split_body(
    body: bytes | memoryview, header_length: int | None
) -> tuple[memoryview, memoryview]:
    """(the JSON object's bytes, the binary data after it) of an HTTP infer request body.

    `header_length` is the ``Inference-Header-Content-Length`` (None: the whole body
    is the JSON object)."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view) :]
    if not 0 <= header_length <= len(view):
        raise errors.InvalidArgument(
            HEADER_LENGTH,
            f"a length within the body's {len(view)} bytes expected, got {header_length}",
        )
    return view[:header_length], view[header_length:]


def infer_request(
    body: bytes | memoryview,
    header_length: int | None,
    *,
    model_name: str,
    model_version: str,
) -> tuple[Any, OutputFormat]:
    """An HTTP infer request -> (ModelInferRequest with raw input contents, OutputFormat).

    `header_length` is the ``Inference-Header-Content-Length`` (None: the whole
    body is the JSON object); `model_name` and `model_version` come from the
    URL. Raises InvalidArgument naming the field and what was expected; the
    request still goes through `oip_convert`'s checks.
    """
    header, binary = split_body(body, header_length)
    return infer_request_from_document(
        _document(header),
        binary,
        header_sent=header_length is not None,
        model_name=model_name,
        model_version=model_version,
    )


def infer_request_from_document(
    document: Any,
    binary: memoryview,
    *,
    header_sent: bool,
    model_name: str,
    model_version: str,
) -> tuple[Any, OutputFormat]:
    """`infer_request` for a JSON object already parsed (long arrays of numbers may be
    numpy arrays: see `json_worker`) and the `binary` data after it."""
    document = _object(document, "body")
    binary_data = _BinaryData(binary, header_sent)

    request = service_pb2.ModelInferRequest(model_name=model_name, model_version=model_version)
    request.id = _string(document.get("id", ""), "id")
    default_binary = False
    for key, value in _parameters(document.get("parameters", {}), "parameters").items():
        if key == BINARY_DATA_OUTPUT:
            default_binary = _boolean(value, f"parameters.{BINARY_DATA_OUTPUT}")
        else:
            _set_parameter(request.parameters, key, value, f"parameters[{_label(key)}]")
    inputs = _entries(document.get("inputs", _MISSING), "inputs", "input tensors")
    for index, value in enumerate(inputs):
        _add_input(request, index, value, binary_data)
    binary_data.check_all_taken()
    binary_flags: dict[str, bool] = {}
    outputs = _entries(document.get("outputs", []), "outputs", "requested outputs")
    for index, value in enumerate(outputs):
        _add_output(request, index, value, binary_flags)
    return request, OutputFormat(default_binary, binary_flags)


# -- answers ------------------------------------------------------------------


def _parameters_json(parameters: Any) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, kind) if kind else None
    return values


def _bytes_values(raw: bytes, name: str) -> list[str]:
    # One element per image (the `labels` output): a loop costs far less than the images.
    values: list[str] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise errors.Internal(f"output {name!r}: a BYTES length is cut short")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise errors.Internal(f"output {name!r}: a BYTES element is cut short")
        values.append(raw[offset : offset + length].decode("utf-8", errors="replace"))
        offset += length
    return values


def _json_data(datatype: str, raw: bytes, name: str) -> np.ndarray | list[str]:
    if datatype == "BYTES":
        return _bytes_values(raw, name)
    if datatype not in DATATYPES:
        raise errors.Internal(f"output {name!r} has datatype {datatype!r}, which JSON cannot carry")
    dtype = DATATYPES[datatype]
    # orjson writes numpy arrays of native byte order directly (float32 in its
    # shortest form): faster than a list of Python numbers, and a smaller body.
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)


def infer_response(response: Any, output_format: OutputFormat) -> tuple[bytes, int | None]:
    """A ModelInferResponse with raw output contents -> (HTTP body, header length).

    The header length is the JSON object's length, to send as
    ``Inference-Header-Content-Length``; None when no output is binary (the
    body is plain JSON).
    """
    if len(response.raw_output_contents) != len(response.outputs):
        raise errors.Internal(
            f"the answer has {len(response.outputs)} outputs but "
            f"{len(response.raw_output_contents)} raw output contents"
        )
    outputs: list[dict[str, Any]] = []
    binaries: list[bytes] = []
    any_binary = False
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        parameters = _parameters_json(tensor.parameters)
        if output_format.is_binary(tensor.name):
            any_binary = True
            parameters[BINARY_DATA_SIZE] = len(raw)
            binaries.append(raw)
        else:
            entry["data"] = _json_data(tensor.datatype, raw, tensor.name)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        document["id"] = response.id
    parameters = _parameters_json(response.parameters)
    if parameters:
        document["parameters"] = parameters
    document["outputs"] = outputs
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not any_binary:
        return header, None
    return b"".join([header, *binaries]), len(header)


def _tensors_json(tensors: Any) -> list[dict[str, Any]]:
    return [
        {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        for tensor in tensors
    ]


def server_metadata_json(response: Any) -> dict[str, Any]:
    """A ServerMetadataResponse -> ``{"name", "version", "extensions"}``; the extensions
    include ``binary_tensor_data``, which this HTTP protocol implements."""
    extensions = list(response.extensions)
    if BINARY_EXTENSION not in extensions:
        extensions.append(BINARY_EXTENSION)
    return {"name": response.name, "version": response.version, "extensions": extensions}


def model_metadata_json(response: Any) -> dict[str, Any]:
    """A ModelMetadataResponse -> ``{"name", "versions", "platform", "inputs", "outputs"}``,
    each tensor ``{"name", "datatype", "shape"}``."""
    return {
        "name": response.name,
        "versions": list(response.versions),
        "platform": response.platform,
        "inputs": _tensors_json(response.inputs),
        "outputs": _tensors_json(response.outputs),
    }


def repository_index_json(response: Any) -> list[dict[str, str]]:
    """A RepositoryIndexResponse -> Triton's HTTP index: an array of
    ``{"name", "version", "state", "reason"}``."""
    return [
        {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
        for m in response.models
    ]


def index_request(document: Any) -> bool:
    """The repository index request's body, parsed (``{}`` when empty: tritonclient
    sends none) -> whether only the ready models are listed (``{"ready": true}``).
    The repository is the server's one (`oip_convert.check_repository_name`)."""
    return _boolean(_object(document, "body").get("ready", False), "ready")
