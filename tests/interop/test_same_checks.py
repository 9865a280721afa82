"""The three protocols' request converters and the image check of the runtime's predict,
on any input.

The same images (dtype, shape, bytes, model version), malformed or not, sent as
a convserve.v1, Open Inference Protocol or TF Serving message must be accepted
as the same array or refused with the same status code, and nothing but a
ServeError or TensorError may escape (anything else would be INTERNAL).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convserve.server import converters, errors, types
from convserve.server.protocols import oip, tfserving
from convserve.v1.tensor_codec import TensorError
from tests.fake_runtime import FakeRuntime
from tests.interop.three_protocols import (
    Images,
    convserve_predict_request,
    oip_predict_request,
    tfserving_predict_request,
)

MAX_IMAGES = 4


@pytest.fixture(scope="module")
def runtime() -> FakeRuntime:
    # The fake's predict checks images with the runtime's own check (`inputs.check_images`)
    # against an MNIST model's input; no model is loaded.
    return FakeRuntime(max_images=MAX_IMAGES)


Outcome = tuple[grpc.StatusCode, bytes | None]


def _outcome(runtime: FakeRuntime, convert: Callable[[], types.PredictInput]) -> Outcome:
    """(status, checked images' bytes as float32 [N,28,28,1] when accepted)."""
    try:
        images = runtime.checked_images(convert())
    except (errors.ServeError, TensorError) as exc:
        code, _ = errors.status_of(exc)
        return code, None
    assert images.shape[1:] == (28, 28, 1)
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    return grpc.StatusCode.OK, (images.astype(np.float32) / np.float32(scale)).tobytes()


def outcomes(runtime: FakeRuntime, images: Images) -> dict[str, Outcome]:
    # What each protocol's servicer hands the runtime's predict.
    converts: dict[str, Callable[[], types.PredictInput]] = {
        "convserve": lambda: converters.predict_request_from_proto(
            convserve_predict_request(images)
        ),
        "oip": lambda: oip.predict_input(oip_predict_request(images))[0],
        "tfserving": lambda: tfserving.predict_input(tfserving_predict_request(images))[0],
    }
    return {name: _outcome(runtime, convert) for name, convert in converts.items()}


DTYPES = ("uint8", "float32", "float64", "int32", "int64")
DIMS = st.sampled_from([-1, 0, 1, 2, 3, 7, 28, 784, 2**31, 2**62])


MISTAKES = (
    "none",
    "dtype",
    "too many",
    "shape",
    "short content",
    "long content",
    "NaN",
    "Inf",
    "above 1",
    "below 0",
    "version",
)


@st.composite
def images_strategy(draw: st.DrawFn) -> Images:
    mistake = draw(st.sampled_from((*MISTAKES, "anything")))
    if mistake == "anything":
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        shape = tuple(draw(st.lists(DIMS, max_size=5)))
        return Images(dtype.name, shape, draw(st.binary(max_size=64)))
    # N images of an accepted shape, with at most one mistake.
    if mistake == "dtype":
        dtype = np.dtype(draw(st.sampled_from(DTYPES[2:])))
    else:
        dtype = np.dtype(draw(st.sampled_from(DTYPES[:2])))
    n = MAX_IMAGES + 1 if mistake == "too many" else draw(st.integers(1, MAX_IMAGES))
    shapes = (
        [(n, 28, 28, 2), (n, 27, 28), (n, 28 * 28, 1)]
        if mistake == "shape"
        else [
            (n, 28, 28),
            (n, 28, 28, 1),
            (n, 784),
        ]
    )
    shape = draw(st.sampled_from(shapes))
    array = np.full(shape, 0.25 if dtype.kind == "f" else draw(st.integers(0, 255)), dtype)
    bad_values = {"NaN": math.nan, "Inf": -math.inf, "above 1": 1.5, "below 0": -0.01}
    if mistake in bad_values and dtype.kind == "f":
        array.flat[draw(st.integers(0, array.size - 1))] = bad_values[mistake]
    content = array.astype(dtype.newbyteorder("<")).tobytes()
    if mistake == "short content":
        content = content[: draw(st.integers(0, len(content) - 1))]
    if mistake == "long content":
        content += bytes(draw(st.integers(1, 8)))
    version = (
        draw(st.sampled_from([0, -3])) if mistake == "version" else draw(st.sampled_from([None, 1]))
    )
    return Images(dtype.name, shape, content, version=version)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(images=images_strategy())
def test_every_protocol_accepts_and_refuses_the_same_images(
    runtime: FakeRuntime, images: Images
) -> None:
    results = outcomes(runtime, images)
    assert results["oip"] == results["convserve"], images
    assert results["tfserving"] == results["convserve"], images


def test_a_good_request_is_accepted_alike(runtime: FakeRuntime) -> None:
    pixels = np.arange(2 * 784, dtype=np.uint8).reshape(2, 28, 28) % 251
    results = outcomes(runtime, Images.of(pixels))
    expected = (pixels.astype(np.float32) / np.float32(255.0)).tobytes()
    assert results == dict.fromkeys(results, (grpc.StatusCode.OK, expected))
