"""Typed OIP ModelInfer and TF Serving Predict payloads above ``max_typed_payload_bytes``
are refused before protobuf parses them.

grpc.aio parses every request on the event loop with the GIL held: 60 MiB of UINT8
values in ``uint_contents`` (varints) took about 0.9 s, stalling every other call,
health checks included. The request deserializers now walk the wire bytes (tags and
lengths only) and refuse such requests unparsed; raw payloads are not limited.

The wire walk is checked on hand-built bytes here; the refusal, the health checks
during it, and the requests that still work, over a real server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2
from tritonclient.grpc import service_pb2

from convserve.server import errors
from convserve.server.protocols import calls, wire
from convserve.server.protocols import oip_convert as oc
from convserve.server.protocols import tfserving_convert as tc
from tests.interop.loop_thread import large_message_settings, serving
from tests.interop.test_loop_stalls import MODEL_INFER, PREDICT, HealthProbe
from tests.interop.test_server import requests_total, scrape
from tests.interop.wire_bytes import varint

MIB = 1 << 20
LIMIT = 4 * MIB  # the setting's default, which the real server below keeps

# -- hand-built wire bytes ------------------------------------------------------


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag(number, 2) + varint(len(payload)) + payload


def vi(number: int, value: int) -> bytes:
    """A varint field."""
    return tag(number, 0) + varint(value)


def fixed32(number: int, value: float) -> bytes:
    return tag(number, 5) + np.float32(value).astype("<f4").tobytes()


def group(number: int, *fields: bytes) -> bytes:
    return tag(number, 3) + b"".join(fields) + tag(number, 4)


# Field numbers from the descriptors, so that the tests do not share a mistake with the code.
INFER = service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name
INPUT = service_pb2.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields_by_name
CONTENTS = service_pb2.InferTensorContents.DESCRIPTOR.fields_by_name
PREDICT_FIELDS = predict_pb2.PredictRequest.DESCRIPTOR.fields_by_name
TENSOR = tensor_pb2.TensorProto.DESCRIPTOR.fields_by_name


def oip_input(name: str, contents: bytes, *, contents_first: bool = False) -> bytes:
    """An InferInputTensor whose `contents` message is `contents` (bytes of its fields)."""
    header = ld(INPUT["name"].number, name.encode()) + ld(INPUT["datatype"].number, b"UINT8")
    body = ld(INPUT["contents"].number, contents)
    return ld(INFER["inputs"].number, body + header if contents_first else header + body)


def uint_contents(count: int) -> bytes:
    """`count` UINT8 values, packed, in an InferTensorContents."""
    return ld(CONTENTS["uint_contents"].number, bytes(range(100)) * (count // 100))


def typed_total(walk: Any, data: bytes) -> list[tuple[str, int]]:
    return list(walk(wire.WireReader(data)))


def test_oip_walk_counts_each_inputs_contents_in_any_order() -> None:
    a, b = uint_contents(1000), uint_contents(300)
    data = (
        ld(INFER["raw_input_contents"].number, b"x" * 50)  # raw bytes are not typed values
        + oip_input("a", a)
        + ld(INFER["model_name"].number, b"mnist")
        + oip_input("b", b, contents_first=True)
        + ld(INFER["id"].number, b"1")
    )
    assert typed_total(oc.infer_typed_payloads, data) == [
        ("inputs[0].contents", len(a)),
        ("inputs[1].contents", len(b)),
    ]
    # The same bytes as protobuf sees them.
    parsed = service_pb2.ModelInferRequest.FromString(data)
    assert [t.contents.ByteSize() for t in parsed.inputs] == [len(a), len(b)]


def test_oip_walk_skips_unknown_and_mistyped_fields_and_groups() -> None:
    contents = uint_contents(500)
    data = (
        vi(99, 7)  # unknown varint
        + ld(98, b"\x00" * 1000)  # unknown bytes: not typed values
        + group(97, vi(1, 1), ld(2, b"zz"), group(3, fixed32(4, 1.0)))
        + vi(INFER["inputs"].number, 5)  # the inputs number with another wire type: unknown
        + oip_input("images", contents)
    )
    assert typed_total(oc.infer_typed_payloads, data) == [("inputs[0].contents", len(contents))]
    parsed = service_pb2.ModelInferRequest.FromString(data)
    assert len(parsed.inputs) == 1


def test_oip_walk_counts_repeated_contents_fields_and_unpacked_values() -> None:
    unpacked = b"".join(vi(CONTENTS["uint_contents"].number, v) for v in range(200))
    body = ld(INPUT["contents"].number, unpacked) + ld(INPUT["contents"].number, unpacked)
    data = ld(INFER["inputs"].number, body)
    assert typed_total(oc.infer_typed_payloads, data) == [("inputs[0].contents", 2 * len(unpacked))]
    # protobuf merges the two: all 400 values (repacked, hence fewer bytes).
    assert (
        len(service_pb2.ModelInferRequest.FromString(data).inputs[0].contents.uint_contents) == 400
    )


@pytest.mark.parametrize(
    "data",
    [
        b"\x2a",  # a tag, no length
        ld(INFER["inputs"].number, b"abc")[:-1],  # shorter than its length
        b"\xff" * 11,  # a varint longer than ten bytes
        tag(7, 3) + vi(1, 1),  # a group never closed
        tag(7, 3) + tag(8, 4),  # closed with another number
        tag(7, 4),  # an end-group tag outside a group
        tag(5, 6) + b"\x00",  # wire type 6
        vi(0, 1),  # field number 0
    ],
)
def test_walk_reports_malformed_bytes(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        typed_total(oc.infer_typed_payloads, data)
    with pytest.raises(Exception, match="Error parsing"):  # protobuf refuses them too
        service_pb2.ModelInferRequest.FromString(data)


def test_walk_work_is_bounded_by_fields_not_bytes() -> None:
    contents = uint_contents(8 * MIB)
    reader = wire.WireReader(oip_input("images", contents))
    assert list(oc.infer_typed_payloads(reader)) == [("inputs[0].contents", len(contents))]
    assert reader.walked == 4  # inputs, then name, datatype, contents: no value is read

    many = b"".join(vi(99, 1) for _ in range(wire.MAX_WALKED_FIELDS + 1))
    with pytest.raises(wire.TooManyFields):
        typed_total(oc.infer_typed_payloads, many)


def tf_input(key: str, *fields: bytes) -> bytes:
    entry = ld(1, key.encode()) + ld(2, b"".join(fields))
    return ld(PREDICT_FIELDS["inputs"].number, entry)


def tf_header() -> bytes:
    shape = ld(TENSOR["tensor_shape"].number, ld(2, vi(1, 3)))
    return (
        vi(TENSOR["dtype"].number, types_pb2.DT_FLOAT)
        + shape
        + vi(TENSOR["version_number"].number, 1)
    )


def test_tf_walk_counts_typed_fields_but_not_the_header_or_tensor_content() -> None:
    packed = ld(TENSOR["float_val"].number, np.zeros(1000, "<f4").tobytes())
    unpacked = b"".join(fixed32(TENSOR["float_val"].number, 1.0) for _ in range(10))
    ints = ld(TENSOR["int_val"].number, bytes(range(50)))
    data = (
        ld(PREDICT_FIELDS["model_spec"].number, ld(1, b"mnist"))
        + tf_input("images", packed, tf_header(), unpacked)
        + ld(PREDICT_FIELDS["output_filter"].number, b"probabilities")
        + tf_input("raw", ld(TENSOR["tensor_content"].number, b"\x00" * 4000), tf_header())
        + tf_input("ints", ints, vi(99, 3))  # an unknown field counts too
    )
    assert typed_total(tc.predict_typed_payloads, data) == [
        ("inputs['images']", 4000 + 10 * 4),
        ("inputs['raw']", 0),
        ("inputs['ints']", 50 + 1),
    ]
    parsed = predict_pb2.PredictRequest.FromString(data)
    assert len(parsed.inputs["images"].float_val) == 1010


def test_tf_walk_shortens_the_input_name() -> None:
    data = tf_input("x" * 10_000, ld(TENSOR["float_val"].number, b"\x00" * 8))
    ((field, size),) = typed_total(tc.predict_typed_payloads, data)
    assert size == 8
    assert len(field) < 100
    assert field.startswith("inputs['xxx")


class _Unparsed:
    """A message class whose parsing fails the test: refused requests are never parsed."""

    DESCRIPTOR = service_pb2.ModelInferRequest.DESCRIPTOR

    @staticmethod
    def FromString(data: bytes) -> Any:
        raise AssertionError("parsed")


def test_deserializer_refuses_unparsed_naming_the_largest_input() -> None:
    data = oip_input("a", uint_contents(3000)) + oip_input("b", uint_contents(5000))
    deserialize = wire.typed_limit_deserializer(
        _Unparsed, oc.infer_typed_payloads, 6000, "contents.*", "raw_input_contents"
    )
    refused = deserialize(data)
    assert isinstance(refused, wire.RefusedRequest)
    assert isinstance(refused.error, errors.InvalidArgument)
    assert str(refused.error) == (
        "inputs[1].contents: at most 6000 bytes of typed values (contents.*) per request "
        "expected (the server's max_typed_payload_bytes); this request has 8006. "
        "Send large tensors in raw_input_contents"
    )


def test_deserializer_parses_requests_within_the_limit() -> None:
    request = service_pb2.ModelInferRequest(model_name="mnist", id="7")
    tensor = request.inputs.add(name="images", datatype="UINT8", shape=[1, 3])
    tensor.contents.uint_contents.extend([1, 200, 3])  # 6 bytes of contents
    request.raw_input_contents.append(b"\x00" * 100_000)  # raw bytes: never limited
    data = request.SerializeToString()
    assert oc.infer_request_deserializer(6)(data) == request
    refused = oc.infer_request_deserializer(5)(data)
    assert isinstance(refused, wire.RefusedRequest)
    assert "at most 5 bytes" in str(refused.error)
    assert "this request has 6." in str(refused.error)
    # Without typed values, a limit of 0 refuses nothing.
    del request.inputs[0].contents.uint_contents[:]
    assert oc.infer_request_deserializer(0)(request.SerializeToString()) == request


def test_deserializer_leaves_malformed_requests_to_protobuf() -> None:
    deserialize = oc.infer_request_deserializer(100)
    # Malformed before the limit is reached: protobuf's error, as INVALID_ARGUMENT.
    refused = deserialize(oip_input("images", uint_contents(50)) + b"\x2a\x7f")
    assert isinstance(refused, wire.RefusedRequest)
    assert str(refused.error) == (
        "request: a well-formed inference.ModelInferRequest expected "
        "(Error parsing message with type 'inference.ModelInferRequest')"
    )
    # Malformed after the typed values have passed the limit: refused for their size.
    contents = uint_contents(500)
    refused = deserialize(oip_input("images", contents) + b"\x2a\x7f")
    assert isinstance(refused, wire.RefusedRequest)
    assert f"this request has at least {len(contents)}. Send large" in str(refused.error)


def test_deserializer_refuses_a_large_request_of_too_many_fields() -> None:
    many = b"".join(vi(99, 1) for _ in range(wire.MAX_WALKED_FIELDS + 1))
    refused = oc.infer_request_deserializer(100)(many)
    assert isinstance(refused, wire.RefusedRequest)
    assert str(refused.error) == (
        f"request: at most {wire.MAX_WALKED_FIELDS} fields expected in a request larger than "
        "the server's max_typed_payload_bytes (100)"
    )
    # Within the limit the walk does not happen: protobuf parses it as usual.
    parsed = oc.infer_request_deserializer(len(many))(many)
    assert parsed == service_pb2.ModelInferRequest.FromString(many)


def test_deserializer_never_raises() -> None:
    def broken(reader: wire.WireReader) -> Iterator[tuple[str, int]]:
        raise RuntimeError("a defect")

    deserialize = wire.typed_limit_deserializer(
        service_pb2.ModelInferRequest, broken, 0, "contents.*", "raw_input_contents"
    )
    refused = deserialize(b"\x0a\x01a")
    assert isinstance(refused, wire.RefusedRequest)
    assert isinstance(refused.error, RuntimeError)  # Calls.run logs it and answers INTERNAL


def test_tf_deserializer_message() -> None:
    data = tf_input("images", tf_header(), ld(TENSOR["float_val"].number, b"\x00" * 4000))
    refused = tc.predict_request_deserializer(1000)(data)
    assert isinstance(refused, wire.RefusedRequest)
    assert str(refused.error) == (
        "inputs['images']: at most 1000 bytes of typed values (*_val) per request expected "
        "(the server's max_typed_payload_bytes); this request has 4000. "
        "Send large tensors in tensor_content"
    )


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_add_servicer_swaps_only_the_named_deserializer() -> None:
    from tritonclient.grpc import service_pb2_grpc

    def deserialize(data: bytes) -> Any:
        return data

    plain, swapped = calls.HandlerRecorder(), calls.HandlerRecorder()
    servicer = service_pb2_grpc.GRPCInferenceServiceServicer()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, plain)
    calls.add_servicer(
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
        servicer,
        swapped,
        {"ModelInfer": deserialize},
    )
    ((handler,),) = [swapped.generic]
    ((original,),) = [plain.generic]
    assert handler.service_name() == original.service_name() == "inference.GRPCInferenceService"
    for method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        details = _Details(f"/inference.GRPCInferenceService/{method.name}")
        ours, theirs = handler.service(details), original.service(details)
        assert ours._replace(request_deserializer=None) == theirs._replace(
            request_deserializer=None
        )
        expected = deserialize if method.name == "ModelInfer" else theirs.request_deserializer
        assert ours.request_deserializer == expected  # bound methods: equal, not identical
        (_, registered), (_, generated) = swapped.registered[0], plain.registered[0]
        assert registered[method.name].request_deserializer == expected
        assert registered[method.name]._replace(request_deserializer=None) == generated[
            method.name
        ]._replace(request_deserializer=None)
    assert handler.service(_Details("/inference.GRPCInferenceService/Nothing")) is None

    with pytest.raises(ValueError, match="no unary-unary method Nothing"):
        calls.add_servicer(
            service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            servicer,
            calls.HandlerRecorder(),
            {"Nothing": deserialize},
        )


# -- over a real server -----------------------------------------------------------

# The worst health-check latency allowed while a large typed request is refused. Measured
# on a busy 2-core machine: 30 to 100 ms for 60 MiB of UINT8 values (receiving the bytes),
# against 0.85 to 0.95 s before requests were refused unparsed (protobuf's parse alone).
MAX_STALL_S = 0.3
N_RAW = 13_400  # 40.1 MiB of float32 pixels
OPTIONS = [
    ("grpc.max_send_message_length", 96 * MIB),
    ("grpc.max_receive_message_length", 96 * MIB),
]


@pytest.fixture(scope="module")
def server(model_base_path: Path) -> Iterator[Any]:
    settings = large_message_settings(model_base_path, N_RAW)
    assert settings.max_typed_payload_bytes == LIMIT
    with serving(settings) as running_server:
        yield running_server


@pytest.fixture(scope="module")
def channel(server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=OPTIONS) as ch:
        yield ch


@pytest.fixture(scope="module")
def digits(sample_digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The held-out digits, uint8 [k, 28, 28, 1]."""
    return np.asarray(sample_digits[0], np.uint8)[..., np.newaxis]


