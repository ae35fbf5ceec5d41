"""The chart's alert rules (files/alerts.yaml, the PrometheusRule) and Grafana dashboard
(files/dashboard.json) name only metrics the operator exports, and docs/metrics.md shows the same rules.

No promtool here (building it from Go modules would add minutes to every fresh machine); instead a
schema check of what a rule and a dashboard must hold, and a PromQL-shaped check of every expression:
brackets and quotes balance, every bare identifier is a known function or keyword or an exported
metric (label matchers, ranges and grouping labels set aside). The checker is shown to catch a made-up
metric, an unknown function and an unbalanced expression."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from durablecache.k8s.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "charts" / "durablecache-operator" / "files"
ALERTS = FILES / "alerts.yaml"
DASHBOARD = FILES / "dashboard.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

# PromQL functions and aggregations these files may use (and Grafana's label_values for variables).
FUNCTIONS = {"abs", "absent", "avg", "avg_over_time", "changes", "clamp_min", "count", "delta", "deriv",
             "increase", "label_values", "max", "max_over_time", "min", "min_over_time", "rate", "sum", "time"}
KEYWORDS = {"and", "or", "unless", "bool", "offset"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# Prometheus' own series that rules may use besides the operator's.
PROMETHEUS_SERIES = {"up"}
DURATION = re.compile(r"^[0-9]+(ms|s|m|h|d)$")


def exported() -> set[str]:
    """Metric names the operator serves (from its registry, not from a list kept by hand)."""
    return {family.name for family in Metrics().registry.collect()}


def expr_problems(expr: str, known: set[str]) -> list[str]:
    problems: list[str] = []
    stack: list[str] = []
    quote = None
    escaped = False
    for ch in expr:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in ")]}" and (not stack or stack.pop() != {")": "(", "]": "[", "}": "{"}[ch]):
            problems.append(f"unbalanced {ch!r}")
    if quote or stack:
        problems.append(f"unclosed {quote or stack[-1]!r}")
    if problems:
        return problems
    bare = re.sub(r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'", '""', expr)
    bare = re.sub(r"\{[^{}]*\}", " ", bare)       # label matchers
    bare = re.sub(r"\[[^\[\]]*\]", " ", bare)      # range selectors
    bare = GROUPING.sub(" ", bare)                 # by (namespace, name)
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", bare):
        word = m.group(0)
        if bare[m.end():].lstrip().startswith("("):
            if word not in FUNCTIONS:
                problems.append(f"unknown function {word}")
        elif word not in KEYWORDS and word not in known and word not in PROMETHEUS_SERIES:
            problems.append(f"unknown metric {word}")
    if not any(w in known for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare)) and "up" not in bare:
        problems.append("names no metric")
    return problems


def metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\bdurablecache_[a-z_]+", expr))


def rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in doc["groups"] for r in g["rules"]]


def test_the_checker_is_not_vacuous() -> None:
    known = exported()
    assert expr_problems('delta(durablecache_keys_copied{phase="Copy"}[15m]) == 0', known) == []
    assert expr_problems("max by (namespace, name) (durablecache_phase == 1)", known) == []
    assert "unknown metric durablecache_keys_copyed" in expr_problems("durablecache_keys_copyed > 0", known)
    assert "unknown function rte" in expr_problems("rte(durablecache_side_changes[5m]) > 0", known)
    assert expr_problems("delta(durablecache_side_changes[10m) > 0", known)
    assert expr_problems('durablecache_phase{phase="Failed} == 1', known)
    assert {"durablecache_phase", "durablecache_side_changes", "durablecache_repair_blocked"} <= known


def test_alert_rules_are_well_formed_and_name_exported_metrics() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    known = exported()
    all_rules = rules(doc)
    names = [r["alert"] for r in all_rules]
    assert len(names) == len(set(names)) >= 8, names
    used: set[str] = set()
    for rule in all_rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"DurableCache[A-Za-z]+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule
        assert rule["annotations"]["summary"], rule
        if "for" in rule:
            assert DURATION.match(rule["for"]), rule
        problems = expr_problems(rule["expr"], known)
        assert not problems, (rule["alert"], problems)
        used |= metrics_in(rule["expr"])
    # Every alert's templates use only the labels the metrics carry.
    for rule in all_rules:
        for text in rule["annotations"].values():
            assert set(re.findall(r"\$labels\.(\w+)", text)) <= {"namespace", "name", "phase"}, text
    assert {"durablecache_phase", "durablecache_repair_blocked", "durablecache_side_changes"} <= used


def test_docs_show_the_rules_the_chart_ships() -> None:
    text = METRICS_DOC.read_text()
    section = text.split("## Suggested alerts", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "docs/metrics.md shows the rules"
    assert yaml.safe_load(block.group(1)) == yaml.safe_load(ALERTS.read_text())
    assert "../charts/durablecache-operator/files/alerts.yaml" in text
    assert "../charts/durablecache-operator/files/dashboard.json" in text
    assert "prometheusRule.enabled" in text
    # Every exported metric is documented in the table.
    for name in exported():
        assert f"`{name}" in text, name


def test_dashboard_is_grafana_json_of_the_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    known = exported()
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "name"):
        query = variables[name]["query"]["query"]
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert m and m.group(2) == name, query
        assert not expr_problems(m.group(1), known), query
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    used: set[str] = set()
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["title"] and panel["type"] in {"timeseries", "table", "stat", "gauge", "state-timeline"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            problems = expr_problems(expr, known)
            assert not problems, (panel["title"], expr, problems)
            # Each panel follows the dashboard's selectors.
            assert 'namespace=~"$namespace"' in expr and 'name=~"$name"' in expr, expr
            used |= metrics_in(expr)
    assert used == known, f"not on the dashboard: {sorted(known - used)}"
