"""deploy/README.md documents every knob and shows a real picture of the dashboard."""

from __future__ import annotations

import json
import re

from PIL import Image

from tests.deploy.common import COMPOSE, DASHBOARD, DEPLOY, K8S, load_yaml_documents

README = DEPLOY / "README.md"


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