def raw_oip(images: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="mnist")
    datatype = "UINT8" if images.dtype == np.uint8 else "FP32"
    request.inputs.add(name="images", datatype=datatype, shape=list(images.shape))
    request.raw_input_contents.append(images.astype(images.dtype.newbyteorder("<")).tobytes())
    request.outputs.add(name="probabilities")
    return request


def oip_probabilities(channel: grpc.Channel, request: Any) -> np.ndarray:
    call = channel.unary_unary(MODEL_INFER)
    answer = service_pb2.ModelInferResponse.FromString(
        call(request.SerializeToString(), timeout=120)
    )
    if answer.raw_output_contents:
        return np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(-1, 10)
    return np.asarray(answer.outputs[0].contents.fp32_contents, np.float32).reshape(-1, 10)


def tf_predict(images: np.ndarray, *, typed: bool) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    proto = request.inputs["images"]
    proto.dtype = types_pb2.DT_FLOAT
    for d in images.shape:
        proto.tensor_shape.dim.add(size=d)
    floats = images.astype("<f4").tobytes()
    if typed:  # packed float_val, set from bytes: extend() would take seconds for MiBs
        proto.MergeFromString(ld(TENSOR["float_val"].number, floats))
    else:
        proto.tensor_content = floats
    return request


def tf_probabilities(channel: grpc.Channel, request: Any) -> np.ndarray:
    call = channel.unary_unary(PREDICT)
    answer = predict_pb2.PredictResponse.FromString(call(request.SerializeToString(), timeout=120))
    return np.frombuffer(answer.outputs["probabilities"].tensor_content, "<f4").reshape(-1, 10)


