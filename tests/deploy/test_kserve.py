"""deploy/kserve: KServe's schemas, its ServingRuntime contract, and the runtime run for real.

No KServe and no cluster here. The manifests are validated offline against strict schemas
of KServe's own API types (`tests/deploy/kserve_schema.py`: the pinned kserve SDK wheel
from PyPI, Kubernetes' types from kubernetes-validate), their promises are checked against
the server's real flags and settings, and `convserve-server` is started exactly as the
ServingRuntime's container would start it, on a model directory laid out as KServe's
storage initializer leaves /mnt/models, and called on every endpoint KServe routes to.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.server.settings import Settings
from tests.conftest import require_tool, samples_of
from tests.deploy.common import (
    DEPLOY,
    KUBERNETES_VERSION,
    dockerfile_stages,
    load_yaml_documents,
    run,
)
from tests.deploy.kserve_schema import (
    KINDS,
    KSERVE_VERSION,
    build_schemas,
    fetch_wheel,
    read_model_classes,
    validator,
)
from tests.deploy.test_kubernetes import PROBE_SERVICES
from tests.polling import wait_for
from tests.server.runtime_helpers import float_digits, saved_model_probabilities
from tests.server.wire_helpers import sample_value, scrape

KSERVE = DEPLOY / "kserve"
RUNTIME = KSERVE / "servingruntime.yaml"
CLUSTER_RUNTIME = KSERVE / "clusterservingruntime.yaml"
MNIST_ISVC = KSERVE / "inferenceservice-mnist.yaml"
MODELS_ISVC = KSERVE / "inferenceservice-models.yaml"
MODEL_CONFIG = KSERVE / "models.config"
MANIFESTS = [RUNTIME, CLUSTER_RUNTIME, MNIST_ISVC, MODELS_ISVC]

# KServe's side of the contract (its documentation and its own runtimes): the container
# it merges the predictor into, where the model is, and where HTTP goes.
CONTAINER_NAME = "kserve-container"
MODEL_DIR = "/mnt/models"
KSERVE_HTTP_PORT = 8080
# A pod's terminationGracePeriodSeconds when nothing sets it (a ServingRuntime cannot).
DEFAULT_TERMINATION_GRACE_S = 30
SETTINGS_ENV = {f"CONVSERVE_{name.upper()}" for name in Settings.model_fields}


def _load(path: Path) -> dict[str, Any]:
    (doc,) = load_yaml_documents(path.read_text())
    return doc


def _container(runtime: dict[str, Any]) -> dict[str, Any]:
    (container,) = runtime["spec"]["containers"]
    return dict(container)


def _flags(args: list[str]) -> dict[str, Any]:
    """The settings a list of server arguments sets, parsed by the server's own parser
    (unknown flags fail), without the environment or validation."""
    return vars(Settings.argument_parser().parse_args(args))


# --- offline validation against KServe's schemas --------------------------------------------


@pytest.fixture(scope="module")
def schemas(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(apiVersion, kind) -> schema, from the pinned kserve wheel (downloaded once into
    pytest's cache directory)."""
    cache = getattr(request.config, "cache", None)
    directory = cache.mkdir("kserve-sdk") if cache is not None else tmp_path_factory.mktemp("k")
    try:
        wheel = fetch_wheel(Path(directory))
    except RuntimeError as exc:
        # The wheel comes from PyPI, which CI reaches: there, not having it is a failure.
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    return build_schemas(read_model_classes(wheel), KUBERNETES_VERSION)


def _validate(schemas: Any, doc: dict[str, Any]) -> None:
    schema = schemas[(doc["apiVersion"], doc["kind"])]
    validator(schema, KUBERNETES_VERSION).validate(doc)


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return load_yaml_documents(run([require_tool("kubectl"), "kustomize", str(KSERVE)]))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_kserve_schemas(schemas: Any, path: Path) -> None:
    doc = _load(path)
    assert (doc["apiVersion"], doc["kind"]) in KINDS
    _validate(schemas, doc)


def test_the_kustomization_renders_the_runtime_and_mnist_and_they_validate(
    schemas: Any, rendered: list[dict[str, Any]]
) -> None:
    assert [(d["kind"], d["metadata"]["name"]) for d in rendered] == [
        ("ServingRuntime", "convserve"),
        ("InferenceService", "mnist"),
    ]
    for doc in rendered:
        _validate(schemas, doc)
    # Rendered as written: the image is the one the kustomization names.
    assert rendered == [_load(RUNTIME), _load(MNIST_ISVC)]
    (image,) = _load(KSERVE / "kustomization.yaml")["images"]
    assert _container(rendered[0])["image"] == f"{image['name']}:{image['newTag']}"


