"""deploy/README.md documents every knob and shows a real picture of the dashboard; the
top README's HTTP facts and its quick start's curl match the server and `make demo`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from convserve.server.settings import Settings
from tests.conftest import REPO_ROOT, require_tool
from tests.deploy.common import COMPOSE, DASHBOARD, DEPLOY, K8S, REST_PORT, load_yaml_documents

README = DEPLOY / "README.md"
TOP_README = REPO_ROOT / "README.md"
MAKEFILE = REPO_ROOT / "Makefile"


def test_every_compose_variable_is_documented() -> None:
    variables = set(re.findall(r"\$\{(\w+)(?::-[^}]*)?\}", COMPOSE.read_text()))
    assert "CONVSERVE_TAG" in variables
    text = README.read_text()
    missing = sorted(v for v in variables if f"`{v}`" not in text)
    assert not missing, f"compose.yaml variables not in the README: {missing}"


def test_every_kubernetes_setting_is_documented() -> None:
    (kustomization,) = load_yaml_documents((K8S / "base" / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    names = [literal.split("=", 1)[0] for literal in generator["literals"]]
    text = README.read_text()
    missing = [name for name in names if f"`{name}" not in text]
    assert not missing, f"settings not in the README: {missing}"


def test_readme_links_resolve_and_the_dashboard_picture_is_a_real_png() -> None:
    text = README.read_text()
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in link:
            assert (DEPLOY / link).exists(), f"README links to missing {link}"
    (picture,) = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    with Image.open(DEPLOY / picture) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 800
        assert height >= 600
        # Not a blank canvas: the panels have drawn content in several colours.
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None
        assert len(colours) > 50


def test_readme_layout_names_every_panel_in_place() -> None:
    text = README.read_text()
    layout = text[text.index("┌ Overview") : text.index("┘", text.index("┌ Overview"))]
    lines = layout.splitlines()
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert any(panel["title"] in line for line in lines), panel["title"]
    # The panels of each grid row share one layout line, left to right.
    for row_y in sorted({p["gridPos"]["y"] for p in dashboard["panels"] if p["type"] != "row"}):
        titles = [
            p["title"]
            for p in sorted(dashboard["panels"], key=lambda p: p["gridPos"]["x"])
            if p["gridPos"]["y"] == row_y
        ]
        (line,) = [line for line in lines if titles[0] in line and line.startswith("│")]
        positions = [line.index(title) for title in titles]
        assert positions == sorted(positions), titles


def test_probes_section_explains_every_health_service_the_manifests_probe() -> None:
    text = README.read_text()
    start = text.index("### Probes")
    section = text[start : text.index("\n### ", start + 1)]
    (deployment,) = load_yaml_documents((K8S / "base" / "server-deployment.yaml").read_text())
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        service = server[probe]["grpc"]["service"]
        assert f"`{probe}` (`{service}`," in section, probe
        assert f"| `{service}`" in section, service
    for setting in ("CONVSERVE_STRICT_READINESS", "CONVSERVE_EXIT_ON_LOAD_ERROR"):
        assert f"`{setting}=true`" in section, setting


# --- the top README's HTTP facts and the demo's REST prediction ------------------------------


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _make_variable(name: str) -> str:
    (value,) = re.findall(rf"^{name} \?= (\S+)$", MAKEFILE.read_text(), flags=re.MULTILINE)
    return value


def test_http_section_names_real_server_flags_with_their_defaults() -> None:
    section = _section(TOP_README.read_text(), "## HTTP/REST")
    flags = set(re.findall(r"`(--[a-z0-9-]+)`", section))
    assert {"--rest-port", "--rest-timeout-s", "--max-message-bytes"} <= flags
    fields = Settings.model_fields
    unknown = sorted(f for f in flags if f.removeprefix("--").replace("-", "_") not in fields)
    assert not unknown, f"the HTTP/REST section names flags the server does not have: {unknown}"
    assert fields["rest_port"].default == REST_PORT
    assert f"`--rest-port` (default {REST_PORT};" in section
    assert f"`--rest-timeout-s` (default {fields['rest_timeout_s'].default:g} s" in section
    assert f"`--max-message-bytes` ({fields['max_message_bytes'].default >> 20} MiB" in section
    # The protocol label values the section lists are the server's.
    from typing import get_args

    from convserve.server.types import Protocol

    metrics = section[section.index("`protocol` values") + len("`protocol` values") :]
    listed = set(re.findall(r"`([a-z-]+)`", metrics))
    assert listed == set(get_args(Protocol))


def test_http_section_maps_grpc_codes_to_the_servers_http_statuses() -> None:
    from convserve.server.errors import HTTP_STATUS

    section = _section(TOP_README.read_text(), "## HTTP/REST")
    errors = section[section.index("**Errors.**") : section.index("**Not supported.**")]
    documented = {
        code: int(status)
        for codes, status in re.findall(r"((?:[A-Z_]{5,}(?: and )?)+) (\d{3})", errors)
        for code in codes.split(" and ")
    }
    assert len(documented) >= 10
    assert documented == {
        code.name: HTTP_STATUS[code] for code in HTTP_STATUS if code.name in documented
    }


def _demo_samples(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """A few held-out samples, written where and as `make demo` writes them."""
    from convserve.trainer.__main__ import save_samples

    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.array([7, 2, 1, 0])
    save_samples(directory / ".demo" / "mnist.npz", images, labels)
    return images, labels


def test_the_quick_starts_curl_predicts_one_image_of_the_demo(tmp_path) -> None:
    """The optional third step of the quick start works on what `make demo` leaves."""
    quick_start = _section(TOP_README.read_text(), "## Quick start")
    (curl,) = [line for line in quick_start.splitlines() if line.startswith("curl ")]
    demo_dir = _make_variable("DEMO_DIR")
    assert f"localhost:{_make_variable('DEMO_REST_PORT')}/v1/models/mnist:predict" in curl
    recipe = MAKEFILE.read_text()
    # The server the README starts serves the model the demo trained, under its name.
    assert "--model-base-path $(DEMO_DIR)/models/mnist --save-samples $(DEMO_DIR)/mnist.npz" in (
        recipe
    )
    assert f"convserve-server --model mnist={demo_dir}/models/mnist &" in quick_start
    # The request body: the README's Python run as the shell would, on the demo's samples.
    (code,) = re.findall(r"python -c '([^']+)'", curl)
    assert f'"{demo_dir}/mnist.npz"' in code
    images, _ = _demo_samples(tmp_path)
    printed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    body_template = re.search(r'-d "(.*)" localhost', curl)
    assert body_template is not None
    body = json.loads(
        re.sub(r"\$\(.*\)", lambda _: printed.strip(), body_template.group(1)).replace('\\"', '"')
    )
    # serving_default: float pixels in [0, 1], one [28, 28] image.
    assert set(body) == {"instances"}
    np.testing.assert_allclose(np.asarray(body["instances"]), images[:1] / 255)


def test_make_demo_posts_one_sample_to_the_rest_port_it_serves_on(tmp_path) -> None:
    demo_dir = tmp_path / ".demo"
    plan = subprocess.run(
        [require_tool("make"), "-n", "demo", f"DEMO_DIR={demo_dir}", "DEMO_REST_PORT=18501"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--rest-port 18501" in plan
    assert "command -v curl" in plan
    assert f"@{demo_dir}/rest-request.json" in plan
    assert "localhost:18501/v1/models/mnist:predict" in plan
    # The body the recipe writes, from samples as the trainer saves them.
    (code,) = re.findall(r"label=\$\(\S*python -c '([^']+)'\)", plan)
    images, labels = _demo_samples(tmp_path)
    printed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert printed.strip() == str(labels[0])
    body = json.loads((demo_dir / "rest-request.json").read_text())
    assert body == {"signature_name": "predict_uint8", "instances": images[:1].tolist()}