def refused_while_probed(server: Any, path: str, data: bytes) -> tuple[grpc.RpcError, float]:
    """Send serialized `data` while health checks run; (its error, the worst check)."""
    target = f"127.0.0.1:{server.port}"
    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        call = channel.unary_unary(path)
        with pytest.raises(grpc.RpcError):
            call(b"", timeout=60)  # warm the connection (an empty request is refused too)
        with HealthProbe(target) as probe, pytest.raises(grpc.RpcError) as exc:
            call(data, timeout=60)
    print(f"{path}: {len(data) / MIB:.1f} MiB refused, worst health {probe.worst_s * 1000:.0f} ms")
    return exc.value, probe.worst_s


def typed_uint8_request(n_images: int) -> tuple[bytes, int]:
    """A serialized ModelInferRequest of `n_images` random UINT8 digits in uint_contents,
    half the values two-byte varints, and the size of its contents message. Built from
    bytes: protobuf would take seconds."""
    values = np.random.default_rng(0).integers(0, 256, n_images * 784, dtype=np.uint8)
    large = values >= 0x80
    packed = np.empty(values.size + int(large.sum()), np.uint8)
    at = np.arange(values.size) + np.concatenate(([0], np.cumsum(large)[:-1]))
    packed[at] = np.where(large, values | 0x80, values)
    packed[at[large] + 1] = 1
    contents = ld(CONTENTS["uint_contents"].number, packed.tobytes())
    tensor = (
        ld(INPUT["name"].number, b"images")
        + ld(INPUT["datatype"].number, b"UINT8")
        + ld(INPUT["shape"].number, b"".join(varint(d) for d in (n_images, 28, 28, 1)))
        + ld(INPUT["contents"].number, contents)
    )
    data = ld(INFER["model_name"].number, b"mnist") + ld(INFER["inputs"].number, tensor)
    return data, len(contents)


