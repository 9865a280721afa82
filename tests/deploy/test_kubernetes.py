"""Kubernetes manifests: render every kustomization, validate it offline, check its promises."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from convserve.server.settings import Settings
from tests.conftest import REPO_ROOT, require_tool
from tests.deploy.common import (
    GRPC_PORT,
    KUBERNETES_VERSION,
    KUSTOMIZATIONS,
    METRICS_PORT,
    REST_PORT,
    dockerfile_stages,
    load_yaml_documents,
    run,
)
from tests.deploy.schemas import CUSTOM_RESOURCES

VALIDATE = str(REPO_ROOT / ".venv" / "bin" / "kubernetes-validate")
SETTINGS_ENV = {f"CONVSERVE_{name.upper()}" for name in Settings.model_fields}


def _render(path: Path) -> str:
    return run([require_tool("kubectl"), "kustomize", str(path)])


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return {name: _render(path) for name, path in KUSTOMIZATIONS.items()}


@pytest.fixture(scope="module")
def objects(rendered) -> dict[str, list[dict[str, Any]]]:
    return {name: load_yaml_documents(text) for name, text in rendered.items()}


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_templates(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}
    ]


def _server(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(docs, "Deployment", "convserve-server")


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (container,) = [c for c in pod["containers"] if c["name"] == name]
    return container


def _config(docs: list[dict[str, Any]]) -> dict[str, str]:
    (config,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("convserve-server")
    ]
    return config["data"]


# --- offline schema validation -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomization_validates_against_kubernetes_schemas(name, rendered, tmp_path) -> None:
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(rendered[name])
    # --strict: unknown fields are errors, not silently dropped.
    report = run([VALIDATE, "--strict", "-k", KUBERNETES_VERSION, str(manifest)])
    kinds = {(d["apiVersion"], d["kind"]) for d in load_yaml_documents(rendered[name])}
    passed = re.findall(r"^INFO .* passed for resource (\S+)/", report, flags=re.MULTILINE)
    warned = re.findall(r"^WARN .* kind (\S+) with api version (\S+) ", report, flags=re.MULTILINE)
    # Only the custom resources may lack a built-in schema; they are checked below instead.
    assert {(api, kind) for kind, api in warned} <= set(CUSTOM_RESOURCES)
    assert len(passed) + len(warned) == len(load_yaml_documents(rendered[name]))
    assert kinds - set(CUSTOM_RESOURCES), "nothing built-in was validated"


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_custom_resources_validate_against_their_schemas(name, objects) -> None:
    for doc in objects[name]:
        schema = CUSTOM_RESOURCES.get((doc["apiVersion"], doc["kind"]))
        if schema is not None:
            jsonschema.Draft202012Validator(schema).validate(doc)


def test_validation_rejects_a_broken_manifest(rendered, tmp_path) -> None:
    """The schema check can fail: a typo in a probe and a string port are caught."""
    broken = rendered["cpu"].replace("readinessProbe:", "readinessProbes:", 1)
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(broken)
    with pytest.raises(AssertionError, match="did not validate"):
        run([VALIDATE, "--strict", "-k", KUBERNETES_VERSION, str(manifest)])
    monitor = _one(load_yaml_documents(rendered["cpu"]), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(
            CUSTOM_RESOURCES[("monitoring.coreos.com/v1", "ServiceMonitor")]
        ).validate(monitor)


# --- what the manifests promise ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_pod_meets_the_restricted_pod_security_standard(name, objects) -> None:
    templates = _pod_templates(objects[name])
    assert templates
    for where, pod in templates:
        pod_context = pod["securityContext"]
        assert pod_context["runAsNonRoot"] is True, where
        assert pod_context["runAsUser"] >= 1000, where
        assert pod_context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        for container in pod.get("initContainers", []) + pod["containers"]:
            context = container["securityContext"]
            what = f"{where} container {container['name']}"
            assert context["allowPrivilegeEscalation"] is False, what
            assert context["readOnlyRootFilesystem"] is True, what
            assert context["capabilities"] == {"drop": ["ALL"]}, what
            assert "privileged" not in context, what
            assert {"requests", "limits"} <= set(container["resources"]), what
            # HOME points into /tmp, and /tmp is a writable emptyDir.
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            if container in pod["containers"]:
                volumes = {v["name"]: v for v in pod["volumes"]}
                assert "emptyDir" in volumes[mounts["/tmp"]], what
                assert {"name": "HOME", "value": "/tmp"} in container["env"], what


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_pods_run_as_the_images_user(name, objects) -> None:
    stages = dockerfile_stages()
    (user,) = [args for keyword, args in stages["runtime"] if keyword == "USER"]
    uid, gid = (int(part) for part in user.split(":"))
    for where, pod in _pod_templates(objects[name]):
        context = pod["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid), where
        if "fsGroup" in context:
            assert context["fsGroup"] == gid, where


def test_namespace_enforces_restricted(objects) -> None:
    for name in ("cpu", "gpu"):
        namespace = _one(objects[name], "Namespace")
        labels = namespace["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        for doc in objects[name]:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == namespace["metadata"]["name"]


# The health service each probe asks for: liveness never depends on the models (a model
# that cannot load must not crash-loop the replicas); readiness decides traffic.
PROBE_SERVICES = {
    "startupProbe": "liveness",
    "readinessProbe": "readiness",
    "livenessProbe": "liveness",
}


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_server_probes_are_native_grpc_on_the_serving_port(name, objects) -> None:
    pod = _server(objects[name])["spec"]["template"]["spec"]
    server = _container(pod, "server")
    for probe, service in PROBE_SERVICES.items():
        assert server[probe]["grpc"] == {"port": GRPC_PORT, "service": service}, probe
    # Readiness reacts within one period when the server reports NOT_SERVING.
    assert server["readinessProbe"]["failureThreshold"] == 1
    # A pod that stops answering is restarted, but never in the middle of its drain.
    liveness = server["livenessProbe"]
    unanswered_s = liveness["periodSeconds"] * liveness["failureThreshold"]
    assert unanswered_s > pod["terminationGracePeriodSeconds"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": GRPC_PORT, "rest": REST_PORT, "metrics": METRICS_PORT}
    # The server listens where the container ports say.
    config = _config(objects[name])
    for field, port in ports.items():
        setting = "port" if field == "grpc" else f"{field}_port"
        listens = config.get(f"CONVSERVE_{setting.upper()}", Settings.model_fields[setting].default)
        assert int(listens) == port, setting


# The HTTP form of the readiness probe deploy/README offers (KServe v2 server readiness).
HTTP_READINESS_PATH = "/v2/health/ready"


def _asks_its_own_service(probe: str, spec: dict[str, Any]) -> bool:
    if "grpc" in spec:
        return bool(spec["grpc"].get("service") == PROBE_SERVICES[probe])
    http = spec.get("httpGet", {})
    return (
        probe == "readinessProbe"
        and http.get("path") == HTTP_READINESS_PATH
        and http.get("port") in ("rest", REST_PORT)
    )


def _misdirected_probes(docs: list[dict[str, Any]]) -> list[str]:
    """Every probe that is not a gRPC probe of its own health service (or, for readiness,
    the HTTP readiness endpoint), and every probe the server's container lacks."""
    wrong = []
    for where, pod in _pod_templates(docs):
        for container in pod.get("initContainers", []) + pod["containers"]:
            what = f"{where} container {container['name']}"
            for probe, service in PROBE_SERVICES.items():
                if probe not in container:
                    if what == "Deployment/convserve-server container server":
                        wrong.append(f"{what}: no {probe}")
                elif not _asks_its_own_service(probe, container[probe]):
                    wrong.append(f"{what}: {probe} is not a gRPC probe of {service!r}")
    return wrong


