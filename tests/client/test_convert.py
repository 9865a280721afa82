"""Request builders and response parsers, both directions, and the retry arithmetic."""

from __future__ import annotations

import random
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from convserve.client import convert, health
from convserve.client.errors import (
    ConvServeError,
    InputError,
    InternalError,
    InvalidArgumentError,
    UnavailableError,
    error_for,
)
from convserve.client.retry import Attempts, Deadline, RetryPolicy, as_retry_policy
from convserve.v1 import convserve_pb2 as pb
from convserve.v1.tensor_codec import from_tensor, to_tensor

MNIST = (28, 28, 1)


def test_predict_requests_split_in_order_with_the_model_spec() -> None:
    images = np.arange(7 * 784, dtype=np.int64).reshape(7, 784) % 256
    requests = convert.predict_requests(
        images, max_batch_images=3, spec=convert.model_spec("mnist", 2), shape=MNIST
    )
    assert [convert.request_image_count(r) for r in requests] == [3, 3, 1]
    assert all(r.model_spec.name == "mnist" and r.model_spec.version == 2 for r in requests)
    assert [list(r.images.shape) for r in requests] == [[3, 28, 28, 1]] * 2 + [[1, 28, 28, 1]]
    sent = np.concatenate([from_tensor(r.images, "images") for r in requests])
    np.testing.assert_array_equal(sent.reshape(7, 784), images)
    assert not convert.model_spec().HasField("version")


def test_model_spec_by_version_label() -> None:
    spec = convert.model_spec("mnist", version_label="canary")
    assert (spec.name, spec.version_label, spec.HasField("version")) == ("mnist", "canary", False)
    # None and "" both mean no label: the field stays empty.
    assert convert.model_spec("mnist", 2, None) == pb.ModelSpec(name="mnist", version=2)
    assert convert.model_spec("mnist", 2, "") == pb.ModelSpec(name="mnist", version=2)
    with pytest.raises(InputError, match=r"version 2 and version label 'canary': give one"):
        convert.model_spec("mnist", 2, "canary")


def test_list_models_result_reads_version_labels() -> None:
    response = pb.ListModelsResponse(
        models=[
            pb.ModelStatus(
                name="mnist",
                ready=True,
                versions=[pb.ModelVersionStatus(version=1, state="AVAILABLE", serving=True)],
                version_labels={"stable": 1, "canary": 2, "a": 1},
                label_errors=["model mnist: version label 'next' -> 9 not applied: ..."],
            ),
            pb.ModelStatus(name="plain", ready=False),
        ],
        default_model="mnist",
    )
    mnist, plain = convert.list_models_result(response)
    # Sorted by label, whatever order the map arrives in.
    assert mnist.labels == (("a", 1), ("canary", 2), ("stable", 1))
    assert dict(mnist.labels)["canary"] == 2
    assert mnist.label_errors == ("model mnist: version label 'next' -> 9 not applied: ...",)
    assert (plain.labels, plain.label_errors) == ((), ())


def _response(digits: list[int], version: int = 3, classes: int = 10) -> pb.PredictResponse:
    probs = np.full((len(digits), classes), 0.05, np.float32)
    probs[np.arange(len(digits)), digits] = 0.55
    return pb.PredictResponse(
        model_name="m",
        model_version=version,
        digits=digits,
        confidences=[0.55] * len(digits),
        probabilities=to_tensor(probs),
        labels=[f"class {d}" for d in digits],
    )


def test_predict_result_joins_parts_and_keeps_versions() -> None:
    requests = convert.predict_requests(
        np.zeros((3, 28, 28), np.uint8), max_batch_images=2, spec=convert.model_spec(), shape=MNIST
    )
    result = convert.predict_result(requests, [_response([4, 1], 3), _response([9], 4)])
    assert result.digits.tolist() == [4, 1, 9]
    assert result.class_indices.tolist() == [4, 1, 9]
    assert result.labels == ["class 4", "class 1", "class 9"]
    assert [p.model_version for p in result] == [3, 3, 4]
    assert (result.model_name, result.model_version) == ("m", 3)
    assert result[2].top(1) == [(9, pytest.approx(0.55))]
    assert result.confidences.dtype == np.float32


