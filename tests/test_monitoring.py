"""The monitoring assets in monitoring/, driven through the real tools: promtool checks and
unit-tests the alert rules, and a real Prometheus scraping a real syncd answers every query of
the Grafana dashboard and every rule's expression."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import DaemonProcess, Workspace
from tests.servers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "monitoring" / "syncd.rules.yml"
RULE_TESTS = ROOT / "monitoring" / "syncd.rules.test.yml"
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
ALERTS = {
    "SyncdNotPublishing",
    "SyncdResultWaitingLong",
    "SyncdFailuresNeedAPerson",
    "SyncdDown",
    "SyncdRestarting",
    "SyncdOutputsSpaceLow",
}
JOB = "syncd"  # the README's scrape job, which the rules read `up` and `process_*` from
LOW_SPACE = 10 * 2**30  # SyncdOutputsSpaceLow's threshold
# The metrics the rules and the dashboard name; each must be one syncd (or Prometheus) makes.
METRIC = re.compile(r"\b((?:syncd|process)_\w+|up)\b(\{[^}]*\})?(?!\s*\()")


def tool(name: str) -> str:
    """The path of `name`; a missing one fails the test (never skips it) with what to do."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH: install Debian's prometheus package "
            "(`apt-get install --no-install-recommends prometheus`, as root; "
            "`scripts/test.sh` does it)",
            pytrace=False,
        )
    return path


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def dashboard() -> dict[str, Any]:
    return yaml.safe_load(DASHBOARD.read_text())  # JSON is YAML; one parser for both files


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]


def test_promtool_checks_the_rules():
    done = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == f"Checking {RULES}\n  SUCCESS: {len(ALERTS)} rules found\n\n"
    # What an operator reads: each alert waits a while, says how bad it is, names the
    # instance and what to run there.
    assert {rule["alert"] for rule in rules()} == ALERTS
    for rule in rules():
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert set(rule["annotations"]) == {"summary", "description"}
        assert "{{ $labels.instance }}" in rule["annotations"]["summary"]
        description = " ".join(rule["annotations"]["description"].split())
        assert "{{ $labels.instance }}" in description, rule["alert"]
        assert "`syncd status`" in description, rule["alert"]
        assert "`journalctl -u syncd " in description, rule["alert"]


