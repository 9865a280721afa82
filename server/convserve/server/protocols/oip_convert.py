"""Open Inference Protocol (KServe v2) messages <-> convserve's typed values.

Pure functions: nothing here talks to the network or the runtime. Messages are
tritonclient's generated ``inference.*`` classes (``tritonclient.grpc.service_pb2``).

Models as the protocol sees them
--------------------------------
``<model name>`` (``mnist`` unless configured otherwise), the digit model:

- versions: the loaded model versions as decimal strings; ``model_version``
  ``""`` means the serving version, ``"3"`` pins version 3.
- input ``images``: UINT8 in [0, 255] or FP32 in [0, 1], shape
  ``[-1,28,28,1]`` (also accepted: ``[N,28,28]`` and ``[N,784]``).
- outputs ``probabilities`` FP32 ``[N,10]`` and ``digits`` INT32 ``[N]`` (the
  most likely digit, as ``convserve.v1.PredictResponse.digits``).

``conv2d`` (`CONV_MODEL`), 2-D convolution with an arbitrary kernel, version ``"1"``:

- inputs ``input`` ([H,W] or [N,H,W,C]), ``kernel`` ([kh,kw] or [kh,kw,C,F]) and
  optional ``bias`` ([F]); FP32 or FP64, all three the same datatype.
- output ``output``: the input's datatype, [H',W'] or [N,H',W',F].
- request parameters (all optional), each a ``string_param`` or an ``int64_param``:
  ``strides`` and ``dilations`` (``"2,1"``, ``"2"`` or 2: default 1),
  ``padding`` (``"VALID"`` (default), ``"SAME"`` or ``"EXPLICIT"``),
  ``explicit_padding`` (``"top,bottom,left,right"`` or one int for all four;
  only with EXPLICIT) and ``mode`` (``"CROSS_CORRELATION"`` (default) or
  ``"CONVOLUTION"``). Names and values are as in ``convserve.v1.ConvolutionOptions``.

Wire conventions: an input's data comes either from ``raw_input_contents``
(one entry per input, little-endian, C order) or from the typed
``contents`` field of its datatype (``uint_contents`` for UINT8,
``fp32_contents``, ``fp64_contents``). The response uses raw output contents
exactly when the request used raw input contents. Requested outputs select and
order the outputs; an empty list means all of them. The request id is echoed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2

from convserve.client.tensor import DTYPE_TO_PROTO, from_tensor
from convserve.server import errors, types
from convserve.v1 import tensor_pb2

CONV_MODEL = "conv2d"
CONV_VERSION = "1"
DIGIT_INPUT = "images"
DIGIT_OUTPUTS = ("probabilities", "digits")
CONV_INPUTS = ("input", "kernel", "bias")
CONV_OUTPUTS = ("output",)
CONV_PARAMETERS = ("strides", "dilations", "padding", "explicit_padding", "mode")
# Triton's scheduling hints, which tritonclient sends when asked; convserve
# schedules by the gRPC deadline alone, so they are accepted and ignored.
IGNORED_PARAMETERS = ("priority", "timeout")

DATATYPES: dict[str, np.dtype] = {
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
DATATYPE_OF: dict[np.dtype, str] = {v: k for k, v in DATATYPES.items()}
# The typed `contents` field that carries each datatype's values.
CONTENTS_FIELD = {
    "UINT8": "uint_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


@dataclass(frozen=True)
class InferInputs:
    """The decoded input tensors of a ModelInferRequest, by name."""

    arrays: dict[str, np.ndarray]
    raw: bool  # the data came in raw_input_contents


def parse_version(text: str, field: str = "model_version") -> int | None:
    """``""`` -> None (the serving version); ``"3"`` -> 3."""
    if text == "":
        return None
    try:
        version = int(text)
    except ValueError:
        version = 0
    # Versions are positive, as in convserve.v1's ModelSpec.
    if version < 1:
        raise errors.InvalidArgument(
            field, f"a positive version number (e.g. '1') or empty expected, got {text!r}"
        )
    return version


def model_ref(name: str, version: str, field: str = "model_version") -> types.ModelRef:
    """The model a request names; an empty name means the default model."""
    return types.ModelRef(name=name or None, version=parse_version(version, field))


def _typed_values(field: str, datatype: str, contents: Any) -> np.ndarray:
    expected = CONTENTS_FIELD[datatype]
    present = [f.name for f, _ in contents.ListFields()]
    if present != [expected]:
        raise errors.InvalidArgument(
            field,
            f"{datatype} values expected in contents.{expected} (or in raw_input_contents), "
            f"got {', '.join('contents.' + p for p in present) or 'no data'}",
        )
    values = getattr(contents, expected)
    if datatype == "UINT8":
        wide = np.asarray(values, dtype=np.uint32)
        if wide.size and int(wide.max()) > 255:
            raise errors.InvalidArgument(
                field, f"UINT8 values in [0, 255] expected, got {int(wide.max())}"
            )
        return wide.astype(np.uint8)
    return np.asarray(values, dtype=DATATYPES[datatype])


def _array(field: str, datatype: str, shape: Sequence[int], data: bytes) -> np.ndarray:
    """Checks shape and byte length exactly as convserve.v1 tensors are checked."""
    dtype = DATATYPES[datatype]
    tensor = tensor_pb2.Tensor(dtype=DTYPE_TO_PROTO[dtype], shape=shape, content=data)
    return from_tensor(tensor, field)


def decode_inputs(
    request: Any, accepted: dict[str, tuple[str, ...]], required: Iterable[str]
) -> InferInputs:
    """Decode `request.inputs` to arrays (read-only when raw).

    `accepted` maps each input name the model takes to its accepted
    datatypes; every name in `required` must be present. Raises
    InvalidArgument naming the input and what was expected.
    """
    raw_count = len(request.raw_input_contents)
    raw = raw_count > 0
    if raw and raw_count != len(request.inputs):
        raise errors.InvalidArgument(
            "raw_input_contents",
            f"one entry per input expected ({len(request.inputs)}), got {raw_count}",
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        field = f"inputs[{name}]" if name else f"inputs[{index}]"
        if name not in accepted:
            raise errors.InvalidArgument(
                field,
                f"one of the inputs {', '.join(accepted)} expected, got {name!r}",
            )
        if name in arrays:
            raise errors.InvalidArgument(field, "each input at most once expected")
        if tensor.datatype not in accepted[name]:
            raise errors.InvalidArgument(
                f"{field}.datatype",
                f"{' or '.join(accepted[name])} expected, got {tensor.datatype or 'none'!r}",
            )
        if len(tensor.parameters):
            raise errors.InvalidArgument(
                f"{field}.parameters",
                "no input parameters expected (shared memory is not supported), got "
                + ", ".join(sorted(tensor.parameters)),
            )
        shape = [int(d) for d in tensor.shape]
        if raw:
            if tensor.HasField("contents"):
                raise errors.InvalidArgument(
                    f"{field}.contents",
                    "no typed contents expected when the request uses raw_input_contents",
                )
            arrays[name] = _array(field, tensor.datatype, shape, request.raw_input_contents[index])
            continue
        values = _typed_values(f"{field}.contents", tensor.datatype, tensor.contents)
        if shape and all(d > 0 for d in shape) and values.size != math.prod(shape):
            raise errors.InvalidArgument(
                f"{field}.contents",
                f"{math.prod(shape)} values expected for shape {shape}, got {values.size}",
            )
        little = values.astype(values.dtype.newbyteorder("<"), copy=False)
        arrays[name] = _array(field, tensor.datatype, shape, little.tobytes())
    for name in required:
        if name not in arrays:
            raise errors.InvalidArgument(f"inputs[{name}]", "this input is required")
    return InferInputs(arrays, raw)


def requested_outputs(request: Any, available: Sequence[str]) -> list[str]:
    """The output names to return, in order; none requested means all of them."""
    if not request.outputs:
        return list(available)
    names: list[str] = []
    for out in request.outputs:
        field = f"outputs[{out.name}]"
        if out.name not in available:
            raise errors.InvalidArgument(
                field, f"one of the outputs {', '.join(available)} expected, got {out.name!r}"
            )
        if out.name in names:
            raise errors.InvalidArgument(field, "each output at most once expected")
        # binary_data is the HTTP protocol's flag; over gRPC it means nothing.
        unsupported = sorted(set(out.parameters) - {"binary_data"})
        if unsupported:
            raise errors.InvalidArgument(
                f"{field}.parameters",
                "no output parameters expected (classification and shared memory are not "
                f"supported), got {', '.join(unsupported)}",
            )
        names.append(out.name)
    return names


def _check_no_parameters(request: Any, allowed: Sequence[str]) -> None:
    unknown = sorted(set(request.parameters) - set(allowed) - set(IGNORED_PARAMETERS))
    if unknown:
        expected = ", ".join(allowed) if allowed else "none for this model"
        raise errors.InvalidArgument(
            "parameters", f"known request parameters expected ({expected}), got {unknown}"
        )


def predict_request(request: Any) -> tuple[np.ndarray, types.ModelRef, list[str], bool]:
    """A digit-model ModelInferRequest -> (images as sent, model, outputs, raw).

    The images still need the runtime's image check (shape, range, limits).
    """
    ref = model_ref(request.model_name, request.model_version)
    _check_no_parameters(request, ())
    inputs = decode_inputs(request, {DIGIT_INPUT: ("UINT8", "FP32")}, (DIGIT_INPUT,))
    outputs = requested_outputs(request, DIGIT_OUTPUTS)
    return inputs.arrays[DIGIT_INPUT], ref, outputs, inputs.raw


def _int_list(field: str, param: Any) -> list[int]:
    kind = param.WhichOneof("parameter_choice")
    if kind == "int64_param":
        return [int(param.int64_param)]
    if kind == "string_param":
        try:
            return [int(part) for part in param.string_param.split(",")]
        except ValueError:
            pass
    raise errors.InvalidArgument(
        field,
        "comma-separated integers as a string (e.g. '2,2') or one int64 expected, got "
        + repr(getattr(param, kind) if kind else None),
    )


def _pair(field: str, param: Any) -> tuple[int, int]:
    values = _int_list(field, param)
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise errors.InvalidArgument(field, f"one or two integers expected, got {values}")


def _choice(field: str, param: Any, choices: Sequence[str]) -> str:
    if param.WhichOneof("parameter_choice") == "string_param":
        value = param.string_param.upper()
        if value in choices:
            return value
        shown = repr(param.string_param)
    else:
        shown = f"a non-string parameter ({param.WhichOneof('parameter_choice')})"
    raise errors.InvalidArgument(field, f"one of {', '.join(choices)} expected, got {shown}")


def convolution_options(parameters: Any) -> types.ConvolutionOptions:
    """The conv2d request parameters -> ConvolutionOptions (see the module docstring)."""
    options: dict[str, Any] = {}
    if "strides" in parameters:
        options["strides"] = _pair("parameters.strides", parameters["strides"])
    if "dilations" in parameters:
        options["dilations"] = _pair("parameters.dilations", parameters["dilations"])
    if "padding" in parameters:
        options["padding"] = _choice(
            "parameters.padding", parameters["padding"], ("VALID", "SAME", "EXPLICIT")
        )
    if "explicit_padding" in parameters:
        pads = _int_list("parameters.explicit_padding", parameters["explicit_padding"])
        if len(pads) == 1:
            pads = pads * 4
        if len(pads) != 4:
            raise errors.InvalidArgument(
                "parameters.explicit_padding",
                f"four integers 'top,bottom,left,right' (or one) expected, got {pads}",
            )
        options["explicit_padding"] = (pads[0], pads[1], pads[2], pads[3])
    if "mode" in parameters:
        options["mode"] = _choice(
            "parameters.mode", parameters["mode"], ("CROSS_CORRELATION", "CONVOLUTION")
        )
    return types.ConvolutionOptions(**options)


def check_conv_version(version: str) -> None:
    """conv2d has one version; any other raises NotFound (InvalidArgument if not a number)."""
    if parse_version(version) not in (None, int(CONV_VERSION)):
        raise errors.NotFound(
            f"model {CONV_MODEL!r} has only version {CONV_VERSION}, got {version}"
        )


def convolve_request(request: Any) -> tuple[types.ConvolveInput, bool]:
    """A conv2d ModelInferRequest -> (convolution, raw); its one output is always returned."""
    check_conv_version(request.model_version)
    _check_no_parameters(request, CONV_PARAMETERS)
    floats = ("FP32", "FP64")
    inputs = decode_inputs(request, {name: floats for name in CONV_INPUTS}, ("input", "kernel"))
    options = convolution_options(request.parameters)
    requested_outputs(request, CONV_OUTPUTS)
    arrays = inputs.arrays
    value = types.ConvolveInput(
        input=arrays["input"], kernel=arrays["kernel"], bias=arrays.get("bias"), options=options
    )
    return value, inputs.raw


def _add_output(response: Any, name: str, array: np.ndarray, raw: bool) -> None:
    datatype = DATATYPE_OF[array.dtype.newbyteorder("=")]
    tensor = response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
    if raw:
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        response.raw_output_contents.append(little.tobytes())
    else:
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(array.ravel().tolist())


def infer_response(
    request: Any,
    model_name: str,
    model_version: str,
    outputs: Sequence[tuple[str, np.ndarray]],
    raw: bool,
) -> Any:
    """A ModelInferResponse carrying `outputs` in order, echoing the request id."""
    response = service_pb2.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request.id
    )
    for name, array in outputs:
        _add_output(response, name, array, raw)
    return response


def predict_response(
    request: Any, result: types.PredictOutput, names: Sequence[str], raw: bool
) -> Any:
    """The digit model's ModelInferResponse for the requested output `names`."""
    values = {"probabilities": result.probabilities, "digits": result.digits}
    return infer_response(
        request,
        result.model_name,
        str(result.model_version),
        [(name, values[name]) for name in names],
        raw,
    )


