"""The HTTP APIs against a real server: stock clients, documented shapes, bad input.

TF Serving's REST API through plain `requests` with the request and response
shapes of its documentation, KServe v2 over HTTP through the stock
`tritonclient.http` (JSON and binary data), convserve's JSON API; every
prediction compared with the SavedModel's own output.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as triton_http

from tests.client.conftest import Certs, certs  # noqa: F401  (the fixture)
from tests.interop.loop_thread import serving
from tests.server.runtime_helpers import float_digits, saved_model_probabilities
from tests.server.wire_helpers import scrape

pytestmark = pytest.mark.slow

MAX_MESSAGE_BYTES = 256 * 1024
TOKEN = "http-test-token"


def _settings(model_base_path: Path, **overrides: Any) -> Any:
    from convserve.server.settings import Settings

    values: dict[str, Any] = {
        "model_base_path": model_base_path,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "rest_port": -1,
        "max_images_per_request": 16,
        "max_message_bytes": MAX_MESSAGE_BYTES,
        "max_conv_elements": 4096,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def server(model_base_path: Path) -> Iterator[Any]:
    with serving(_settings(model_base_path)) as running:
        yield running


@pytest.fixture(scope="module")
def url(server: Any) -> str:
    assert server.rest_port > 0
    assert f" rest on :{server.rest_port}" in server.listening_line
    return server.rest_url


@pytest.fixture(scope="module")
def digits(sample_digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Eight held-out digits, uint8 [8,28,28,1]."""
    return np.asarray(sample_digits[0][:8], dtype=np.uint8)[..., np.newaxis]


@pytest.fixture(scope="module")
def expected(model_base_path: Path, digits: np.ndarray) -> np.ndarray:
    """The SavedModel's own probabilities for `digits`."""
    return saved_model_probabilities(model_base_path / "1", float_digits(digits))


def assert_same(probabilities: Any, expected: np.ndarray) -> None:
    got = np.asarray(probabilities, dtype=np.float32)
    assert got.shape == expected.shape
    # Batches of other sizes may round differently in the last bits.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))


def post(url: str, body: Any, **kwargs: Any) -> requests.Response:
    return requests.post(url, json=body, timeout=60, **kwargs)


# -- TF Serving's REST API ----------------------------------------------------


