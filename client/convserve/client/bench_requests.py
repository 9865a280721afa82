"""The load generator's inputs: image pools and pre-serialized requests.

Requests are serialized once, before the run, and sent as raw bytes, so the
generator spends its CPU on gRPC and not on protobuf or numpy. The pool's
images are resized to the model's declared input shape when it differs
(the synthetic pool is MNIST-sized, 28x28).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convserve.client.errors import InputError
from convserve.client.images import image_batch, resize_batch
from convserve.v1 import convserve_pb2 as pb
from convserve.v1.images import ImageShape
from convserve.v1.tensor_codec import to_tensor

PREDICT_METHOD = "/convserve.v1.ConvServe/Predict"
PREDICT_STREAM_METHOD = "/convserve.v1.ConvServe/PredictStream"
METADATA_METHOD = "/convserve.v1.ConvServe/GetModelMetadata"
CONVOLVE_METHOD = "/convserve.v1.ConvServe/Convolve"
OIP_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
# Distinct requests cycled through, so that no layer can serve a repeat from a cache.
REQUEST_POOL = 16

# Seven-segment layout: (row0, col0, row1, col1) in a 20x12 box, per segment a-g.
_SEGMENTS = {
    "a": (0, 0, 0, 11),
    "b": (0, 11, 9, 11),
    "c": (10, 11, 19, 11),
    "d": (19, 0, 19, 11),
    "e": (10, 0, 19, 0),
    "f": (0, 0, 9, 0),
    "g": (9, 0, 10, 11),
}
_DIGIT_SEGMENTS = [
    "abcdef",
    "bc",
    "abged",
    "abgcd",
    "fgbc",
    "afgcd",
    "afgedc",
    "abc",
    "abcdefg",
    "abcdfg",
]


def synthetic_digits(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic digit-like images (uint8 [count,28,28]) and their labels.

    Seven-segment digits with random stroke width, shift and slant: not
    MNIST, but inputs of the right shape and ink density, for load tests
    without a data set.
    """
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    labels = np.arange(count, dtype=np.int64) % 10
    for n in range(count):
        canvas = np.zeros((28, 28), dtype=np.float64)
        top = 4 + int(rng.integers(-1, 2))
        left = 8 + int(rng.integers(-2, 3))
        width = int(rng.integers(2, 4))  # MNIST strokes are two to three pixels wide
        slant = float(rng.uniform(-0.2, 0.2))
        for segment in _DIGIT_SEGMENTS[labels[n]]:
            r0, c0, r1, c1 = _SEGMENTS[segment]
            for r in range(r0, r1 + 1):
                for c in range(c0, c1 + 1):
                    y = top + r - width // 2
                    x = left + c + round(slant * (10 - r)) - width // 2
                    canvas[y : y + width, x : x + width] = 1.0
        images[n] = (canvas * 255).astype(np.uint8)
    return images, labels


def load_images(path: str | Path) -> np.ndarray:
    """Images from an .npz file's ``images`` array (or an .npy file) as uint8 [N,H,W,C].

    [N,H,W] arrays are one-channel images; float pixels in [0, 1] are scaled to 0-255.
    """
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a numpy .npz/.npy file ({exc})") from exc
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if "images" not in loaded.files:
                found = ", ".join(loaded.files) or "none"
                raise InputError(f"{path}: no 'images' array (found {found})")
            array = loaded["images"]
    else:
        array = np.asarray(loaded)
    if array.ndim not in (3, 4) or 0 in array.shape:
        raise InputError(f"{path}: images must be [N,H,W] or [N,H,W,C], got {list(array.shape)}")
    shape = (array.shape[1], array.shape[2], array.shape[3] if array.ndim == 4 else 1)
    try:
        batch = image_batch(array, shape)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    if batch.dtype != np.uint8:
        batch = np.rint(batch * 255.0).astype(np.uint8)
    return batch


def _batches(images: np.ndarray, per_request: int) -> list[np.ndarray]:
    """REQUEST_POOL batches of `per_request` images, cycling through `images`."""
    index = np.arange(REQUEST_POOL * per_request) % images.shape[0]
    return [images[index[i * per_request : (i + 1) * per_request]] for i in range(REQUEST_POOL)]


