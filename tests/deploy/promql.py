"""Just enough PromQL reading to find the metrics and labels an expression uses.

Not a parser: it strips what cannot name a metric (strings, ranges, grouping
clauses, function calls) and reads what is left. That is exact for the
expressions deploy/ writes (selectors, aggregations, binary operators,
histogram_quantile), which is all the tests need.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"\"")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan", "Inf", "NaN"}
)
# Grafana's template variables, substituted the way a dashboard load would.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".*",
    "$model": ".*",
    "$protocol": ".*",
}


@dataclass
class Usage:
    """The metrics an expression selects and the labels it relies on."""

    metrics: set[str] = field(default_factory=set)
    # metric -> labels in its own {matchers}
    matched_labels: dict[str, set[str]] = field(default_factory=dict)
    # labels named in by/without/on/ignoring/group_* clauses
    grouping_labels: set[str] = field(default_factory=set)


def substitute_grafana_variables(expr: str) -> str:
    # Longest names first, so "$__rate_interval" is not cut by "$__range".
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def usage(expr: str) -> Usage:
    """What `expr` reads: metric names, matcher labels per metric, grouping labels."""
    result = Usage()
    text = _STRING.sub('""', substitute_grafana_variables(expr))
    for match in _SELECTOR.finditer(text):
        name, matchers = match.group(1), match.group(2)
        labels = set(_MATCHER.findall(matchers))
        if name is None:
            raise ValueError(f"selector without a metric name in {expr!r}")
        result.metrics.add(name)
        result.matched_labels.setdefault(name, set()).update(labels)
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    text = _RANGE.sub(" ", text)
    for match in _GROUPING.finditer(text):
        result.grouping_labels.update(
            label.strip() for label in match.group(2).split(",") if label.strip()
        )
    text = _GROUPING.sub(" ", text)
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name in _KEYWORDS:
            continue
        result.metrics.add(name)
        result.matched_labels.setdefault(name, set())
    return result


def legend_labels(legend: str) -> set[str]:
    """The labels a Grafana legendFormat such as ``{{rpc}} {{code}}`` shows."""
    return set(re.findall(r"\{\{\s*([a-zA-Z_]\w*)\s*\}\}", legend))


@dataclass(frozen=True)
class Query:
    """One PromQL expression found in deploy/, with where it came from."""

    where: str
    expr: str
    legend: str = ""


def dashboard_queries(path: Path) -> Iterator[Query]:
    """Every PromQL expression of a Grafana dashboard: panels, variables, annotations."""
    dashboard = json.loads(path.read_text())

    def panels(items: list[dict]) -> Iterator[dict]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield Query(f"panel {panel['title']!r}", target["expr"], target.get("legendFormat", ""))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            yield Query(f"annotation {annotation['name']!r}", annotation["expr"])
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] != "query":
            continue
        definition = variable["definition"]
        inner = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", definition)
        if inner is None:
            raise ValueError(f"variable {variable['name']!r}: unsupported query {definition!r}")
        # label_values(metric, label) reads `label` of `metric`.
        yield Query(
            f"variable {variable['name']!r}",
            f"count by ({inner.group(2)}) ({inner.group(1)})",
        )


def rule_queries(path: Path) -> Iterator[Query]:
    """Every expression of a Prometheus rule file (alerting and recording rules)."""
    document = yaml.safe_load(path.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            yield Query(f"rule {name!r}", rule["expr"])