def test_promtool_unit_tests_of_the_rules():
    done = subprocess.run(
        [tool("promtool"), "test", "rules", str(RULE_TESTS.relative_to(ROOT))],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "Unit Testing:  monitoring/syncd.rules.test.yml\n  SUCCESS\n\n"
    # Every alert is shown to fire where it should and to stay quiet where it should not.
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == ALERTS
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == ALERTS


@dataclass
class Prometheus:
    """A Prometheus server on 127.0.0.1, its API read as a user's tools read it."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def api(self, path: str, **params: str) -> Any:
        answer = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "success", (path, params, body)
        assert "warnings" not in body, (path, params, body["warnings"])
        assert "infos" not in body, (path, params, body["infos"])
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's samples (a vector), e.g. [{"metric": {...}, "value": [t, "1"]}]."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def health(self, instance: str) -> str | None:
        for target in self.api("targets")["activeTargets"]:
            if target["labels"]["instance"] == instance:
                return target["health"]
        return None

    def alerts(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Its pending and firing alerts by name and `kind` label (empty when it has none)."""
        return {
            (a["labels"]["alertname"], a["labels"].get("kind", "")): a
            for a in self.api("alerts")["alerts"]
        }


@dataclass
class Stack:
    """syncd with its metrics on 127.0.0.1 and a Prometheus scraping it every second."""

    ws: Workspace
    daemon: DaemonProcess
    prometheus: Prometheus
    instance: str


@pytest.fixture
def stack(moto_workspace: Workspace, tmp_path: Path) -> Iterator[Stack]:
    ws = moto_workspace
    instance = f"127.0.0.1:{free_port()}"
    ws.settings["syncd"]["metrics_address"] = instance
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [instance]}]}],
            }
        )
    )
    listen = f"127.0.0.1:{free_port()}"
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
                f"--web.listen-address={listen}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    prometheus = Prometheus(process, f"http://{listen}", log)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited {process.returncode}:\n{log.read_text()}")
            try:
                return requests.get(f"{prometheus.url}/-/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(ready, timeout=60, what=f"prometheus ready on {listen}")
        daemon = ws.daemon()
        wait_until(
            lambda: prometheus.health(instance) == "up",
            timeout=60,
            what=f"prometheus to scrape syncd on {instance}",
        )
        yield Stack(ws, daemon, prometheus, instance)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def as_grafana_sends(expr: str, instance: str) -> str:
    """A panel's query as Grafana sends it: `$instance` one value, regex-escaped (the escape
    doubled inside PromQL's string); the interval variables 1m."""
    escaped = re.escape(instance).replace("\\", "\\\\")
    sent = expr.replace("$instance", escaped)
    sent = sent.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    assert "$" not in sent, sent
    return sent


def values(samples: list[dict[str, Any]]) -> list[float]:
    return [float(s["value"][1]) for s in samples]


def positive(samples: list[dict[str, Any]]) -> bool:
    return bool(samples) and all(0 < v < math.inf for v in values(samples))


def at_least_zero(samples: list[dict[str, Any]]) -> bool:
    return bool(samples) and all(0 <= v < math.inf for v in values(samples))


def test_the_dashboard_variables_and_instance_filters():
    board = dashboard()
    assert board["schemaVersion"] == 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["query"]["query"] == "label_values(syncd_results, instance)"
    assert variables["instance"]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            # Every series a query reads is the chosen instances'.
            found = METRIC.findall(target["expr"])
            assert found, target["expr"]
            for name, selector in found:
                assert 'instance=~"$instance"' in selector, (panel["title"], name)


def test_every_dashboard_query_answers_on_a_real_prometheus(stack: Stack):
    ws, prometheus, instance = stack.ws, stack.prometheus, stack.instance
    # The instance variable: Grafana's label_values(syncd_results, instance).
    assert prometheus.api("label/instance/values", **{"match[]": "syncd_results"}) == [instance]

    ws.result("exec_1_abcdef01", {"a": b"a" * 1000, "b/c": b"c" * 24})
    ws.mark("exec_1_abcdef01")
    wait_until(lambda: ws.recorded("exec_1_abcdef01"), what="the result recorded")
    wait_until(
        lambda: prometheus.query(f'syncd_published_results_total{{instance="{instance}"}} == 1'),
        timeout=60,
        what="prometheus to scrape the publish",
    )
    # The counter moves when the attempt ends, the gauges at the next report (once a second):
    # a scrape may fall between them.
    wait_until(
        lambda: prometheus.query(f'syncd_results{{instance="{instance}",state="done"}} == 1'),
        timeout=60,
        what="prometheus to scrape the result as done",
    )

    # What each panel shows a minute after one publish of 1024 bytes.
    def by_state(samples: list[dict[str, Any]]) -> bool:
        states = {s["metric"]["state"]: float(s["value"][1]) for s in samples}
        return states == {"uploading": 0, "pending": 0, "retrying": 0, "done": 1}

    def by_kind(samples: list[dict[str, Any]]) -> bool:
        kinds = {s["metric"]["kind"]: float(s["value"][1]) for s in samples}
        return kinds == {"transient": 0, "operator": 0, "input": 0}

    def free(samples: list[dict[str, Any]]) -> bool:
        info = os.statvfs(ws.outputs)
        return abs(values(samples)[0] - info.f_bavail * info.f_frsize) < 2**30

    expected = {
        "Results by state": by_state,
        "Oldest unpublished result": lambda s: values(s) == [0],
        "Results published per second": positive,
        "Bytes published per second": positive,
        "Upload time per result": positive,  # each quantile, after one upload
        "Failed attempts by kind": by_kind,
        "Since the last publish": at_least_zero,
        "Free on outputs_dir": free,
        "Memory": positive,
        "CPU": at_least_zero,
    }
    assert {title for title, _ in panel_queries()} == set(expected)
    for title, expr in panel_queries():
        sent = as_grafana_sends(expr, instance)
        samples = prometheus.query(sent)
        assert {s["metric"].get("instance") for s in samples} == {instance}, (title, sent)
        assert expected[title](samples), (title, sent, samples)


def test_every_rule_evaluates_on_a_real_prometheus(stack: Stack):
    ws, prometheus, instance = stack.ws, stack.prometheus, stack.instance
    # One result published; another finished 3 h ago whose metadata is broken (an input
    # failure a person must fix), marked once Prometheus has seen its failure counter at 0.
    ws.result("exec_1_abcdef01", {"a": b"a"})
    ws.mark("exec_1_abcdef01")
    ws.result("exec_2_abcdef02", {"x": b"x"}, metadata="{broken")
    three_hours_ago = time.time() - 3 * 3600
    for path in (ws.mark("exec_2_abcdef02"), ws.metadata_path("exec_2_abcdef02")):
        os.utime(path, (three_hours_ago, three_hours_ago))
    wait_until(lambda: ws.recorded("exec_1_abcdef01"), what="the result recorded")

    pending = {("SyncdFailuresNeedAPerson", "input"), ("SyncdResultWaitingLong", "")}
    alerts = wait_until(
        lambda: (a := prometheus.alerts()) and set(a) >= pending and a,
        timeout=60,
        what=f"alerts {sorted(pending)} pending",
    )
    assert alerts[("SyncdFailuresNeedAPerson", "input")]["state"] == "pending"  # for: 5m
    assert alerts[("SyncdFailuresNeedAPerson", "input")]["annotations"]["summary"] == (
        f"syncd on {instance} has input failures a person must fix"
    )
    assert alerts[("SyncdResultWaitingLong", "")]["annotations"]["summary"] == (
        f"a result on {instance} has waited over 2 h to be published"
    )

    # Every rule loaded and evaluated without an error.
    groups = prometheus.api("rules")["groups"]
    assert [g["name"] for g in groups] == [
        g["name"] for g in yaml.safe_load(RULES.read_text())["groups"]
    ]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == ALERTS
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule)
        assert not rule.get("lastError"), (name, rule)

    # Every series the rules read is one this Prometheus has from syncd.
    names = set(
        prometheus.api("label/__name__/values", **{"match[]": f'{{instance="{instance}"}}'})
    )
    for rule in rules():
        for name, _ in METRIC.findall(rule["expr"]):
            assert name in names, (rule["alert"], name)

    # Each expression, as Prometheus evaluates it now: only what the disk and the broken
    # result call for; a daemon that just started and published is not "not publishing".
    info = os.statvfs(ws.outputs)
    firing = {"SyncdFailuresNeedAPerson", "SyncdResultWaitingLong"}
    if info.f_bavail * info.f_frsize < LOW_SPACE:
        firing.add("SyncdOutputsSpaceLow")
    for rule in rules():
        samples = prometheus.query(rule["expr"])
        assert {s["metric"]["instance"] for s in samples} == (
            {instance} if rule["alert"] in firing else set()
        ), (rule["alert"], samples)
    assert set(prometheus.alerts()) == {
        (name, "input" if "Failures" in name else "") for name in firing
    }

    # The daemon stops: SyncdDown's expression sees it at the next scrape.
    assert stack.daemon.terminate() == 0
    wait_until(
        lambda: ("SyncdDown", "") in prometheus.alerts(),
        timeout=60,
        what="SyncdDown pending",
    )
    (down,) = prometheus.query(next(r["expr"] for r in rules() if r["alert"] == "SyncdDown"))
    assert down["metric"] == {"__name__": "up", "instance": instance, "job": JOB}
    assert prometheus.alerts()[("SyncdDown", "")]["annotations"]["summary"] == (
        f"syncd on {instance} is down"
    )