def convserve_requests(
    rpc: str,
    images: np.ndarray,
    per_request: int,
    model_name: str,
    shape: ImageShape | None = None,
) -> tuple[str, list[bytes]]:
    """(method path, serialized requests) for convserve.v1 Predict or Convolve.

    `images`: the uint8 [k,H,W] or [k,H,W,C] pool. Predict needs `shape`, the
    model's (H, W, C): the pool is resized to it and sent as [n,H,W,C].
    """
    if rpc == "predict":
        if shape is None:
            raise InputError("predict requests need the model's input shape")
        pool = resize_batch(images, shape)
        spec = pb.ModelSpec(name=model_name)
        return PREDICT_METHOD, [
            pb.PredictRequest(model_spec=spec, images=to_tensor(b)).SerializeToString()
            for b in _batches(pool, per_request)
        ]
    if rpc == "convolve":
        # A 3x3 edge detector over the images as one [N,H,W,C] float32 batch.
        pool = images if images.ndim == 4 else images[..., np.newaxis]
        edges = np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]], np.float32)
        kernel = np.repeat(edges[:, :, np.newaxis, np.newaxis], pool.shape[3], axis=2)
        options = pb.ConvolutionOptions(padding=pb.PADDING_SAME)
        return CONVOLVE_METHOD, [
            pb.ConvolveRequest(
                input=to_tensor(b.astype(np.float32) / 255.0),
                kernel=to_tensor(kernel),
                options=options,
            ).SerializeToString()
            for b in _batches(pool, per_request)
        ]
    raise InputError(f"rpc: expected predict or convolve, got {rpc!r}")


def stream_requests(requests: list[bytes]) -> list[bytes]:
    """Serialized PredictRequests as PredictStreamRequests without an id.

    Serialized protobuf messages concatenate as a merge, so the sender
    prepends each request's id as ``PredictStreamRequest(id=n)`` bytes.
    """
    return [
        pb.PredictStreamRequest(request=pb.PredictRequest.FromString(r)).SerializeToString()
        for r in requests
    ]


def import_oip() -> tuple[Any, Any]:
    """tritonclient's generated Open Inference Protocol modules (service_pb2, service_pb2_grpc)."""
    try:
        from tritonclient.grpc import service_pb2, service_pb2_grpc
    except ImportError as exc:
        raise ImportError(
            "--protocol oip needs tritonclient: pip install 'convserve[oip]'"
        ) from exc
    return service_pb2, service_pb2_grpc