def test_predict_result_rejects_inconsistent_responses() -> None:
    requests = convert.predict_requests(
        np.zeros((2, 28, 28), np.uint8), max_batch_images=2, spec=convert.model_spec(), shape=MNIST
    )
    with pytest.raises(InternalError, match=r"probabilities has shape \[1, 10\], expected \[2,K\]"):
        convert.predict_result(requests, [_response([1])])
    # Any number of classes is fine.
    three = convert.predict_result(requests, [_response([2, 0], classes=3)])
    assert three.probabilities.shape == (2, 3)
    broken = _response([1, 2])
    broken.probabilities.content = b"\x00"
    with pytest.raises(InternalError, match="malformed response: probabilities: content"):
        convert.predict_result(requests, [broken])
    short = _response([1, 2])
    del short.digits[1]
    with pytest.raises(InternalError, match="1 digits and 2 confidences for 2 images"):
        convert.predict_result(requests, [short])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, pb.ConvolutionOptions(
            mode=pb.CONVOLUTION_MODE_CROSS_CORRELATION, strides=[1, 1], dilations=[1, 1],
            padding=pb.PADDING_VALID)),
        ({"mode": "CONVOLUTION", "strides": (2, 1), "padding": "same", "dilations": 2},
         pb.ConvolutionOptions(
            mode=pb.CONVOLUTION_MODE_CONVOLUTION, strides=[2, 1], dilations=[2, 2],
            padding=pb.PADDING_SAME)),
        ({"padding": (1, 0, 2, 3)}, pb.ConvolutionOptions(
            mode=pb.CONVOLUTION_MODE_CROSS_CORRELATION, strides=[1, 1], dilations=[1, 1],
            padding=pb.PADDING_EXPLICIT, explicit_padding=[1, 0, 2, 3])),
    ],
)  # fmt: skip
def test_convolution_options(kwargs: dict, expected: pb.ConvolutionOptions) -> None:
    assert convert.convolution_options(**kwargs) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "flip"}, "mode: expected"),
        ({"strides": 0}, "strides: expected a positive integer"),
        ({"dilations": (1, 2, 3)}, "dilations: expected"),
        ({"padding": "full"}, "padding: expected 'valid', 'same'"),
        ({"padding": (1, 1, -1, 0)}, "padding: expected four non-negative"),
    ],
)
def test_convolution_options_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        convert.convolution_options(**kwargs)


def test_convolve_request_dtypes_follow_the_input() -> None:
    options = convert.convolution_options()
    ints = convert.convolve_request([[1, 2], [3, 4]], [[1]], 2, options)
    assert from_tensor(ints.input, "input").dtype == np.float64
    assert from_tensor(ints.kernel, "kernel").dtype == np.float64
    assert from_tensor(ints.bias, "bias").tolist() == [2.0]
    floats = convert.convolve_request(np.ones((2, 2), np.float32), [[1.5]], None, options)
    assert from_tensor(floats.kernel, "kernel").dtype == np.float32
    assert not floats.HasField("bias")
    with pytest.raises(InputError, match="kernel: expected numbers"):
        convert.convolve_request(np.ones((2, 2)), [["a"]], None, options)
    response = pb.ConvolveResponse(output=to_tensor(np.eye(2)))
    out = convert.convolve_result(response)
    out[0, 0] = 5.0  # the result is a writable copy
    assert out.tolist() == [[5.0, 0.0], [0.0, 1.0]]


def test_fit_kernel_request_and_result() -> None:
    request = convert.fit_kernel_request(
        np.zeros((2, 4, 4)),
        np.zeros((2, 4, 3)),
        (1, 2),
        fit_bias=True,
        options=convert.convolution_options(),
        learning_rate=None,
        max_steps=50,
        tolerance=1e-6,
        seed=3,
    )
    assert list(request.kernel_shape) == [1, 2]
    assert request.fit_bias
    assert (request.learning_rate, request.max_steps, request.seed) == (0.0, 50, 3)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"kernel_shape": (1, 2, 3)}, "kernel_shape"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"max_steps": 0}, "max_steps"),
        ({"tolerance": -1.0}, "tolerance"),
    ]
    for kwargs, message in cases:
        args: dict[str, Any] = {
            "kernel_shape": (1, 2),
            "learning_rate": None,
            "max_steps": None,
            "tolerance": 0.0,
        }
        args.update(kwargs)
        with pytest.raises(InputError, match=message):
            convert.fit_kernel_request(
                np.zeros((4, 4)),
                np.zeros((4, 3)),
                args.pop("kernel_shape"),
                fit_bias=False,
                options=convert.convolution_options(),
                seed=0,
                **args,
            )
    response = pb.FitKernelResponse(
        kernel=to_tensor(np.array([[1.0, -1.0]])), loss=[2.0, 0.1], steps=1, stop_reason="converged"
    )
    result = convert.fit_kernel_result(response)
    assert result.kernel.tolist() == [[1.0, -1.0]]
    assert result.bias is None
    assert result.loss == (2.0, 0.1)
    assert result.stop_reason == "converged"