@pytest.mark.parametrize(
    ("signature", "scale"),
    [(None, True), ("serving_default", True), ("predict_uint8", False)],
)
@pytest.mark.parametrize("path", ["mnist", "mnist/versions/1", "mnist/labels/latest"])
def test_tfserving_row_format(
    url: str,
    digits: np.ndarray,
    expected: np.ndarray,
    signature: str | None,
    scale: bool,
    path: str,
) -> None:
    images = float_digits(digits) if scale else digits
    body: dict[str, Any] = {"instances": images.tolist()}
    if signature is not None:
        body["signature_name"] = signature
    answer = post(f"{url}/v1/models/{path}:predict", body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    assert list(answer.json()) == ["predictions"]
    assert_same(answer.json()["predictions"], expected)


def test_tfserving_row_format_with_named_instances(
    url: str, digits: np.ndarray, expected: np.ndarray
) -> None:
    instances = [{"images": image.tolist()} for image in digits]
    answer = post(
        f"{url}/v1/models/mnist:predict",
        {"signature_name": "predict_uint8", "instances": instances},
    )
    assert answer.status_code == 200, answer.text
    assert_same(answer.json()["predictions"], expected)


@pytest.mark.parametrize("named", [False, True])
def test_tfserving_columnar_format(
    url: str, digits: np.ndarray, expected: np.ndarray, named: bool
) -> None:
    # [N,28,28]: single-channel models also take images without their channel axis.
    values = float_digits(digits)[..., 0].tolist()
    answer = post(
        f"{url}/v1/models/mnist:predict", {"inputs": {"images": values} if named else values}
    )
    assert answer.status_code == 200, answer.text
    assert list(answer.json()) == ["outputs"]
    assert_same(answer.json()["outputs"], expected)


def test_curl_default_content_type_is_read_as_json(url: str, digits: np.ndarray) -> None:
    # `curl -d` labels its body application/x-www-form-urlencoded; TF Serving reads it anyway.
    body = '{"signature_name": "predict_uint8", "instances": ' + str(digits[:1].tolist()) + "}"
    answer = requests.post(
        f"{url}/v1/models/mnist:predict",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 1


def test_tfserving_status_and_metadata(url: str) -> None:
    for path in ("mnist", "mnist/versions/1", "mnist/labels/latest"):
        status = requests.get(f"{url}/v1/models/{path}", timeout=30)
        assert status.status_code == 200, status.text
        assert status.json() == {
            "model_version_status": [
                {
                    "version": "1",
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        }
    meta = requests.get(f"{url}/v1/models/mnist/metadata", timeout=30)
    assert meta.status_code == 200, meta.text
    body = meta.json()
    assert body["model_spec"] == {"name": "mnist", "signature_name": "", "version": "1"}
    signatures = body["metadata"]["signature_def"]["signature_def"]
    assert set(signatures) == {"serving_default", "predict_uint8"}
    images = signatures["predict_uint8"]["inputs"]["images"]
    assert images["dtype"] == "DT_UINT8"
    assert [int(d["size"]) for d in images["tensor_shape"]["dim"]] == [-1, 28, 28, 1]


def test_tfserving_classify_is_not_implemented(url: str) -> None:
    answer = post(f"{url}/v1/models/mnist:classify", {"examples": []})
    assert answer.status_code == 501
    assert ":classify is not implemented by convserve" in answer.json()["error"]


# -- KServe v2 / Open Inference Protocol over HTTP -----------------------------


@pytest.fixture(scope="module")
def triton(url: str) -> Iterator[Any]:
    client = triton_http.InferenceServerClient(url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def test_oip_health_and_metadata(triton: Any, url: str) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("mnist")
    assert triton.is_model_ready("mnist", "1")
    assert not triton.is_model_ready("mnist", "7")
    assert not triton.is_model_ready("nope")
    assert triton.get_server_metadata()["name"] == "convserve"
    meta = triton.get_model_metadata("mnist")
    assert meta["name"] == "mnist"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28, 1]}]
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "digits", "labels"}
    index = triton.get_model_repository_index()
    assert {(m["name"], m["state"]) for m in index} == {("mnist", "READY"), ("conv2d", "READY")}
    # The probes' endpoints answer by status code.
    assert requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200


@pytest.mark.parametrize("binary", [False, True])
def test_oip_infer_equals_the_saved_model(
    triton: Any, digits: np.ndarray, expected: np.ndarray, binary: bool
) -> None:
    images = triton_http.InferInput("images", list(digits.shape), "UINT8")
    images.set_data_from_numpy(digits, binary_data=binary)
    outputs = [
        triton_http.InferRequestedOutput(name, binary_data=binary)
        for name in ("probabilities", "digits", "labels")
    ]
    result = triton.infer("mnist", [images], outputs=outputs, request_id="r-1")
    assert result.get_response()["id"] == "r-1"
    assert result.get_response()["model_version"] == "1"
    assert_same(result.as_numpy("probabilities"), expected)
    np.testing.assert_array_equal(result.as_numpy("digits"), expected.argmax(axis=1))
    # BYTES come back as bytes from binary data and as text from JSON.
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("labels").ravel()]
    assert labels == [str(d) for d in expected.argmax(axis=1)]


def test_oip_fp32_json_input(triton: Any, digits: np.ndarray, expected: np.ndarray) -> None:
    images = triton_http.InferInput("images", [len(digits), 28, 28, 1], "FP32")
    images.set_data_from_numpy(float_digits(digits), binary_data=False)
    result = triton.infer("mnist", [images], model_version="1")
    assert_same(result.as_numpy("probabilities"), expected)


