"""The alert rules (deploy/prometheus/) and the Grafana dashboard (deploy/grafana/) as operators load them:
checked and unit-tested by the real `promtool`, and naming only metrics a running relay exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO
from tests.support.events import encode, fixture
from tests.support.http import RelayProcess, signed_headers

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "relay.json"

# The PromQL functions, aggregations and keywords the files use; any other word in an expression is taken for
# a metric name, so a new function must be added here, and a misspelt metric can never pass for one.
PROMQL_WORDS = frozenset(
    {"sum", "count", "rate", "increase", "histogram_quantile", "and", "or", "unless", "bool", "offset"}
)
# Series that Prometheus itself makes for every target it scrapes.
SCRAPE_SERIES = frozenset({"up"})
# Grafana's variables, given values Prometheus accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: its panels' targets and its variables' `label_values(…)`."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"]
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])
            assert match, f"variable {variable['name']}: expected label_values(<series>, <label>)"
            queries.append(match[1])
    return queries


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expression)  # label values
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)  # label matchers and ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text)) - PROMQL_WORDS


def exported_series(metrics_text: str) -> set[str]:
    """The series names a /metrics page offers: every sample's name, and the names each declared family
    (`# TYPE`) gives its samples, also before anything has been counted in it."""
    names = {line.split("{")[0].split()[0] for line in metrics_text.splitlines() if line and line[0] != "#"}
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, flags=re.MULTILINE):
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names.update(family + suffix for suffix in suffixes)
    return names


def test_promtool_accepts_the_alert_rules() -> None:
    checked = promtool("check", "rules", ALERTS)

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout


def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    tested = promtool("test", "rules", ALERT_TESTS)

    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_unit_tested_both_firing_and_quiet() -> None:
    cases = [
        case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]
    ]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    alerts = {rule["alert"] for rule in alert_rules()}

    assert alerts == firing == quiet


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, given as a recording rule, with Grafana's variables filled in."""
    rules = []
    for number, query in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, f"a Grafana variable without a test value in {query}"
        rules.append({"record": f"dashboard:query_{number}", "expr": query})
    as_rules = tmp_path / "dashboard.yaml"
    as_rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    checked = promtool("check", "rules", as_rules)

    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_panels_have_unique_ids_and_a_data_source() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]

    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]


@pytest.fixture
def scraped(relay: RelayProcess, clean_database: Any) -> str:
    """The /metrics page of a relay that has applied an event and refused a request."""
    event = fixture("user.created")
    body = encode(event)
    with relay.client() as client:
        assert client.post(
            "/events/action", content=body, headers=signed_headers(body, event["id"])
        ).is_success
        assert (
            client.post("/events/webhook", content=body, headers={"authorization": "Bearer x"}).status_code
            == 401
        )
        return client.get("/metrics").text


def test_every_metric_the_alerts_and_the_dashboard_name_is_one_the_relay_exports(scraped: str) -> None:
    named = {
        name: source
        for source, expressions in (
            ("alerts.yaml", [rule["expr"] for rule in alert_rules()]),
            ("relay.json", dashboard_queries()),
        )
        for expression in expressions
        for name in metric_names(expression)
    }

    unknown = {name: source for name, source in named.items() if name not in exported_series(scraped)}

    assert set(unknown) <= SCRAPE_SERIES, f"named but not exported by the relay: {unknown}"
    assert "relay_events_total" in named  # the extraction finds names at all


def test_the_dashboard_shows_every_metric_the_relay_exports(scraped: str) -> None:
    on_dashboard = {name for query in dashboard_queries() for name in metric_names(query)}
    # prometheus_client's `_created` companions hold when a series began, nothing to chart.
    families = set(re.findall(r"^# TYPE (relay_\S+) ", scraped, flags=re.MULTILINE)) - set(
        re.findall(r"^# TYPE (relay_\S+_created) gauge$", scraped, flags=re.MULTILINE)
    )

    missing = {
        family
        for family in families
        if not any(name == family or name.startswith(f"{family}_") for name in on_dashboard)
    }

    assert not missing, f"exported by the relay but on no dashboard panel: {sorted(missing)}"
