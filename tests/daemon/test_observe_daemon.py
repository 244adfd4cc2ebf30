"""Observe-only devices in a running daemon (docs/architecture.md §8.5): ``vfiod ctl
status`` (text and ``--json``) and ``/metrics`` show each observed device's migration
state from debugfs or why it cannot be read; SIGHUP applies a new ``[[observe]]`` list at
once; a host whose debugfs is root-only says what the daemon needs."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support.daemons import DaemonProcess

OBSERVED = "0000:3e:00.2"      # another VMM's device with migration support
NO_MIG = "0000:3e:00.3"        # another VMM's device without


def _config(debugfs: str, observe: str) -> str:
    return f"""
[[guest]]
name = "g1"
memory = "16MiB"
[[guest.device]]
name = "0000:3b:00.1"

{observe}
[sim]
debugfs = "{debugfs}"
[[sim.device]]
name = "0000:3b:00.1"
capability = "v2_p2p"
[[sim.device]]
name = "{OBSERVED}"
capability = "v2_precopy_p2p"
[[sim.device]]
name = "{NO_MIG}"
capability = "not_migratable"
"""


OBSERVE = f"""
[[observe]]
device = "{OBSERVED}"
owner = "vm7"
[[observe]]
device = "{NO_MIG}"
[[observe]]
device = "0000:3e:00.9"
"""


def _daemon(debugfs: str, observe: str, name: str) -> Iterator[DaemonProcess]:
    d = DaemonProcess(_config(debugfs, observe), name)
    try:
        d.wait_ready()
        yield d
        assert d.stop() == 0, d.log()
    finally:
        d.cleanup()


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    yield from _daemon("vfio", OBSERVE, "observe")


def _metrics(d: DaemonProcess) -> list[str]:
    body = urllib.request.urlopen(f"http://{d.metrics_address}/metrics", timeout=30).read()
    return [line for line in body.decode().splitlines() if line.startswith("vfiod_observed")]


def test_status_and_metrics_show_state_and_reasons(daemon: DaemonProcess) -> None:
    r = daemon.ctl("status", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["device"]: row for row in json.loads(r.stdout)["observed"]}
    assert list(rows) == [OBSERVED, NO_MIG, "0000:3e:00.9"]
    ok = rows[OBSERVED]
    assert (ok["state"], ok["owner"], ok["readable"], ok["problem"]) == ("RUNNING", "vm7",
                                                                          True, None)
    assert abs(ok["read_at"] - time.time()) < 60 and 0 <= ok["age_s"] < 60
    assert rows[NO_MIG]["problem"] == "no-migration" and rows[NO_MIG]["state"] is None
    assert rows["0000:3e:00.9"]["problem"] == "no-device"
    text = daemon.ctl("status").stdout
    assert "observed (owned by another VMM; state read from debugfs, never touched):" in text
    line = next(x for x in text.splitlines() if OBSERVED in x)
    assert "owner vm7" in line and "RUNNING" in line and "s ago" in line
    assert "unreadable (no-migration), read " in text and f"{NO_MIG} has no migration" in text
    lines = _metrics(daemon)
    assert (f'vfiod_observed_device_migration_state{{device="{OBSERVED}",state="RUNNING"}} 1.0'
            in lines)
    assert f'vfiod_observed_device_migration_state{{device="{OBSERVED}",state="STOP"}} 0.0' \
        in lines
    assert f'vfiod_observed_device_readable{{device="{OBSERVED}"}} 1.0' in lines
    assert f'vfiod_observed_device_readable{{device="{NO_MIG}"}} 0.0' in lines
    assert not any(f'device="{NO_MIG}",state=' in x and x.endswith(" 1.0") for x in lines)
    # never touched: the observed devices are in no guest and nothing opened them
    devices = {d["name"]: d for d in daemon.call("devices")["devices"]}
    assert devices[OBSERVED]["guest"] is None
    assert daemon.call("status", {"guest": "g1"})["observed"] == []   # one guest's status


def test_sighup_applies_a_new_observe_list_at_once(daemon: DaemonProcess) -> None:
    n = len(daemon.notify.messages)
    daemon.config_path.write_text(daemon.config_path.read_text().replace(OBSERVE, f"""
[[observe]]
device = "{NO_MIG}"
owner = "vm8"
"""))
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for("RELOADING", after=n)
    daemon.notify.wait_for("READY", after=n)
    st = daemon.call("status")
    assert st["daemon"]["restart_needed"] == [] and st["daemon"]["reload_error"] is None
    assert [(r["device"], r["owner"]) for r in st["observed"]] == [(NO_MIG, "vm8")]


def test_a_root_only_debugfs_says_what_the_daemon_needs() -> None:
    for d in _daemon("denied", OBSERVE, "observe-denied"):
        rows = d.call("status")["observed"]
        assert {r["problem"] for r in rows} == {"denied"}
        assert "CAP_DAC_READ_SEARCH" in rows[0]["reason"] and "0700" in rows[0]["reason"]
        assert f'vfiod_observed_device_readable{{device="{OBSERVED}"}} 0.0' in _metrics(d)
        assert "unreadable (denied), read " in d.ctl("status").stdout