def test_oip_conv2d_edge_detection(triton: Any) -> None:
    # The classic example: a vertical edge, found by the kernel [1, -1].
    x = np.ones((6, 8), dtype=np.float32)
    x[:, 2:6] = 0
    inputs = []
    for name, value in (("input", x), ("kernel", np.array([[1.0, -1.0]], dtype=np.float32))):
        tensor = triton_http.InferInput(name, list(value.shape), "FP32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = triton.infer("conv2d", inputs)
    expected = np.zeros((6, 7), dtype=np.float32)
    expected[:, 1] = 1
    expected[:, 5] = -1
    np.testing.assert_array_equal(result.as_numpy("output"), expected)


# -- convserve's JSON API -------------------------------------------------------


def test_convserve_convolve_corr2d(url: str) -> None:
    answer = post(
        f"{url}/v1/convserve/convolve",
        {"input": [[0, 1, 2], [3, 4, 5], [6, 7, 8]], "kernel": [[0, 1], [2, 3]]},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"output": [[19.0, 25.0], [37.0, 43.0]]}
    flipped = post(
        f"{url}/v1/convserve/convolve",
        {
            "input": [[0, 1, 2], [3, 4, 5], [6, 7, 8]],
            "kernel": {"dtype": "float64", "shape": [2, 2], "data": [0, 1, 2, 3]},
            "options": {"mode": "CONVOLUTION", "padding": "VALID"},
        },
    )
    assert flipped.status_code == 200, flipped.text
    # True convolution flips the kernel: [[3, 2], [1, 0]].
    assert flipped.json() == {"output": [[5.0, 11.0], [23.0, 29.0]]}


def test_convserve_fit_kernel_learns_the_edge_kernel(url: str) -> None:
    x = np.ones((6, 8))
    x[:, 2:6] = 0
    y = x[:, :-1] - x[:, 1:]
    answer = post(
        f"{url}/v1/convserve/fit_kernel",
        {"inputs": x.tolist(), "targets": y.tolist(), "kernel_shape": [1, 2], "max_steps": 400,
         "learning_rate": 0.03, "tolerance": 1e-8},
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    body = answer.json()
    np.testing.assert_allclose(body["kernel"], [[1.0, -1.0]], atol=0.05)
    assert body["stop_reason"] in ("converged", "max_steps")
    assert body["loss"][-1] < body["loss"][0]


def test_convserve_feature_maps_and_models(url: str, digits: np.ndarray) -> None:
    answer = post(
        f"{url}/v1/convserve/feature_maps",
        {"model_spec": {"name": "mnist"}, "image": digits[0, ..., 0].tolist()},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["model_name"], body["model_version"]) == ("mnist", 1)
    assert body["feature_maps"], "the model has convolution layers"
    first = np.asarray(body["feature_maps"][0]["activations"])
    assert first.ndim == 3
    assert first.shape[0] <= 28
    models = requests.get(f"{url}/v1/convserve/models", timeout=30).json()
    assert models["default_model"] == "mnist"
    [mnist] = models["models"]
    assert mnist["ready"] is True
    assert mnist["versions"] == [{"version": 1, "state": "AVAILABLE", "serving": True, "error": ""}]
    meta = requests.get(f"{url}/v1/convserve/models/mnist/metadata", timeout=30).json()
    assert meta["model_name"] == "mnist"
    assert meta["inputs"][0]["shape"] == [-1, 28, 28, 1]


# -- bad input -------------------------------------------------------------------

BAD_REQUESTS: dict[str, tuple[str, str, Any, dict[str, str], int, str]] = {
    # case: (method, path, body (bytes or JSON), headers, status, text in the error)
    "malformed JSON": ("POST", "/v1/models/mnist:predict", b"{", {}, 400, "body: valid JSON"),
    "not an object": ("POST", "/v1/models/mnist:predict", b"[1]", {}, 400, "a JSON object"),
    "empty body": ("POST", "/v1/models/mnist:predict", b"", {}, 400, "empty body"),
    "no instances": ("POST", "/v1/models/mnist:predict", {"signature_name": ""}, {}, 400,
                     'exactly one of "instances"'),
    "unknown field": ("POST", "/v1/models/mnist:predict", {"instances": [[0]], "x": 1}, {},
                      400, "'x'"),
    "wrong shape": ("POST", "/v1/models/mnist:predict", {"instances": [[0.5] * 10]}, {}, 400,
                    "instances"),
    "ragged": ("POST", "/v1/models/mnist:predict", {"instances": [[0.5], [0.5, 1]]}, {}, 400,
               "rectangular"),
    "strings": ("POST", "/v1/models/mnist:predict", {"instances": [["a"]]}, {}, 400,
                "instances: numbers expected"),
    "uint8 out of range": ("POST", "/v1/models/mnist:predict",
                           {"signature_name": "predict_uint8", "instances": [[300] * 784]}, {},
                           400, "[0, 255]"),
    "float for uint8": ("POST", "/v1/models/mnist:predict",
                        {"signature_name": "predict_uint8", "instances": [[0.5] * 784]}, {},
                        400, "integers in [0, 255] expected"),
    "unknown signature": ("POST", "/v1/models/mnist:predict",
                          {"signature_name": "x", "instances": [[0] * 784]}, {}, 400,
                          "signature_name: one of"),
    "wrong content type": ("POST", "/v1/models/mnist:predict", {"instances": [[0] * 784]},
                           {"Content-Type": "text/html"}, 415, "Content-Type"),
    "too large": ("POST", "/v1/models/mnist:predict", b" " * (MAX_MESSAGE_BYTES + 1), {}, 413,
                  "--max-message-bytes"),
    "unknown model": ("POST", "/v1/models/nope:predict", {"instances": [[0] * 784]}, {}, 404,
                      "'nope' is not served here"),
    "unknown version": ("POST", "/v1/models/mnist/versions/7:predict",
                        {"instances": [[0] * 784]}, {}, 404, "version 7 is not loaded"),
    "bad version": ("GET", "/v1/models/mnist/versions/x", None, {}, 400,
                    "version: a positive version number"),
    "unknown label": ("POST", "/v1/models/mnist/labels/canary:predict",
                      {"instances": [[0] * 784]}, {}, 404, "canary"),
    "unknown path": ("GET", "/v1/nothing", None, {}, 404, "no such endpoint"),
    "wrong method": ("GET", "/v2/repository/index", None, {}, 405, "POST expected"),
    "oip bad JSON": ("POST", "/v2/models/mnist/infer", b"{", {}, 400, "body"),
    "oip bad header length": ("POST", "/v2/models/mnist/infer", b"{}",
                              {"Inference-Header-Content-Length": "x"}, 400,
                              "Inference-Header-Content-Length"),
    "oip wrong datatype": ("POST", "/v2/models/mnist/infer",
                           {"inputs": [{"name": "images", "datatype": "FP64", "shape": [1, 784],
                                        "data": [0.0] * 784}]}, {}, 400, "datatype"),
    "oip unknown model": ("POST", "/v2/models/nope/infer",
                          {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 784],
                                       "data": [0] * 784}]}, {}, 404, "nope"),
    "convolve too large": ("POST", "/v1/convserve/convolve",
                           {"input": [[0.0] * 70] * 70, "kernel": [[1.0]]}, {}, 400, "input"),
    "convolve bad option": ("POST", "/v1/convserve/convolve",
                            {"input": [[0.0]], "kernel": [[1.0]], "options": {"padding": "X"}},
                            {}, 400, "padding"),
    "load is not offered": ("POST", "/v2/repository/models/mnist/load", {}, {}, 501,
                            "--model-config-file"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_a_json_error(url: str, case: str) -> None:
    method, path, body, headers, status, text = BAD_REQUESTS[case]
    data = body if isinstance(body, bytes) or body is None else __import__("json").dumps(body)
    answer = requests.request(method, url + path, data=data, headers=headers, timeout=60)
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    error = answer.json()["error"]
    assert text in error, error


def test_http_requests_are_counted_by_protocol(server: Any, url: str, digits: np.ndarray) -> None:
    def count(protocol: str, rpc: str, code: str) -> float:
        return scrape(server.metrics_port).get(
            (
                "convserve_requests_total",
                (("code", code), ("model", "mnist"), ("protocol", protocol), ("rpc", rpc)),
            ),
            0.0,
        )

    before = count("tfserving-rest", "Predict", "OK"), count("tfserving-rest", "Predict",
                                                              "INVALID_ARGUMENT")  # fmt: skip
    post(f"{url}/v1/models/mnist:predict", {"instances": float_digits(digits[:1]).tolist()})
    post(f"{url}/v1/models/mnist:predict", {"instances": [[2.0] * 784]})
    after = count("tfserving-rest", "Predict", "OK"), count("tfserving-rest", "Predict",
                                                             "INVALID_ARGUMENT")  # fmt: skip
    assert (after[0] - before[0], after[1] - before[1]) == (1.0, 1.0)


# -- TLS and bearer tokens ------------------------------------------------------------


def test_token_and_tls(model_base_path: Path, certs: Certs, digits: np.ndarray) -> None:  # noqa: F811
    settings = _settings(
        model_base_path,
        auth_token=TOKEN,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
    )
    with serving(settings) as running:
        base = f"https://localhost:{running.rest_port}"
        assert running.rest_url.startswith("https://")
        body = {"signature_name": "predict_uint8", "instances": digits[:1].tolist()}
        path = f"{base}/v1/models/mnist:predict"
        missing = post(path, body, verify=str(certs.ca))
        assert missing.status_code == 401
        assert "missing credentials" in missing.json()["error"]
        wrong = post(path, body, verify=str(certs.ca), headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401
        assert wrong.json() == {"error": "invalid bearer token"}
        good = post(path, body, verify=str(certs.ca), headers={"Authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 200, good.text
        assert len(good.json()["predictions"]) == 1
        # Probes need no token; the models list does.
        assert requests.get(f"{base}/v2/health/ready", verify=str(certs.ca), timeout=30).ok
        models = requests.get(f"{base}/v1/convserve/models", verify=str(certs.ca), timeout=30)
        assert models.status_code == 401
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{base}/v2/health/ready", timeout=30)
