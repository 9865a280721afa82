"""Strict JSON schemas of KServe's custom resources, built from a pinned KServe release.

KServe publishes its API types as the `kserve` Python SDK on PyPI: one OpenAPI-generated
model class per type (`kserve/models/v1alpha1_serving_runtime_spec.py`, ...), each with
`openapi_types` (attribute -> type), `attribute_map` (attribute -> JSON key) and a
`ValueError` for every field that must not be missing. Those classes are generated from
the same Go API types as KServe's CRDs, so they name every field a ServingRuntime,
ClusterServingRuntime or InferenceService of that release may have, and its type.

The SDK itself cannot be installed beside this project (it pins an older protobuf), and
is not needed: `pip download --no-deps --require-hashes` fetches the one wheel, pinned by
version and hash, into a cache, and the model classes are read from it as text (`ast`),
never imported. Kubernetes' own types (Container, Probe, ObjectMeta, ...) are referenced
from kubernetes-validate's strict schemas of the Kubernetes release the other deploy
tests use, so a runtime's container is checked exactly as a Deployment's would be.

Strict: every object of a KServe type rejects fields it does not define, and every field
has its type (string, integer, boolean, list, map or another type).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import referencing.jsonschema

# The KServe release the manifests are written for, and the sha256 of its SDK wheel on
# PyPI (kserve-0.21.0-py3-none-any.whl).
KSERVE_VERSION = "0.21.0"
WHEEL_SHA256 = "df9bc5888704d9085015e08f1a8fced5ff0698f3becc6212d4e7b8234c71623b"
GROUP = "serving.kserve.io"

# Root kinds and the SDK class of each.
KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}

# The $id of kubernetes-validate's definitions file, which its own references resolve against.
_K8S_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
_REQUIRED = re.compile(r"Invalid value for `(\w+)`, must not be `None`")
_LIST = re.compile(r"list\[(.+)\]")
_DICT = re.compile(r"dict\(str, (.+)\)")
_SCALARS: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "datetime": {"type": "string"},
    "date": {"type": "string"},
    # Free-form values (RawExtension-like fields): anything goes, as in the CRD.
    "object": {},
}
_QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
# SDK names of Kubernetes types that do not follow the V<version><Name> pattern.
_K8S_ALIASES = {
    "ResourceQuantity": _QUANTITY,
    "V1Time": "io.k8s.apimachinery.pkg.apis.meta.v1.Time",
    # KServe's MetricQuantity is a resource.Quantity inlined (and its original text kept).
    "V1beta1MetricQuantity": _QUANTITY,
}
# Types the SDK names but does not define (gaps of its generator in this release): any
# object is accepted there. None of them is used by deploy/kserve, and
# `build_schemas` fails on any other type it cannot resolve, so a new gap is seen.
SDK_GAPS = {
    "V1alpha1WorkerSpec": {"type": "object"},  # spec.workerSpec (multi-node runtimes)
    "KnativeDevServingPkgApisServingV1TrafficTarget": {"type": "object"},  # status only
}


@dataclass(frozen=True)
class ModelClass:
    """One SDK model class: its fields as (JSON key, SDK type) and the required keys."""

    name: str
    fields: dict[str, str]
    required: frozenset[str]


def fetch_wheel(cache_dir: Path) -> Path:
    """The pinned kserve wheel in `cache_dir`, downloaded (hash-checked) if missing."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / f"kserve-{KSERVE_VERSION}-py3-none-any.whl"
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    wheel.unlink(missing_ok=True)  # a partial or altered download is fetched again
    requirements = cache_dir / "requirements.txt"
    requirements.write_text(f"kserve=={KSERVE_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--only-binary=:all:", "--require-hashes",
         "--dest", str(cache_dir), "-r", str(requirements)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if done.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"could not download kserve=={KSERVE_VERSION} from PyPI:\n{done.stdout}{done.stderr}"
        )
    if _sha256(wheel) != WHEEL_SHA256:
        raise RuntimeError(f"{wheel} does not have the pinned sha256 {WHEEL_SHA256}")
    return wheel


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_model_classes(wheel: Path) -> dict[str, ModelClass]:
    """Every model class of the wheel's `kserve.models`, read as source text."""
    classes: dict[str, ModelClass] = {}
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if not re.fullmatch(r"kserve/models/\w+\.py", member):
                continue
            source = archive.read(member).decode()
            for node in ast.parse(source).body:
                if isinstance(node, ast.ClassDef):
                    model = _model_class(node, source)
                    if model is not None:
                        classes[model.name] = model
    return classes