@dataclass(frozen=True)
class OipInput:
    """The OIP input requests carry: the model's first declared input, or one given."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    # Where it was given, for error messages: the flag and its value (e.g.
    # "--compare-input x:UINT8:-1,28"); empty when it comes from the model's metadata.
    given_as: str = ""

    @property
    def described(self) -> str:
        return self.given_as or f"model input {self.name!r}"


# OIP datatypes that can hold the images: integers get the 0-255 pixels, floats
# get them scaled to [0, 1]. (INT8 cannot hold 255; BOOL and BYTES are not numbers.)
_OIP_DTYPES: dict[str, type[np.generic]] = {
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def first_input(model: str, inputs: Sequence[OipInput]) -> OipInput:
    """The input requests carry: the first `model` declares (InputError if it declares none)."""
    if not inputs:
        raise InputError(
            f"model {model!r} declares no inputs; give the input to send with "
            "--input NAME:DTYPE:SHAPE (e.g. --input images:UINT8:-1,28,28,1)"
        )
    return inputs[0]


def oip_input(metadata: Any) -> OipInput:
    """Read the first input of a ModelMetadataResponse."""
    inputs = [OipInput(i.name, i.datatype, tuple(int(d) for d in i.shape)) for i in metadata.inputs]
    return first_input(metadata.name, inputs)


def parse_oip_input(text: str, flag: str = "--input") -> OipInput:
    """``NAME:DTYPE:SHAPE`` (e.g. ``images:FP32:-1,28,28,1``) given with `flag` as an OipInput.

    Only the syntax is checked here; whether the input can take the images is
    checked by `check_oip_input`.
    """
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise InputError(
            f"{flag}: expected NAME:DTYPE:SHAPE such as images:UINT8:-1,28,28,1, got {text!r}"
        )
    name, datatype, shape_text = parts
    try:
        shape = tuple(int(d) for d in shape_text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(
            f"{flag}: SHAPE must be comma-separated integers such as -1,28,28,1, got {shape_text!r}"
        ) from None
    return OipInput(name, datatype.upper(), shape, given_as=f"{flag} {text}")


def _image_pool(spec: OipInput, images: np.ndarray) -> np.ndarray:
    """`images` as [k, *image shape of spec]; InputError naming `spec` if it cannot take them."""
    if spec.datatype not in _OIP_DTYPES:
        raise InputError(
            f"{spec.described}: datatype {spec.datatype} cannot hold image pixels; "
            f"expected one of {', '.join(_OIP_DTYPES)}"
        )
    if not spec.shape or spec.shape[0] != -1:
        raise InputError(
            f"{spec.described}: expected a leading batch dimension of -1, "
            f"got shape {list(spec.shape)}"
        )
    image_shape = spec.shape[1:]
    if any(d < 1 for d in image_shape):
        raise InputError(
            f"{spec.described}: shape {list(spec.shape)} has a variable dimension after the batch"
        )
    pool = images if images.ndim == 4 else images[..., np.newaxis]
    if math.prod(image_shape) != math.prod(pool.shape[1:]):
        if len(image_shape) not in (2, 3):
            raise InputError(
                f"{spec.described}: shape {list(spec.shape)} does not hold images of "
                f"{'x'.join(map(str, pool.shape[1:]))} pixels, and is not [-1,H,W] or [-1,H,W,C]"
            )
        h, w, *c = image_shape
        pool = resize_batch(pool, (h, w, c[0] if c else 1))
    return pool


def check_oip_input(spec: OipInput, images: np.ndarray) -> None:
    """InputError (naming where `spec` came from) unless requests of `spec` can carry `images`."""
    _image_pool(spec, images[:1])


def oip_arrays(spec: OipInput, images: np.ndarray, per_request: int) -> list[np.ndarray]:
    """The request pool's batches as arrays of `spec`: [per_request, *spec.shape[1:]].

    The batch dimension (the leading -1) becomes `per_request`. The other
    dimensions are [H,W] or [H,W,C] (the pool is resized to them when they
    differ), or any shape holding exactly one of the pool's images (e.g. a
    flat [H*W]). Integer inputs get 0-255 pixels, floating-point inputs get
    values in [0, 1]; other datatypes (BOOL, BYTES, INT8) are refused.
    """
    pool = _image_pool(spec, images)
    shape = (per_request, *spec.shape[1:])
    dtype = np.dtype(_OIP_DTYPES[spec.datatype])
    floats = np.issubdtype(dtype, np.floating)
    arrays = []
    for batch in _batches(pool, per_request):
        values = batch.astype(dtype) / 255.0 if floats else batch
        arrays.append(np.ascontiguousarray(values, dtype=dtype).reshape(shape))
    return arrays


def little_endian_bytes(array: np.ndarray) -> bytes:
    """An array's elements as the protocols carry them: little-endian, C order."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def oip_requests(
    model_name: str, spec: OipInput, images: np.ndarray, per_request: int
) -> tuple[str, list[bytes]]:
    """(method path, serialized ModelInferRequests) with the images as raw input contents
    (see `oip_arrays` for the shapes and values)."""
    service_pb2, _ = import_oip()
    requests = []
    for values in oip_arrays(spec, images, per_request):
        request = service_pb2.ModelInferRequest(model_name=model_name)
        tensor = request.inputs.add(name=spec.name, datatype=spec.datatype)
        tensor.shape.extend(values.shape)
        request.raw_input_contents.append(little_endian_bytes(values))
        requests.append(request.SerializeToString())
    return OIP_INFER_METHOD, requests