def test_large_typed_uint8_oip_request_is_refused_before_parsing(server: Any) -> None:
    data, contents = typed_uint8_request(35_000)  # 40 MiB
    before = scrape(server.metrics_port)
    error, stall = refused_while_probed(server, MODEL_INFER, data)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"inputs[0].contents: at most {LIMIT} bytes of typed values (contents.*) per request "
        f"expected (the server's max_typed_payload_bytes); this request has {contents}. "
        "Send large tensors in raw_input_contents"
    )
    assert stall < MAX_STALL_S
    gained = requests_total(scrape(server.metrics_port), "oip", "ModelInfer", "INVALID_ARGUMENT")
    # The empty warm-up request and the large one.
    assert gained - requests_total(before, "oip", "ModelInfer", "INVALID_ARGUMENT") == 2


def test_large_typed_tf_float_val_request_is_refused_before_parsing(
    server: Any, digits: np.ndarray
) -> None:
    images = np.resize(digits, (4000, 28, 28, 1)).astype(np.float32) / 255  # 12 MiB
    before = scrape(server.metrics_port)
    error, stall = refused_while_probed(
        server, PREDICT, tf_predict(images, typed=True).SerializeToString()
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"inputs['images']: at most {LIMIT} bytes of typed values (*_val) per request expected "
        f"(the server's max_typed_payload_bytes); this request has {images.nbytes}. "
        "Send large tensors in tensor_content"
    )
    assert stall < MAX_STALL_S
    gained = requests_total(scrape(server.metrics_port), "tfserving", "Predict", "INVALID_ARGUMENT")
    assert gained - requests_total(before, "tfserving", "Predict", "INVALID_ARGUMENT") == 2