def test_feature_maps_request_and_result() -> None:
    request = convert.feature_maps_request(
        np.zeros((28, 28), np.uint8), ["conv1"], convert.model_spec("m"), MNIST
    )
    assert list(request.image.shape) == [1, 28, 28, 1]
    assert list(request.layers) == ["conv1"]
    small = convert.feature_maps_request(
        np.zeros(64, np.uint8), [], convert.model_spec("d"), (8, 8, 1)
    )
    assert list(small.image.shape) == [1, 8, 8, 1]
    with pytest.raises(InputError, match="layers: expected a list"):
        convert.feature_maps_request(
            np.zeros((28, 28), np.uint8), "conv1", convert.model_spec(), MNIST
        )
    response = pb.GetFeatureMapsResponse(
        model_name="m",
        model_version=2,
        feature_maps=[
            pb.FeatureMap(layer="b", activations=to_tensor(np.zeros((2, 2, 1), np.float32))),
            pb.FeatureMap(layer="a", activations=to_tensor(np.ones((1, 1, 3), np.float32))),
        ],
    )
    result = convert.feature_maps_result(response)
    assert list(result.maps) == ["b", "a"]  # the server's (layer) order is kept
    assert result.maps["a"].shape == (1, 1, 3)
    assert result.model_version == 2


def test_health_requests_and_status_names() -> None:
    request = health.check_request("convserve.v1.ConvServe")
    assert request == health_pb2.HealthCheckRequest(service="convserve.v1.ConvServe")
    assert health.check_request() == health_pb2.HealthCheckRequest(service="")
    not_serving = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
    assert health.status_name(not_serving) == "NOT_SERVING"
    # A status a newer server may send (field 1, varint 7): shown as its number.
    newer = health_pb2.HealthCheckResponse.FromString(b"\x08\x07")
    assert health.status_name(newer) == "7"


def test_errors_by_code() -> None:
    assert type(error_for(grpc.StatusCode.INVALID_ARGUMENT, "x")) is InvalidArgumentError
    other = error_for(grpc.StatusCode.ABORTED, "why")
    assert type(other) is ConvServeError
    assert (other.code, other.details, str(other)) == (
        grpc.StatusCode.ABORTED,
        "why",
        "ABORTED: why",
    )


# --- Retry arithmetic ------------------------------------------------------------------------


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "nope"


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2.0)
    rng = random.Random(1)
    for retry, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        waits = [policy.backoff_s(retry, rng) for _ in range(200)]
        assert cap / 2 <= min(waits)
        assert max(waits) <= cap
        assert max(waits) - min(waits) > cap / 4  # really random
    assert as_retry_policy(0).max_attempts == 1
    with pytest.raises(ValueError, match="retries must be >= 0"):
        as_retry_policy(-1)


def test_backoff_without_jitter_is_exact() -> None:
    policy = RetryPolicy(initial_backoff_s=0.25, max_backoff_s=1.0, multiplier=2.0, jitter=0.0)
    rng = random.Random(1)
    assert [policy.backoff_s(retry, rng) for retry in range(1, 6)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"jitter must be in \[0, 1\]"):
        RetryPolicy(jitter=1.5)


def test_attempts_decide_what_to_retry() -> None:
    attempts = Attempts(RetryPolicy(max_attempts=3), Deadline(None), random.Random(0))
    assert attempts.timeout_s() is None
    assert attempts.after_failure(_FakeRpcError(grpc.StatusCode.UNAVAILABLE)) > 0
    assert attempts.after_failure(_FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED)) > 0
    with pytest.raises(UnavailableError) as caught:
        attempts.after_failure(_FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    assert caught.value.attempts == 3
    fresh = Attempts(RetryPolicy(max_attempts=3), Deadline(None), random.Random(0))
    with pytest.raises(InvalidArgumentError):
        fresh.after_failure(_FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT))


def test_attempts_never_plan_a_wait_past_the_deadline() -> None:
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=10.0, max_backoff_s=10.0)
    attempts = Attempts(policy, Deadline(5.0), random.Random(0))
    timeout = attempts.timeout_s()
    assert timeout is not None
    assert 4.9 < timeout <= 5.0
    with pytest.raises(UnavailableError):  # a 5-10 s wait cannot fit in 5 s
        attempts.after_failure(_FakeRpcError(grpc.StatusCode.UNAVAILABLE))