def test_the_schemas_are_strict_and_come_from_the_stated_release(schemas: Any) -> None:
    # deploy/README states the release validated against, and that KServe was not run.
    section = (DEPLOY / "README.md").read_text().split("\n## KServe\n")[1].split("\n## ")[0]
    assert f"KServe **{KSERVE_VERSION}**" in section
    assert "KServe\nitself was **not** run here" in section
    runtime = schemas[("serving.kserve.io/v1alpha1", "ServingRuntime")]["$defs"]
    spec = runtime["V1alpha1ServingRuntimeSpec"]
    assert spec["additionalProperties"] is False
    assert spec["required"] == ["containers"]
    assert {"supportedModelFormats", "protocolVersions", "multiModel", "annotations"} <= set(
        spec["properties"]
    )
    # Containers are Kubernetes' own Container type, strict, of the release the other
    # manifests are validated against.
    assert spec["properties"]["containers"]["items"]["$ref"].endswith(
        "#/$defs/io.k8s.api.core.v1.Container"
    )


BROKEN: dict[str, tuple[Path, Callable[[dict[str, Any]], None], str]] = {
    "misspelled runtime field": (
        RUNTIME,
        lambda d: d["spec"].update(supportedModelFormat=d["spec"].pop("supportedModelFormats")),
        "'supportedModelFormat' was unexpected",
    ),
    "boolean as a string": (
        RUNTIME,
        lambda d: d["spec"].update(multiModel="false"),
        "'false' is not of type 'boolean'",
    ),
    "format version as a number": (
        CLUSTER_RUNTIME,
        lambda d: d["spec"]["supportedModelFormats"][0].update(version=2),
        "2 is not of type 'string'",
    ),
    "misspelled probe in the container": (
        RUNTIME,
        lambda d: d["spec"]["containers"][0].update(
            readinessProbes=d["spec"]["containers"][0].pop("readinessProbe")
        ),
        "'readinessProbes' was unexpected",
    ),
    "probe port as a string": (
        RUNTIME,
        lambda d: d["spec"]["containers"][0]["livenessProbe"]["grpc"].update(port="8081"),
        "'8081' is not of type 'integer'",
    ),
    "runtime without containers": (
        RUNTIME,
        lambda d: d["spec"].pop("containers"),
        "'containers' is a required property",
    ),
    "misspelled predictor field": (
        MNIST_ISVC,
        lambda d: d["spec"]["predictor"]["model"].update(
            storageURI=d["spec"]["predictor"]["model"].pop("storageUri")
        ),
        "'storageURI' was unexpected",
    ),
    "replicas as a string": (
        MODELS_ISVC,
        lambda d: d["spec"]["predictor"].update(minReplicas="2"),
        "'2' is not of type 'integer'",
    ),
    "misspelled replica bound": (
        MNIST_ISVC,
        lambda d: d["spec"]["predictor"].update(
            minReplica=d["spec"]["predictor"].pop("minReplicas")
        ),
        "'minReplica' was unexpected",
    ),
    "wrong kind": (
        CLUSTER_RUNTIME,
        lambda d: d.update(kind="ClusterServingRuntimes"),
        "'ClusterServingRuntime' was expected",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validation_rejects_a_broken_manifest(schemas: Any, case: str) -> None:
    import jsonschema

    path, breakage, message = BROKEN[case]
    doc = copy.deepcopy(_load(path))
    schema = schemas[(doc["apiVersion"], doc["kind"])]
    validator(schema, KUBERNETES_VERSION).validate(doc)
    breakage(doc)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        validator(schema, KUBERNETES_VERSION).validate(doc)


# --- the ServingRuntime contract -----------------------------------------------------------


def test_the_cluster_runtime_is_the_same_runtime_never_auto_selected() -> None:
    runtime, cluster = _load(RUNTIME), _load(CLUSTER_RUNTIME)
    assert (runtime["kind"], cluster["kind"]) == ("ServingRuntime", "ClusterServingRuntime")
    assert runtime["metadata"] == cluster["metadata"]
    assert [f["autoSelect"] for f in runtime["spec"]["supportedModelFormats"]] == [True]
    assert [f["autoSelect"] for f in cluster["spec"]["supportedModelFormats"]] == [False]
    for spec in (runtime["spec"], cluster["spec"]):
        for model_format in spec["supportedModelFormats"]:
            model_format.pop("autoSelect")
    assert runtime["spec"] == cluster["spec"]


def test_the_runtime_serves_tensorflow_2_over_v1_v2_and_grpc_v2() -> None:
    spec = _load(RUNTIME)["spec"]
    assert [(f["name"], f["version"]) for f in spec["supportedModelFormats"]] == [
        ("tensorflow", "2")
    ]
    assert spec["protocolVersions"] == ["v1", "v2", "grpc-v2"]
    assert spec["multiModel"] is False


def test_the_runtime_spells_out_kserves_name_model_dir_and_ports() -> None:
    container = _container(_load(RUNTIME))
    assert container["name"] == CONTAINER_NAME
    assert container["command"] == ["convserve-server"]
    # The installed entry point of that name is the server.
    assert (Path(sys.executable).parent / "convserve-server").is_file()
    (entrypoint,) = [a for k, a in dockerfile_stages()["server"] if k == "ENTRYPOINT"]
    assert entrypoint == '["convserve-server"]'
    flags = _flags(container["args"])
    # {{.Name}}: KServe renders the InferenceService's name; /mnt/models: its storageUri.
    assert flags["model_name"] == "{{.Name}}"
    assert flags["model_base_path"] == MODEL_DIR
    assert int(flags["rest_port"]) == KSERVE_HTTP_PORT
    ports = {int(flags["rest_port"]), int(flags["port"]), int(flags["metrics_port"])}
    assert len(ports) == 3
    # The InferenceService names the ports: a runtime's would be merged with them.
    assert "ports" not in container
    # Everything set through the environment is a real setting with a valid value.
    names = {e["name"] for e in container["env"]} - {"HOME"}
    assert names <= SETTINGS_ENV
    values = {e["name"].removeprefix("CONVSERVE_").lower(): e["value"] for e in container["env"]}
    values.pop("home")
    Settings.model_validate(values)


def test_the_runtime_probes_follow_the_liveness_readiness_split() -> None:
    container = _container(_load(RUNTIME))
    grpc_port = int(_flags(container["args"])["port"])
    for probe, service in PROBE_SERVICES.items():
        assert container[probe]["grpc"] == {"port": grpc_port, "service": service}, probe
    assert container["readinessProbe"]["failureThreshold"] == 1
    # A replica that stops answering is restarted, but never in the middle of its drain.
    liveness = container["livenessProbe"]
    unanswered_s = liveness["periodSeconds"] * liveness["failureThreshold"]
    grace_s = float(Settings.model_fields["grace_period_s"].default)
    assert unanswered_s > DEFAULT_TERMINATION_GRACE_S > grace_s


def test_the_runtime_container_meets_the_restricted_pod_security_standard() -> None:
    runtime = _load(RUNTIME)
    container = _container(runtime)
    context = container["securityContext"]
    (user,) = [args for keyword, args in dockerfile_stages()["runtime"] if keyword == "USER"]
    uid, gid = (int(part) for part in user.split(":"))
    assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid)
    assert context["runAsNonRoot"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert context.get("privileged", False) is False
    assert {"requests", "limits"} <= set(container["resources"])
    # HOME points into /tmp, and /tmp is a writable emptyDir.
    assert {"name": "HOME", "value": "/tmp"} in container["env"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


# What Knative Serving accepts in a serving container (its ContainerMask); a runtime that
# used anything else would work only in KServe's Standard mode.
KNATIVE_CONTAINER_FIELDS = {
    "name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
    "livenessProbe", "ports", "readinessProbe", "resources", "securityContext",
    "startupProbe", "terminationMessagePath", "terminationMessagePolicy", "volumeMounts",
}  # fmt: skip


def test_the_runtime_container_is_one_knative_accepts_too() -> None:
    container = _container(_load(RUNTIME))
    assert set(container) <= KNATIVE_CONTAINER_FIELDS
    assert "lifecycle" not in container


def test_the_scrape_annotations_point_at_the_metrics_port() -> None:
    spec = _load(RUNTIME)["spec"]
    metrics_port = str(int(_flags(_container(_load(RUNTIME))["args"])["metrics_port"]))
    annotations = spec["annotations"]
    assert annotations["prometheus.kserve.io/port"] == metrics_port
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("path", [MNIST_ISVC, MODELS_ISVC], ids=lambda p: p.name)
def test_the_inference_services_use_the_runtime_as_it_serves(path: Path) -> None:
    runtime = _load(RUNTIME)
    flags = _flags(_container(runtime)["args"])
    isvc = _load(path)
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = [(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]]
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    # The first port (the Service's port 80) is HTTP; the one KServe marks gRPC is gRPC.
    ports = model["ports"]
    assert ports[0]["containerPort"] == int(flags["rest_port"]) == KSERVE_HTTP_PORT
    assert "grpc" not in ports[0]["name"]
    (grpc_port,) = [p for p in ports if "grpc" in p["name"] or "h2c" in p["name"]]
    assert grpc_port["containerPort"] == int(flags["port"])
    # Replicas pay a model load each: never scale to zero.
    assert isvc["spec"]["predictor"]["minReplicas"] >= 1


def test_the_models_inference_service_reads_the_model_config_file_here() -> None:
    from convserve.server.model_config import read_model_config_file

    model = _load(MODELS_ISVC)["spec"]["predictor"]["model"]
    flags = _flags(_container(_load(RUNTIME))["args"] + model["args"])
    config = Path(flags["model_config_file"])
    assert config.parent == Path(MODEL_DIR)
    assert config.name == MODEL_CONFIG.name
    entries = read_model_config_file(MODEL_CONFIG)
    assert [e.name for e in entries] == ["mnist", "digits8"]
    # Base paths are relative to the file, so they resolve inside /mnt/models.
    for entry in entries:
        assert entry.base_path.parent == MODEL_CONFIG.parent
    mnist = entries[0]
    assert dict(mnist.labels) == {"canary": 2, "stable": 1}


# --- the runtime, run as its container would run it -----------------------------------------

LISTENING = re.compile(r"convserve-server listening on \S+:(\d+) metrics on :(\d+) rest on :(\d+)")


@dataclass
class Started:
    """A server started from the ServingRuntime, and where its fixed ports went."""

    process: subprocess.Popen[str]
    lines: list[str]
    ports: dict[int, int]  # the YAML's port -> the port bound instead
    args: list[str]

    def url(self, yaml_port: int) -> str:
        return f"http://127.0.0.1:{self.ports[yaml_port]}"

    def target(self, yaml_port: int) -> str:
        return f"127.0.0.1:{self.ports[yaml_port]}"


def runtime_command(
    runtime: dict[str, Any], name: str, model_dir: Path, extra_args: list[str]
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """The container's command line with {{.Name}} rendered, /mnt/models moved to
    `model_dir`, the InferenceService's args appended, and only the three fixed ports
    replaced (0, and -1 for the HTTP port: any free port; tests run in parallel). Also its
    environment, and {port flag: the YAML's port}."""
    container = _container(runtime)
    args = []
    fixed = {}
    free = {"--rest-port": "-1", "--port": "0", "--metrics-port": "0"}
    for arg in [*container["args"], *extra_args]:
        arg = arg.replace("{{.Name}}", name).replace(MODEL_DIR, str(model_dir))
        flag, _, value = arg.partition("=")
        if flag in free:
            fixed[flag] = value
            arg = f"{flag}={free[flag]}"
        args.append(arg)
    assert set(fixed) == set(free), "the runtime fixes each port with --flag=VALUE"
    (command, *rest) = container["command"]
    argv = [str(Path(sys.executable).parent / command), *rest, *args]
    # The container's environment, and nothing of this process's convserve settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    env.update({e["name"]: e["value"] for e in container["env"]})
    return argv, env, fixed


def start_runtime(
    runtime: dict[str, Any], name: str, model_dir: Path, extra_args: list[str] | None = None
) -> Started:
    argv, env, fixed = runtime_command(runtime, name, model_dir, extra_args or [])
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if LISTENING.search(line):
                seen.set()
        seen.set()

    threading.Thread(target=read, daemon=True).start()
    found = LISTENING.search("".join(lines)) if seen.wait(180) else None
    if found is None:
        process.kill()
        process.wait()
        raise AssertionError("the server did not start:\n" + "".join(lines[-40:]))
    grpc_port, metrics_port, rest_port = (int(p) for p in found.groups())
    ports = {
        int(fixed["--port"]): grpc_port,
        int(fixed["--metrics-port"]): metrics_port,
        int(fixed["--rest-port"]): rest_port,
    }
    return Started(process, lines, ports, argv[1:])


def stop(server: Started) -> int:
    """SIGTERM, as the kubelet stops a container; the exit code."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
            raise
    return server.process.returncode


# A probe that errors or times out failed; the kubelet tries it again.
PROBE_FAILURES = (grpc.RpcError, requests.RequestException)


def kubelet_probe(server: Started, probe: dict[str, Any]) -> bool:
    """Execute a probe as the kubelet would, against the port it names."""
    if "grpc" in probe:
        port = probe["grpc"]["port"]
        with grpc.insecure_channel(server.target(port)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                timeout=probe.get("timeoutSeconds", 1),
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    http = probe["httpGet"]
    answer = requests.get(
        server.url(http["port"]) + http["path"], timeout=probe.get("timeoutSeconds", 1)
    )
    return 200 <= answer.status_code < 400


def mnt_models(tmp_path: Path, layout: dict[str, Path]) -> Path:
    """A directory as KServe's storage initializer leaves /mnt/models: the storageUri's
    contents, here {relative path: a directory or file copied there}."""
    root = tmp_path / "mnt-models"
    root.mkdir()
    for relative, source in layout.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
    return root


@pytest.fixture
def digits(sample_digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Six held-out digits, uint8 [6,28,28,1]."""
    return np.asarray(sample_digits[0][:6], dtype=np.uint8)[..., np.newaxis]


def assert_same(probabilities: Any, expected: np.ndarray) -> None:
    got = np.asarray(probabilities, dtype=np.float32).reshape(expected.shape)
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def own_probabilities(version_dir: Path, images: np.ndarray) -> np.ndarray:
    """The SavedModel's own serving_default output for uint8 [N,H,W,1] images."""
    import tensorflow as tf

    module = tf.saved_model.load(str(version_dir))
    scaled = tf.constant(images.astype(np.float32) / np.float32(255.0))
    return np.asarray(module.signatures["serving_default"](images=scaled)["probabilities"])


def v2_infer_body(images: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "images",
                "shape": list(images.shape),
                "datatype": "UINT8",
                "data": images.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "probabilities"}],
    }


def v2_probabilities(answer: requests.Response) -> np.ndarray:
    assert answer.status_code == 200, answer.text
    (output,) = [o for o in answer.json()["outputs"] if o["name"] == "probabilities"]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def v1_predictions(http: str, model_path: str, digits: np.ndarray) -> Any:
    """TF Serving's REST :predict of ``digits`` on ``model_path`` (a name, or a name with
    /versions/N or /labels/L); its predictions, after checking the status."""
    answer = requests.post(
        f"{http}/v1/models/{model_path}:predict",
        json={"instances": float_digits(digits).tolist()},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"]


@pytest.fixture
def mnist_runtime(tmp_path: Path, model_base_path: Path) -> Iterator[tuple[Started, str]]:
    name = "mnist-kserve"  # not the server's default model name: {{.Name}} must count
    model_dir = mnt_models(tmp_path, {"1": model_base_path / "1"})
    server = start_runtime(_load(RUNTIME), name, model_dir)
    try:
        yield server, name
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.mark.slow
def test_the_runtime_serves_every_endpoint_kserve_routes_to(
    mnist_runtime: tuple[Started, str], model_base_path: Path, digits: np.ndarray
) -> None:
    server, name = mnist_runtime
    container = _container(_load(RUNTIME))
    expected = saved_model_probabilities(model_base_path / "1", float_digits(digits))
    http = server.url(KSERVE_HTTP_PORT)
    # Readiness first, through the probe the YAML declares, as KServe waits for it.
    wait_for(
        lambda: kubelet_probe(server, container["readinessProbe"]),
        what="readiness",
        retry_on=PROBE_FAILURES,
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert kubelet_probe(server, container[probe]), probe

    # v1: TF Serving's REST API under the InferenceService's name.
    status = requests.get(f"{http}/v1/models/{name}", timeout=30)
    assert status.status_code == 200, status.text
    assert [(v["version"], v["state"]) for v in status.json()["model_version_status"]] == [
        ("1", "AVAILABLE")
    ]
    assert_same(v1_predictions(http, name, digits), expected)

    # v2 over HTTP: health, model readiness, inference.
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{name}/ready"):
        assert requests.get(http + path, timeout=30).status_code == 200, path
    assert requests.get(f"{http}/v2/models/nope/ready", timeout=30).status_code != 200
    metadata = requests.get(f"{http}/v2/models/{name}", timeout=30).json()
    assert metadata["name"] == name
    answer = requests.post(f"{http}/v2/models/{name}/infer", json=v2_infer_body(digits), timeout=60)
    assert_same(v2_probabilities(answer), expected)

    # v2 over gRPC (grpc-v2): inference.GRPCInferenceService on the gRPC port.
    client = triton_grpc.InferenceServerClient(
        server.target(int(_flags(container["args"])["port"]))
    )
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready(name)
        images = triton_grpc.InferInput("images", list(digits.shape), "UINT8")
        images.set_data_from_numpy(digits)
        result = client.infer(
            name, [images], outputs=[triton_grpc.InferRequestedOutput("probabilities")]
        )
        assert_same(result.as_numpy("probabilities"), expected)
    finally:
        client.close()

    # The metrics endpoint the annotations point at counted all of it.
    annotations = _load(RUNTIME)["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    samples = scrape(server.ports[int(annotations["prometheus.kserve.io/port"])])
    assert sample_value(samples, "convserve_model_ready", model=name) == 1
    for protocol in ("tfserving-rest", "oip-http", "oip"):
        assert sample_value(samples, "convserve_requests_total", protocol=protocol) >= 1, protocol

    # The kubelet's SIGTERM: readiness drops, the server drains and exits 0.
    assert stop(server) == 0, "".join(server.lines[-30:])


@pytest.mark.slow
def test_the_models_inference_service_serves_its_model_config_file(
    tmp_path: Path, model_base_path: Path, digits8_model_dir: Path, digits: np.ndarray
) -> None:
    """inferenceservice-models.yaml's args appended to the runtime's, on a storageUri laid
    out as it says: models.config beside mnist/1, mnist/2 and digits8/1."""
    model_dir = mnt_models(
        tmp_path,
        {
            MODEL_CONFIG.name: MODEL_CONFIG,
            "mnist/1": model_base_path / "1",
            "mnist/2": model_base_path / "1",
            "digits8/1": digits8_model_dir / "1",
        },
    )
    model = _load(MODELS_ISVC)["spec"]["predictor"]["model"]
    server = start_runtime(
        _load(RUNTIME), _load(MODELS_ISVC)["metadata"]["name"], model_dir, model["args"]
    )
    try:
        container = _container(_load(RUNTIME))
        wait_for(
            lambda: kubelet_probe(server, container["readinessProbe"]),
            what="readiness",
            retry_on=PROBE_FAILURES,
        )
        http = server.url(KSERVE_HTTP_PORT)
        wait_for(
            lambda: requests.get(f"{http}/v2/models/digits8/ready", timeout=30).ok,
            what="digits8 ready",
        )

        def mnist_versions() -> list[tuple[str, str]]:
            status = requests.get(f"{http}/v1/models/mnist", timeout=30).json()
            return sorted((v["version"], v["state"]) for v in status["model_version_status"])

        both = [("1", "AVAILABLE"), ("2", "AVAILABLE")]
        wait_for(lambda: mnist_versions() == both, what="mnist versions 1 and 2")
        expected = saved_model_probabilities(model_base_path / "1", float_digits(digits))
        for path in ("mnist/labels/canary", "mnist/labels/stable", "mnist/versions/2"):
            assert_same(v1_predictions(http, path, digits), expected)
        images, _ = samples_of(digits8_model_dir)
        batch = np.asarray(images[:6], dtype=np.uint8)[..., np.newaxis]
        answer = requests.post(
            f"{http}/v2/models/digits8/infer", json=v2_infer_body(batch), timeout=60
        )
        assert_same(v2_probabilities(answer), own_probabilities(digits8_model_dir / "1", batch))
        # The InferenceService's own name is no model of the file.
        isvc_name = _load(MODELS_ISVC)["metadata"]["name"]
        assert requests.get(f"{http}/v2/models/{isvc_name}/ready", timeout=30).status_code != 200
        assert stop(server) == 0, "".join(server.lines[-30:])
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