def test_typed_requests_within_the_limit_are_answered(
    channel: grpc.Channel, digits: np.ndarray
) -> None:
    images = digits[:64]
    expected = oip_probabilities(channel, raw_oip(images))
    typed = service_pb2.ModelInferRequest(model_name="mnist")
    tensor = typed.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
    tensor.contents.uint_contents.extend(images.ravel().tolist())
    np.testing.assert_allclose(oip_probabilities(channel, typed), expected, rtol=1e-5, atol=1e-6)
    floats = images.astype(np.float32) / 255
    probabilities = tf_probabilities(channel, tf_predict(floats, typed=True))
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    assert probabilities.argmax(axis=1).tolist() == expected.argmax(axis=1).tolist()


def test_large_raw_requests_are_answered(channel: grpc.Channel, digits: np.ndarray) -> None:
    distinct = digits[: min(len(digits), 512)].astype(np.float32) / 255
    expected = np.resize(oip_probabilities(channel, raw_oip(distinct)), (N_RAW, 10))
    images = np.resize(distinct, (N_RAW, 28, 28, 1))
    assert images.nbytes > 40 * MIB > 9 * LIMIT
    # Batches of other sizes may round differently in the last bits.
    np.testing.assert_allclose(
        oip_probabilities(channel, raw_oip(images)), expected, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        tf_probabilities(channel, tf_predict(images, typed=False)), expected, rtol=1e-5, atol=1e-6
    )