@pytest.mark.parametrize("name", [*sorted(KUSTOMIZATIONS), "cpu+prometheus-adapter"])
def test_every_probe_asks_for_its_own_health_service(name, objects, adapter_overlay) -> None:
    """Whatever an overlay patches: a liveness or startup probe of the overall status ("")
    would restart every replica whose model cannot load."""
    docs = adapter_overlay if name == "cpu+prometheus-adapter" else objects[name]
    assert _misdirected_probes(docs) == []


def test_probe_check_catches_a_probe_of_the_overall_status(objects) -> None:
    docs = copy.deepcopy(objects["gpu"])
    server = _container(_server(docs)["spec"]["template"]["spec"], "server")
    del server["livenessProbe"]["grpc"]["service"]
    server["readinessProbe"]["grpc"]["service"] = "liveness"
    del server["startupProbe"]
    assert _misdirected_probes(docs) == [
        "Deployment/convserve-server container server: no startupProbe",
        "Deployment/convserve-server container server: readinessProbe is not a gRPC probe of "
        "'readiness'",
        "Deployment/convserve-server container server: livenessProbe is not a gRPC probe of "
        "'liveness'",
    ]


def test_probe_check_catches_an_http_readiness_probe_of_liveness(objects) -> None:
    docs = copy.deepcopy(objects["cpu"])
    server = _container(_server(docs)["spec"]["template"]["spec"], "server")
    server["readinessProbe"] = {"httpGet": {"path": "/v2/health/live", "port": "rest"}}
    assert _misdirected_probes(docs) == [
        "Deployment/convserve-server container server: readinessProbe is not a gRPC probe of "
        "'readiness'"
    ]


