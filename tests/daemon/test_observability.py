"""What systemd/ ships for monitoring (docs/architecture.md §6): the Grafana dashboard
(``systemd/grafana-dashboard.json``) and the Prometheus alert rules
(``systemd/vfiod-alerts.yml``) with their promtool unit tests
(``tests/daemon/vfiod-alerts.test.yml``).

``promtool check rules`` and ``promtool test rules`` must pass (promtool comes with the
``prometheus`` package that ``make deps`` installs); every alert has a case where it fires
and one where it stays quiet; and every metric a panel, a rule or a rule test names, with
every label they match on, appears in a live ``/metrics`` scrape of two real daemons after
one migration between them and one cancelled (some series exist only once a guest has
migrated, the recoveries only once a device was rolled back).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon_configs import host_config
from tests.support.daemons import REPO, DaemonProcess, guest_status, wait_until

DASHBOARD = REPO / "systemd" / "grafana-dashboard.json"
RULES = REPO / "systemd" / "vfiod-alerts.yml"
RULE_TESTS = REPO / "tests" / "daemon" / "vfiod-alerts.test.yml"

ALERTS = {"VfiodMigrationNotConverging", "VfiodMigrationStuck", "VfiodPredictionErrorHigh",
          "VfiodDeviceRecovery", "VfiodDeviceInError"}
#: What the issue asks the dashboard to show, as the metrics that show it.
DASHBOARD_MUST_SHOW = {
    "migration progress": "vfiod_migration_ram_remaining_bytes",
    "predicted downtime": "vfiod_migration_predicted_downtime_seconds",
    "actual downtime": "vfiod_migration_last_downtime_seconds",
    "prediction error": "vfiod_migration_prediction_error_ratio",
    "dirty rate": "vfiod_migration_dirty_rate_bytes_per_second",
    "bandwidth": "vfiod_migration_bandwidth_bytes_per_second",
}
#: Labels Prometheus adds or PromQL makes, not the daemon.
SERVER_LABELS = {"instance", "job", "le"}

METRIC_RE = re.compile(r"\bvfiod_[a-z0-9_]+\b")
MATCHER_RE = re.compile(r"\b([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING_RE = re.compile(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)")
CASE_RE = re.compile(r"- alertname: (\w+)\n\s+eval_time: \S+\n\s+exp_alerts:(.*)\n")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run `make deps` (it installs the prometheus package)")
    return path


def _dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return queries


def _labels_in(text: str) -> set[str]:
    out = set(MATCHER_RE.findall(text))
    for group in GROUPING_RE.findall(text):
        out |= {name.strip() for name in group.split(",") if name.strip()}
    return out


# -- the files on their own ---------------------------------------------------------------

def test_promtool_checks_the_rules() -> None:
    r = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in r.stdout


def test_promtool_unit_tests_pass() -> None:
    r = subprocess.run([_promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_shown_to_fire_and_to_stay_quiet() -> None:
    assert set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE)) == ALERTS
    fires: set[str] = set()
    quiet: set[str] = set()
    for name, rest in CASE_RE.findall(RULE_TESTS.read_text()):
        (quiet if rest.strip() == "[]" else fires).add(name)
    assert fires == ALERTS, f"no firing case for {ALERTS - fires}"
    assert quiet == ALERTS, f"no quiet case for {ALERTS - quiet}"


def test_dashboard_shows_what_the_operator_needs() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    named = set(METRIC_RE.findall("\n".join(_dashboard_queries())))
    missing = {what: m for what, m in DASHBOARD_MUST_SHOW.items() if m not in named}
    assert not missing, f"the dashboard does not show {missing}"


def test_metric_name_scan_sees_every_metric_of_a_query() -> None:
    """The scans below trust these two regexes; a query they misread would pass unseen."""
    q = ('sum by (le, instance) (rate(vfiod_migration_downtime_seconds_bucket'
         '{guest=~"$guest", result="failed"}[5m])) and on (guest) vfiod_migration_active')
    assert METRIC_RE.findall(q) == ["vfiod_migration_downtime_seconds_bucket",
                                    "vfiod_migration_active"]
    assert _labels_in(q) == {"le", "instance", "guest", "result"}


# -- against a live daemon ---------------------------------------------------------------

@pytest.fixture(scope="module")
def scraped() -> Iterator[tuple[set[str], set[str]]]:
    """Sample names and label names of both daemons' ``/metrics`` after g1 migrated and
    a migration of g2 (which cannot converge) was cancelled: its devices' recoveries."""
    src = DaemonProcess(host_config("source", guests=("g1", "g2"),
                                    migration='bandwidth_limit = "64MiB"\n',
                                    workloads={"g1": ("128KiB", "2MiB"),
                                               "g2": ("64KiB", "8MiB")}), "obs-src")
    dst = DaemonProcess(host_config("destination", guests=("g1", "g2")), "obs-dst")
    try:
        src.wait_ready()
        dst.wait_ready()
        r = src.ctl("migrate", "g1", "--to", dst.migration_address, "--timeout", "60",
                    "--on-timeout", "force", "--json")
        assert r.returncode == 0, r.stdout + r.stderr + src.log() + dst.log()
        r = src.ctl("migrate", "g2", "--to", dst.migration_address, "--detach")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_until(lambda: guest_status(src, "g2")["migration"]["progress"]["iteration"] >= 1,
                   60, "g2's first pre-copy pass")
        assert src.ctl("cancel", "g2").returncode == 0
        for d in (src, dst):
            wait_until(lambda d=d: guest_status(d, "g2")["migration"]["result"] is not None,
                       60, "the cancelled migration to end on both daemons")
        names: set[str] = set()
        labels: set[str] = set()
        for d in (src, dst):
            text = urllib.request.urlopen(f"http://{d.metrics_address}/metrics",
                                          timeout=30).read().decode()
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    names.add(s.name)
                    labels |= set(s.labels)
        yield names, labels
    finally:
        for d in (src, dst):
            d.cleanup()


@pytest.mark.parametrize("path", [DASHBOARD, RULES, RULE_TESTS], ids=lambda p: p.name)
def test_every_metric_named_is_exported(scraped: tuple[set[str], set[str]],
                                        path: Path) -> None:
    names, labels = scraped
    text = "\n".join(_dashboard_queries()) if path == DASHBOARD else path.read_text()
    named = set(METRIC_RE.findall(text))
    assert named, f"{path.name} names no vfiod metric"
    assert not named - names, (f"{path.name} names metrics the daemon does not export: "
                               f"{sorted(named - names)}")
    used = _labels_in(text) - SERVER_LABELS
    assert not used - labels, (f"{path.name} matches on labels no vfiod metric has: "
                               f"{sorted(used - labels)}")
