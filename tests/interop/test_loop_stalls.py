"""Large typed Open Inference Protocol and TF Serving payloads, and large HTTP bodies,
must not stall the event loop.

A real server (port 0, the shared trained model) answers health checks, sent
every few milliseconds from another thread, while it converts a request or a
response of tens of MiB carried in typed (non-raw) fields. Converting such a
payload element by element used to hold the event loop for seconds (about 3 s
for 63 MiB), delaying every other call, health checks included.

The requests are serialized before the health checks start and the answers
parsed after they stop: the client shares this process, and so the GIL, with
the server, and its own protobuf work must not count as the server's stall.

The server here accepts typed payloads of any size (``max_typed_payload_bytes``
raised), so that the conversions are what is measured; with the default limit
such requests are refused before they are parsed (test_typed_limit.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2
from tritonclient.grpc import service_pb2

from tests.interop.loop_thread import large_message_settings, serving
from tests.interop.wire_bytes import varint

pytestmark = pytest.mark.slow

# The worst health-check latency allowed while a large payload is converted. Measured
# on a busy 2-core machine: about 0.1 s now, 1.5 to 3 s before (the whole conversion).
# The bound sits well above what scheduling noise on a shared machine adds, well below
# what element-by-element conversion costs.
MAX_STALL_S = 0.5
MIB = 1 << 20
N_IMAGES = 8192  # 24.5 MiB of float32 pixels


@pytest.fixture(scope="module")
def server(model_base_path: Path) -> Iterator[Any]:
    settings = large_message_settings(
        model_base_path,
        N_IMAGES,
        # Parsing these typed payloads holds the loop too (about 0.1 s for 60 MiB of
        # floats), but the conversions are what these tests measure.
        max_typed_payload_bytes=96 * MIB,
        rest_port=-1,
    )
    with serving(settings) as running:
        yield running


@pytest.fixture(scope="module")
def target(server: Any) -> str:
    return f"127.0.0.1:{server.port}"


class HealthProbe:
    """Health checks from a thread, one every few ms, over a connection of their own;
    `worst_s` is the longest one took between entering and leaving the context."""

    def __init__(self, target: str) -> None:
        # A subchannel pool of its own: the probe must not queue behind the large
        # payload on a shared HTTP/2 connection.
        self._channel = grpc.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.worst_s = 0.0
        self.checks = 0

    def _run(self) -> None:
        request = health_pb2.HealthCheckRequest()
        while not self._stop.is_set():
            start = time.perf_counter()
            response = self._stub.Check(request, timeout=30)
            elapsed = time.perf_counter() - start
            assert response.status == health_pb2.HealthCheckResponse.SERVING
            self.checks += 1
            if self._started.is_set():
                self.worst_s = max(self.worst_s, elapsed)
            else:
                self._started.set()  # the connection is up: measure from now on
            self._stop.wait(0.005)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        assert self._started.wait(30), "no health check answered"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._channel.close()


def call_bytes(target: str, path: str, request: bytes) -> tuple[bytes, float]:
    """Send a serialized request while health checks run; (serialized answer, worst stall)."""
    with grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", 96 * MIB),
            ("grpc.max_receive_message_length", 96 * MIB),
        ],
    ) as channel:
        # Bytes in, bytes out: no client-side protobuf work while the probe measures.
        call = channel.unary_unary(path)
        call(request, timeout=120)  # warm: connection, first-call costs
        with HealthProbe(target) as probe:
            answer = call(request, timeout=120)
        assert probe.checks > 3, probe.checks
    print(f"{path}: {len(request) / MIB:.1f} MiB in, {len(answer) / MIB:.1f} MiB out, "
          f"worst health check {probe.worst_s * 1000:.0f} ms")  # fmt: skip
    return answer, probe.worst_s


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
PREDICT = "/tensorflow.serving.PredictionService/Predict"


def _packed(message: Any, field: str, array: np.ndarray) -> None:
    """Set a repeated float field from packed little-endian bytes: extend(array.tolist())
    would take seconds for tens of MiB."""
    number = message.DESCRIPTOR.fields_by_name[field].number
    payload = array.astype("<f4").tobytes()
    message.MergeFromString(varint(number << 3 | 2) + varint(len(payload)) + payload)


def _floats(message: Any, field: str) -> np.ndarray:
    """A repeated float field as an array: the message holds only this field, so its
    serialized bytes are a tag, a length and the packed values."""
    data = message.SerializeToString()
    count = len(getattr(message, field))
    header = varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2) + varint(4 * count)
    assert data[: len(header)] == header
    return np.frombuffer(data, "<f4", count=count, offset=len(header))


def _typed_fp32(tensor: Any, array: np.ndarray) -> None:
    _packed(tensor.contents, "fp32_contents", array)


@pytest.fixture(scope="module")
def images(sample_digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """`N_IMAGES` float32 digits [N, 784] in [0, 1]: the held-out ones, repeated in order."""
    digits = np.asarray(sample_digits[0], np.float32).reshape(-1, 784) / np.float32(255)
    return np.resize(digits, (N_IMAGES, 784)).astype("<f4")


@pytest.fixture(scope="module")
def expected(target: str, images: np.ndarray, sample_digits: Any) -> np.ndarray:
    """The probabilities of `images`, from small raw requests of the distinct digits."""
    distinct = min(len(sample_digits[0]), N_IMAGES)
    parts = []
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(MODEL_INFER)
        for start in range(0, distinct, 256):
            batch = images[start : min(start + 256, distinct)]
            request = service_pb2.ModelInferRequest(model_name="mnist")
            request.inputs.add(name="images", datatype="FP32", shape=list(batch.shape))
            request.raw_input_contents.append(batch.tobytes())
            request.outputs.add(name="probabilities")
            response = service_pb2.ModelInferResponse.FromString(
                call(request.SerializeToString(), timeout=60)
            )
            parts.append(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(-1, 10))
    return np.resize(np.concatenate(parts), (N_IMAGES, 10))


def _check_probabilities(probabilities: np.ndarray, expected: np.ndarray) -> None:
    # Batches of other sizes may round differently in the last bits.
    np.testing.assert_allclose(probabilities.reshape(-1, 10), expected, rtol=1e-5, atol=1e-6)


def test_large_typed_oip_digits(target: str, images: np.ndarray, expected: np.ndarray) -> None:
    request = service_pb2.ModelInferRequest(model_name="mnist", id="big")
    _typed_fp32(
        request.inputs.add(name="images", datatype="FP32", shape=list(images.shape)), images
    )
    request.outputs.add(name="probabilities")
    answer, stall = call_bytes(target, MODEL_INFER, request.SerializeToString())
    response = service_pb2.ModelInferResponse.FromString(answer)
    assert response.id == "big"
    probabilities = _floats(response.outputs[0].contents, "fp32_contents")
    _check_probabilities(probabilities, expected)
    assert stall < MAX_STALL_S


def test_large_typed_tfserving_digits(
    target: str, images: np.ndarray, expected: np.ndarray
) -> None:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    proto = request.inputs["images"]
    proto.dtype = types_pb2.DT_FLOAT
    for d in images.shape:
        proto.tensor_shape.dim.add(size=d)
    _packed(proto, "float_val", images)
    answer, stall = call_bytes(target, PREDICT, request.SerializeToString())
    response = predict_pb2.PredictResponse.FromString(answer)
    probabilities = np.frombuffer(response.outputs["probabilities"].tensor_content, "<f4")
    _check_probabilities(probabilities, expected)
    assert stall < MAX_STALL_S


def _conv2d_request(
    x: np.ndarray, kernel: float, **parameters: str
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="conv2d")
    _typed_fp32(request.inputs.add(name="input", datatype="FP32", shape=list(x.shape)), x)
    k = np.full((1, 1, 1, 1), kernel, "<f4")
    _typed_fp32(request.inputs.add(name="kernel", datatype="FP32", shape=[1, 1, 1, 1]), k)
    for key, value in parameters.items():
        request.parameters[key].string_param = value
    return request


def _output(answer: bytes) -> np.ndarray:
    tensor = service_pb2.ModelInferResponse.FromString(answer).outputs[0]
    return _floats(tensor.contents, "fp32_contents").reshape(list(tensor.shape))


def test_large_typed_conv2d_input(target: str) -> None:
    x = np.random.default_rng(0).random((1, 2048, 4096, 1), np.float32).astype("<f4")  # 32 MiB
    answer, stall = call_bytes(target, MODEL_INFER, _conv2d_request(x, 2.0).SerializeToString())
    np.testing.assert_array_equal(_output(answer), 2 * x)  # a 1x1 kernel: a 32 MiB answer too
    assert stall < MAX_STALL_S


def test_small_conv2d_request_with_a_large_typed_answer(target: str) -> None:
    x = np.full((1, 1, 1, 1), 3.0, "<f4")
    pad = "2000,2000,2000,2000"
    request = _conv2d_request(x, 0.5, padding="EXPLICIT", explicit_padding=pad)
    answer, stall = call_bytes(target, MODEL_INFER, request.SerializeToString())
    output = _output(answer)  # [1, 4001, 4001, 1] float32: 61 MiB
    assert output.shape == (1, 4001, 4001, 1)
    assert output[0, 2000, 2000, 0] == 1.5
    assert np.count_nonzero(output) == 1
    assert stall < MAX_STALL_S


# -- HTTP: JSON parsed and converted off the event loop, a slice at a time ---------------


def post_bytes(target: str, url: str, body: bytes, headers: dict[str, str]) -> tuple[Any, float]:
    """POST a prepared body while health checks run; (response, worst stall)."""
    import requests

    with requests.Session() as session:
        session.post(url, data=body, headers=headers, timeout=120).raise_for_status()  # warm
        with HealthProbe(target) as probe:
            answer = session.post(url, data=body, headers=headers, timeout=120)
        assert probe.checks > 3, probe.checks
    print(f"{url}: {len(body) / MIB:.1f} MiB in, {len(answer.content) / MIB:.1f} MiB out, "
          f"worst health check {probe.worst_s * 1000:.0f} ms")  # fmt: skip
    return answer, probe.worst_s


def test_large_tfserving_rest_json(server: Any, target: str, expected: np.ndarray) -> None:
    pixels = np.resize(np.arange(256, dtype=np.uint8), (N_IMAGES, 28, 28, 1))
    body = b'{"signature_name": "predict_uint8", "instances": %s}' % (
        str(pixels.tolist()).replace(" ", "").encode()
    )
    answer, stall = post_bytes(
        target,
        f"{server.rest_url}/v1/models/mnist:predict",
        body,
        {"Content-Type": "application/json"},
    )
    assert answer.status_code == 200, answer.text[:500]
    assert len(answer.json()["predictions"]) == N_IMAGES
    assert stall < MAX_STALL_S


def test_large_oip_http_json(
    server: Any, target: str, images: np.ndarray, expected: np.ndarray
) -> None:
    import json

    request = {
        "inputs": [
            {"name": "images", "datatype": "FP32", "shape": list(images.shape),
             "data": images.ravel().tolist()}
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }  # fmt: skip
    body = json.dumps(request).encode()
    answer, stall = post_bytes(
        target,
        f"{server.rest_url}/v2/models/mnist/infer",
        body,
        {"Content-Type": "application/json"},
    )
    assert answer.status_code == 200, answer.text[:500]
    header_length = int(answer.headers["Inference-Header-Content-Length"])
    header = json.loads(answer.content[:header_length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == N_IMAGES * 10 * 4
    probabilities = np.frombuffer(answer.content[header_length:], "<f4")
    _check_probabilities(probabilities, expected)
    assert stall < MAX_STALL_S