def _readme_http_readiness_probe() -> dict[str, Any]:
    """The HTTP readinessProbe deploy/README's Probes section shows."""
    text = (REPO_ROOT / "deploy" / "README.md").read_text()
    start = text.index("### Probes")
    section = text[start : text.index("\n### ", start + 1)]
    snippets = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    (probe,) = [s["readinessProbe"] for s in snippets if "httpGet" in s.get("readinessProbe", {})]
    return dict(probe)


@pytest.mark.parametrize("scheme", ["HTTP", "HTTPS"])
def test_the_readmes_http_readiness_probe_fits_the_server(scheme, objects, tmp_path) -> None:
    """deploy/README offers GET /v2/health/ready on the REST port instead of the gRPC
    readiness probe (HTTPS with TLS): patched in, it validates and asks for readiness."""
    probe = _readme_http_readiness_probe()
    assert probe["httpGet"]["scheme"] == "HTTP"
    probe["httpGet"]["scheme"] = scheme
    docs = copy.deepcopy(objects["cpu"])
    server = _container(_server(docs)["spec"]["template"]["spec"], "server")
    grpc_probe = server["readinessProbe"]
    server["readinessProbe"] = probe
    assert _misdirected_probes(docs) == []
    assert probe["httpGet"]["port"] in {p["name"] for p in server["ports"]}
    # The same timing as the gRPC probe it replaces.
    timing = ("periodSeconds", "timeoutSeconds", "failureThreshold")
    assert {k: probe[k] for k in timing} == {k: grpc_probe[k] for k in timing}
    manifest = tmp_path / "http-readiness.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    report = run([VALIDATE, "--strict", "-k", KUBERNETES_VERSION, str(manifest)])
    assert "passed for resource deployment/convserve-server" in report


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_termination_grace_covers_prestop_and_the_servers_drain(name, objects) -> None:
    docs = objects[name]
    deployment = _server(docs)
    pod = deployment["spec"]["template"]["spec"]
    server = _container(pod, "server")
    grace_s = float(_config(docs)["CONVSERVE_GRACE_PERIOD_S"])
    pre_stop_s = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + grace_s
    # A rollout never removes a ready pod before its replacement is ready.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    configmaps = [e["configMapRef"]["name"] for e in server["envFrom"]]
    assert configmaps == [_one(docs, "ConfigMap")["metadata"]["name"]]


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_config_names_only_real_server_settings(name, objects) -> None:
    config = _config(objects[name])
    unknown = set(config) - SETTINGS_ENV
    assert not unknown, f"the ConfigMap sets variables the server does not read: {unknown}"
    # The values parse as the server would parse them.
    Settings.model_validate({k.removeprefix("CONVSERVE_").lower(): v for k, v in config.items()})