def _model_class(node: ast.ClassDef, source: str) -> ModelClass | None:
    tables: dict[str, dict[str, str]] = {}
    for statement in node.body:
        if (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
            and statement.targets[0].id in {"openapi_types", "attribute_map"}
        ):
            tables[statement.targets[0].id] = ast.literal_eval(statement.value)
    if set(tables) != {"openapi_types", "attribute_map"}:
        return None
    types, keys = tables["openapi_types"], tables["attribute_map"]
    assert set(types) == set(keys), f"{node.name}: openapi_types and attribute_map differ"
    segment = ast.get_source_segment(source, node) or ""
    required = frozenset(keys[attribute] for attribute in _REQUIRED.findall(segment))
    return ModelClass(node.name, {keys[a]: t for a, t in types.items()}, required)


@cache
def kubernetes_definitions(kubernetes_version: str) -> dict[str, Any]:
    """kubernetes-validate's strict definitions of every Kubernetes type of a release."""
    path = (
        resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{kubernetes_version}-local-strict"
        / "_definitions.json"
    )
    definitions: dict[str, Any] = json.loads(path.read_text())
    assert definitions["$id"] == _K8S_DEFINITIONS_ID, definitions["$id"]
    return definitions


def _kubernetes_name(sdk_type: str, names: set[str]) -> str:
    """The Kubernetes definition an SDK type name stands for, e.g. V1Probe ->
    io.k8s.api.core.v1.Probe, K8sIoApiAppsV1DeploymentStrategy ->
    io.k8s.api.apps.v1.DeploymentStrategy."""
    if sdk_type in _K8S_ALIASES:
        return _K8S_ALIASES[sdk_type]
    spelled = re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d+(?:(?:alpha|beta)\d+)?)(\w+)", sdk_type)
    if spelled:
        group, version, kind = spelled.groups()
        name = f"io.k8s.api.{group.lower()}.{version.lower()}.{kind}"
        if name in names:
            return name
    versioned = re.fullmatch(r"(V\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w*)", sdk_type)
    if versioned:
        version, kind = versioned.groups()
        found = sorted(n for n in names if n.endswith(f".{version.lower()}.{kind}"))
        # One match, or the core group's when the same name exists in several groups.
        core = [n for n in found if n.startswith(("io.k8s.api.core.", "io.k8s.apimachinery."))]
        if len(found) == 1:
            return found[0]
        if len(core) == 1:
            return core[0]
    raise KeyError(f"no Kubernetes definition for the SDK type {sdk_type!r}")


def build_schemas(
    classes: dict[str, ModelClass], kubernetes_version: str
) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> a Draft 2020-12 schema of that custom resource."""
    names = set(kubernetes_definitions(kubernetes_version)["$defs"])
    schemas = {}
    for (api_version, kind), root in KINDS.items():
        defs: dict[str, Any] = {}
        pending = [root]
        while pending:
            name = pending.pop()
            if name in defs:
                continue
            model = classes[name]
            properties = {}
            for key, sdk_type in model.fields.items():
                properties[key] = _type_schema(sdk_type, classes, names, pending)
            defs[name] = {
                "type": "object",
                "additionalProperties": False,
                "properties": properties,
                "required": sorted(model.required),
            }
        top = defs[root]
        top["properties"]["apiVersion"] = {"const": api_version}
        top["properties"]["kind"] = {"const": kind}
        top["required"] = sorted({*top["required"], "apiVersion", "kind", "metadata", "spec"})
        schemas[(api_version, kind)] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": f"#/$defs/{root}",
            "$defs": defs,
        }
    return schemas


def _type_schema(
    sdk_type: str, classes: dict[str, ModelClass], names: set[str], pending: list[str]
) -> dict[str, Any]:
    if sdk_type in _SCALARS:
        return dict(_SCALARS[sdk_type])
    if sdk_type in SDK_GAPS:
        return dict(SDK_GAPS[sdk_type])
    if match := _LIST.fullmatch(sdk_type):
        return {"type": "array", "items": _type_schema(match.group(1), classes, names, pending)}
    if match := _DICT.fullmatch(sdk_type):
        values = _type_schema(match.group(1), classes, names, pending)
        return {"type": "object", "additionalProperties": values}
    # An empty SDK class (metav1.Time, ...) is a Kubernetes type the generator flattened.
    if sdk_type in classes and (classes[sdk_type].fields or sdk_type not in _K8S_ALIASES):
        pending.append(sdk_type)
        return {"$ref": f"#/$defs/{sdk_type}"}
    return {"$ref": f"{_K8S_DEFINITIONS_ID}#/$defs/{_kubernetes_name(sdk_type, names)}"}


def validator(schema: dict[str, Any], kubernetes_version: str) -> jsonschema.Validator:
    """A validator of `schema` whose Kubernetes references resolve offline."""
    definitions = referencing.Resource.from_contents(
        kubernetes_definitions(kubernetes_version),
        default_specification=referencing.jsonschema.DRAFT202012,
    )
    registry: referencing.Registry[Any] = referencing.Registry().with_resource(
        _K8S_DEFINITIONS_ID, definitions
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)
