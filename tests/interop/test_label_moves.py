"""Version labels from the model config file, moved under load over every protocol.

A real server serves two versions of one model (``all {}``) with labels
``stable`` and ``canary`` from TF Serving's model config file. Clients predict
by label without pause over TF Serving's REST API and its gRPC API while the
file is rewritten to move ``canary`` from version 1 to version 2: no request
fails, and the answers move to version 2 without a restart. A label pointing
at a version that is not loaded is refused, with the reason in the log, in
ListModels (``convserve models``) and over HTTP.
"""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from convserve.client import cli
from tests.interop.loop_thread import serving
from tests.polling import wait_for

pytestmark = pytest.mark.slow

POLL_S = 0.2


def config_text(base: Path, **labels: int) -> str:
    entries = "".join(
        f'    version_labels {{ key: "{name}" value: {version} }}\n'
        for name, version in sorted(labels.items())
    )
    return (
        "model_config_list {\n  config {\n"
        f'    name: "mnist"\n    base_path: "{base}"\n'
        "    model_version_policy { all {} }\n"
        f"{entries}  }}\n}}\n"
    )


def write_config(path: Path, text: str) -> None:
    # Written whole and renamed in, as config management tools do.
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


@pytest.fixture(scope="module")
def two_versions(model_base_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("labels") / "mnist"
    for version in ("1", "2"):
        shutil.copytree(model_base_path / "1", base / version)
    return base


@pytest.fixture(scope="module")
def server(two_versions: Path) -> Iterator[Any]:
    from convserve.server.settings import Settings

    config = two_versions.parent / "models.config"
    write_config(config, config_text(two_versions, stable=1, canary=1))
    settings = Settings(
        model_config_file=config,
        model_config_file_poll_wait_s=POLL_S,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        rest_port=-1,
        version_settle_s=0.0,
    )
    with serving(settings) as running:
        running.config_path = config
        yield running


def grpc_version(stub: Any, label: str, image: np.ndarray) -> int:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.version_label = label
    request.model_spec.signature_name = "predict_uint8"
    request.inputs["images"].CopyFrom(_uint8_proto(image))
    return int(stub.Predict(request, timeout=30).model_spec.version.value)


def _uint8_proto(image: np.ndarray) -> Any:
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_UINT8,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in image.shape]
        ),
        tensor_content=image.tobytes(),
    )


def label_version(url: str, label: str) -> str:
    answer = requests.get(f"{url}/v1/models/mnist/labels/{label}/metadata", timeout=30)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["model_spec"]["version"])


def test_moving_a_label_under_load_fails_no_request(
    server: Any, two_versions: Path, sample_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    url = server.rest_url
    image = np.asarray(sample_digits[0][:1], np.uint8)[..., np.newaxis]
    body = {"signature_name": "predict_uint8", "instances": image.tolist()}
    wait_for(lambda: label_version(url, "canary") == "1", what="canary on version 1")
    # By label, the answer is the model's own: the same as by version number.
    by_number = requests.post(
        f"{url}/v1/models/mnist/versions/1:predict", json=body, timeout=30
    ).json()
    by_label = requests.post(
        f"{url}/v1/models/mnist/labels/stable:predict", json=body, timeout=30
    ).json()
    assert by_label == by_number
    assert len(by_label["predictions"][0]) == 10
    failures: list[str] = []
    versions: Counter[int] = Counter()
    rest_ok = Counter[str]()
    stop = threading.Event()

    def rest_user() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                answer = session.post(
                    f"{url}/v1/models/mnist/labels/canary:predict", json=body, timeout=30
                )
                if answer.status_code != 200:
                    failures.append(f"REST {answer.status_code}: {answer.text}")
                else:
                    rest_ok["ok"] += 1

    def grpc_user() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                try:
                    versions[grpc_version(stub, "canary", image)] += 1
                except grpc.RpcError as exc:
                    failures.append(f"gRPC {exc.code().name}: {exc.details()}")

    users = [threading.Thread(target=f) for f in (rest_user, rest_user, grpc_user, grpc_user)]
    for user in users:
        user.start()
    try:
        wait_for(lambda: versions[1] > 20 and rest_ok["ok"] > 20, what="traffic on version 1")
        write_config(server.config_path, config_text(two_versions, stable=1, canary=2))
        wait_for(lambda: versions[2] > 20, what="gRPC traffic on version 2")
        moved_at = rest_ok["ok"]
        wait_for(lambda: rest_ok["ok"] > moved_at + 20, what="REST traffic after the move")
    finally:
        stop.set()
        for user in users:
            user.join(60)
    assert failures == []
    assert label_version(url, "canary") == "2"
    assert label_version(url, "stable") == "1"
    # No restart and no reload: both versions stayed loaded throughout.
    status = requests.get(f"{url}/v1/models/mnist", timeout=30).json()
    assert [(s["version"], s["state"]) for s in status["model_version_status"]] == [
        ("1", "AVAILABLE"),
        ("2", "AVAILABLE"),
    ]


def test_a_label_on_a_missing_version_is_refused(
    server: Any, two_versions: Path, capsys: pytest.CaptureFixture[str], caplog: Any
) -> None:
    url = server.rest_url
    write_config(server.config_path, config_text(two_versions, stable=1, canary=9))

    def refused() -> bool:
        models = requests.get(f"{url}/v1/convserve/models", timeout=30).json()["models"]
        return any("canary" in error for error in models[0]["label_errors"])

    wait_for(refused, what="the label on version 9 refused")
    [model] = requests.get(f"{url}/v1/convserve/models", timeout=30).json()["models"]
    [error] = model["label_errors"]
    assert "9" in error
    assert "not loaded" in error
    # The refused label keeps the version it had; the other label is untouched.
    assert model["labels"]["stable"] == 1
    assert label_version(url, "stable") == "1"
    assert any("canary" in r.getMessage() and "9" in r.getMessage() for r in caplog.records)
    # `convserve models` shows it too.
    assert cli.main(["--target", f"127.0.0.1:{server.port}", "models", "--json"]) == 0
    assert "canary" in capsys.readouterr().out
    write_config(server.config_path, config_text(two_versions, stable=1, canary=2))
    wait_for(lambda: not refused(), what="the refusal cleared")