def test_gpu_overlay_requests_a_gpu_on_gpu_nodes_and_cpu_does_not(objects) -> None:
    for kind, name, container in (
        ("Deployment", "convserve-server", "server"),
        ("Job", "convserve-trainer", "trainer"),
    ):
        gpu_pod = _one(objects["gpu"], kind, name)["spec"]["template"]["spec"]
        resources = _container(gpu_pod, container)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert resources["requests"]["nvidia.com/gpu"] == 1
        assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod[
            "tolerations"
        ]
        assert _container(gpu_pod, container)["image"].endswith("-gpu")

        cpu_pod = _one(objects["cpu"], kind, name)["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in _container(cpu_pod, container)["resources"]["limits"]
        assert "nodeSelector" not in cpu_pod
        assert not _container(cpu_pod, container)["image"].endswith("-gpu")
    assert _config(objects["gpu"])["CONVSERVE_DEVICE"] == "gpu:0"
    assert _config(objects["cpu"])["CONVSERVE_DEVICE"] == "cpu"


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_trainer_job_writes_the_pvc_the_server_reads(name, objects) -> None:
    docs = objects[name]
    claim = _one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    trainer_pod = _one(docs, "Job", "convserve-trainer")["spec"]["template"]["spec"]
    server_pod = _server(docs)["spec"]["template"]["spec"]
    for pod, read_only in ((trainer_pod, False), (server_pod, True)):
        (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"]["claimName"] == claim
        for container in pod.get("initContainers", []) + pod["containers"]:
            mounts = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
            assert mounts, container["name"]
            assert all(m.get("readOnly", False) is read_only for m in mounts), container["name"]
    args = _container(trainer_pod, "trainer")["args"]
    base = args[args.index("--model-base-path") + 1]
    assert _config(docs)["CONVSERVE_MODEL_BASE_PATH"] == base
    # The server waits for the first version rather than crash-looping.
    (wait,) = server_pod["initContainers"]
    assert f"{base}/[0-9]*/saved_model.pb" in " ".join(wait["command"])
    # The volume is group-writable for the unprivileged trainer.
    assert trainer_pod["securityContext"]["fsGroup"] == trainer_pod["securityContext"]["runAsUser"]


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_services_hpa_pdb_and_policy_select_the_server_pods(name, objects) -> None:
    docs = objects[name]
    deployment = _server(docs)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {
        p["name"] for p in _container(deployment["spec"]["template"]["spec"], "server")["ports"]
    }

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    cluster_ip = _one(docs, "Service", "convserve-server")
    headless = _one(docs, "Service", "convserve-server-headless")
    assert cluster_ip["spec"]["type"] == "ClusterIP"
    assert headless["spec"]["clusterIP"] == "None"
    for service in (cluster_ip, headless):
        assert selects(service["spec"]["selector"])
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert {(p["name"], p["port"], p["appProtocol"]) for p in cluster_ip["spec"]["ports"]} == {
        ("grpc", GRPC_PORT, "grpc"),
        ("rest", REST_PORT, "http"),
        ("metrics", METRICS_PORT, "http"),
    }

    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]

    pdb = _one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"])
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["maxReplicas"]

    policy = _one(docs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"])
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {"grpc", "rest", "metrics"}
    assert allowed <= container_ports
    # HTTP serves the same APIs as gRPC: the same peers may reach both.
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        assert ("grpc" in ports) == ("rest" in ports), rule


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_prometheus_finds_the_metrics_port(name, objects) -> None:
    docs = objects[name]
    template = _server(docs)["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"

    monitor = _one(docs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s
        for s in docs
        if s["kind"] == "Service"
        and all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())
    ]
    scraped = [
        p
        for s in services
        for p in s["spec"]["ports"]
        if p["name"] == monitor["spec"]["endpoints"][0]["port"]
    ]
    # Exactly one Service port matches, so each pod is scraped once.
    assert [p["port"] for p in scraped] == [METRICS_PORT]


def test_bench_job_load_tests_the_headless_service(objects) -> None:
    job = _one(objects["bench"], "Job", "convserve-bench")
    container = _container(job["spec"]["template"]["spec"], "bench")
    command = container["command"] + container["args"]
    assert command[:2] == ["convserve", "bench"]
    target = command[command.index("--target") + 1]
    assert target == f"dns:///convserve-server-headless:{GRPC_PORT}"
    assert job["metadata"]["namespace"] == _one(objects["cpu"], "Namespace")["metadata"]["name"]
    service_names = {d["metadata"]["name"] for d in objects["cpu"] if d["kind"] == "Service"}
    assert "convserve-server-headless" in service_names
    # The same image as the server's: it carries the client CLI.
    server_image = _container(_server(objects["cpu"])["spec"]["template"]["spec"], "server")
    assert container["image"] == server_image["image"]


# --- the prometheus-adapter component (HPA on requests in flight) --------------------------

ADAPTER = REPO_ROOT / "deploy" / "k8s" / "components" / "prometheus-adapter"


@pytest.fixture(scope="module")
def adapter_overlay(tmp_path_factory) -> list[dict[str, Any]]:
    """The cpu overlay with the component added, as an overlay of a user's would add it."""
    root = tmp_path_factory.mktemp("adapter-overlay")
    (root / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources: [{os.path.relpath(KUSTOMIZATIONS['cpu'], root)}]\n"
        f"components: [{os.path.relpath(ADAPTER, root)}]\n"
    )
    text = _render(root)
    manifest = root / "rendered.yaml"
    manifest.write_text(text)
    report = run([VALIDATE, "--strict", "-k", KUBERNETES_VERSION, str(manifest)])
    assert "passed for resource horizontalpodautoscaler/convserve-server" in report
    return load_yaml_documents(text)


def _adapter_rules() -> list[dict[str, Any]]:
    values = load_yaml_documents((ADAPTER / "adapter-values.yaml").read_text())[0]
    assert values["rules"]["default"] is False
    return values["rules"]["custom"]


def test_adapter_component_adds_in_flight_requests_to_the_cpu_signal(
    adapter_overlay, objects
) -> None:
    hpa = _one(adapter_overlay, "HorizontalPodAutoscaler")
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert set(by_type) == {"Resource", "Pods"}
    assert (
        by_type["Resource"] == _one(objects["cpu"], "HorizontalPodAutoscaler")["spec"]["metrics"][0]
    )
    pods = by_type["Pods"]["pods"]
    assert pods["target"]["type"] == "AverageValue"
    assert float(pods["target"]["averageValue"]) > 0
    # The metric the HPA asks for is one the adapter's rules publish.
    assert pods["metric"]["name"] in {rule["name"]["as"] for rule in _adapter_rules()}
    # Everything else is the cpu overlay unchanged.
    others = [d for d in adapter_overlay if d["kind"] != "HorizontalPodAutoscaler"]
    assert others == [d for d in objects["cpu"] if d["kind"] != "HorizontalPodAutoscaler"]


def test_adapter_rules_query_metrics_the_server_exports(tmp_path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from convserve.server.metrics import Metrics

    metrics = Metrics()
    metrics.request_started("convserve", "Predict", "mnist")
    metrics.queue_wait.labels(rpc="Predict", model="mnist").observe(0.001)
    exported = {
        sample.name
        for family in text_string_to_metric_families(prometheus_client_exposition(metrics.registry))
        for sample in family.samples
    }
    records = []
    for index, rule in enumerate(_adapter_rules()):
        series = rule["seriesQuery"].split("{")[0]
        assert series in exported, series
        assert re.fullmatch(rule["name"]["matches"], series)
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        # The adapter's template filled in as it would for one HPA query.
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="convserve",pod=~"a|b"')
            .replace("<<.GroupBy>>", "pod")
        )
        assert "<<" not in query
        records.append({"record": f"adapter:rule{index}", "expr": query})
    rules_file = tmp_path / "adapter-rules.yml"
    rules_file.write_text(json.dumps({"groups": [{"name": "adapter", "rules": records}]}))
    report = run([require_tool("promtool"), "check", "rules", str(rules_file)])
    assert f"{len(records)} rules found" in report


def prometheus_client_exposition(registry: Any) -> str:
    import prometheus_client

    return prometheus_client.generate_latest(registry).decode()


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_connections_age_so_clients_follow_the_replicas(name, objects) -> None:
    docs = objects[name]
    config = Settings.model_validate(
        {k.removeprefix("CONVSERVE_").lower(): v for k, v in _config(docs).items()}
    )
    # Clients of a new replica's Service re-resolve within the age: well inside the
    # HPA's scale-up period, so a replica added gets traffic before the next decision.
    hpa = _one(docs, "HorizontalPodAutoscaler")
    (policy,) = hpa["spec"]["behavior"]["scaleUp"]["policies"]
    assert 0 < config.max_connection_age_s * 1.1 < policy["periodSeconds"]
    # Calls on an aged connection get at least as long as a drain gives them.
    assert config.max_connection_age_grace_s >= config.grace_period_s
    # The SDK's keepalive pings are ones the server accepts.
    from convserve.client.channel import KEEPALIVE_TIME_MS

    assert config.keepalive_min_client_ping_interval_s * 1000 <= KEEPALIVE_TIME_MS
    server = _container(_server(docs)["spec"]["template"]["spec"], "server")
    (replica,) = [e for e in server["env"] if e["name"] == "CONVSERVE_REPLICA_NAME"]
    assert replica["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