def convolve_response(request: Any, result: types.ConvolveOutput, raw: bool) -> Any:
    """The conv2d model's ModelInferResponse."""
    return infer_response(request, CONV_MODEL, CONV_VERSION, [("output", result.output)], raw)


def model_metadata_response(meta: types.ModelMetadata, version: int | None) -> Any:
    """The digit model's ModelMetadataResponse.

    `version` (a pinned, loaded version) lists only that version; None lists
    every loaded version. The input is declared UINT8 (the smallest on the
    wire); FP32 is accepted as well.
    """
    versions = [version] if version is not None else list(meta.loaded_versions)
    response = service_pb2.ModelMetadataResponse(
        name=meta.model_name,
        versions=[str(v) for v in versions],
        platform="tensorflow_savedmodel",
    )
    response.inputs.add(name=DIGIT_INPUT, datatype="UINT8", shape=[-1, 28, 28, 1])
    response.outputs.add(name="probabilities", datatype="FP32", shape=[-1, 10])
    response.outputs.add(name="digits", datatype="INT32", shape=[-1])
    return response


def conv_metadata_response() -> Any:
    """The conv2d model's ModelMetadataResponse (FP64 is accepted wherever FP32 is listed)."""
    response = service_pb2.ModelMetadataResponse(
        name=CONV_MODEL, versions=[CONV_VERSION], platform="convserve"
    )
    response.inputs.add(name="input", datatype="FP32", shape=[-1, -1, -1, -1])
    response.inputs.add(name="kernel", datatype="FP32", shape=[-1, -1, -1, -1])
    response.inputs.add(name="bias", datatype="FP32", shape=[-1])
    response.outputs.add(name="output", datatype="FP32", shape=[-1, -1, -1, -1])
    return response
