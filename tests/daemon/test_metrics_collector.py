"""The Prometheus collector reads the registry at scrape time (docs/architecture.md §6): names, units,
bounded labels, migration gauges and histograms, and a broken collection counted instead of
failing the scrape. Checked with prometheus_client's parser and, when installed, promtool."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vfiod.daemon.config import GuestConfig, RamConfig
from vfiod.daemon.lifecycle import LifecycleState
from vfiod.daemon.metrics import MetricsServer, VfiodCollector, proc_status_bytes
from vfiod.daemon.registry import RECOVERY_OUTCOMES, DeviceEntry, Registry, recovery_outcome


def _registry() -> Registry:
    reg = Registry(clock=lambda: 1000.0)
    for name in ("g1", "g2"):
        e = reg.add_guest(GuestConfig(name, (RamConfig("ram0", 0, 1 << 30),)))
        reg.lifecycle.move(name, LifecycleState.CLAIMED, "test")
        reg.lifecycle.move(name, LifecycleState.RUNNING, "test")
        e.devices["0000:3b:00.1" if name == "g1" else "0000:3c:00.1"] = DeviceEntry(
            "0000:3b:00.1" if name == "g1" else "0000:3c:00.1", name, "default",
            protocol="v2", state=2, state_label="RUNNING", tracker="device-logging",
            pre_copy_dirty_page_tracking=name == "g1", migratable=True)
    done = reg.begin_migration("g1", "source", "10.0.0.2:4444")
    reg.update(done, state="active", phase="precopy", iteration=3, ram_remaining_bytes=1 << 20,
               device_remaining_bytes=4096, bandwidth_bps=1e9, dirty_rate_bps=1e6,
               predicted_downtime_s=0.12, will_converge=True, last_sync_s=0.002)
    reg.observe_sync(0.002)
    reg.finish(done, "completed", downtime_s=0.1, predicted_s=0.12, verified=True)
    running = reg.begin_migration("g2", "source", "10.0.0.3:4444")
    reg.lifecycle.move("g2", LifecycleState.MIGRATING_OUT, "test")
    reg.update(running, state="active", phase="precopy", iteration=7,
               ram_remaining_bytes=5 << 20, predicted_downtime_s=2.5, will_converge=False)
    return reg


def _families(reg: Registry) -> tuple[str, dict]:
    cr = CollectorRegistry(auto_describe=False)
    cr.register(VfiodCollector(reg, backend="sim", pinned_bytes=lambda: 123))
    text = generate_latest(cr).decode()
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def _value(fams: dict, family: str, sample: str | None = None, **labels: str) -> float:
    hits = [s.value for s in fams[family].samples if (sample is None or s.name == sample)
            and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (family, labels, fams[family].samples)
    return float(hits[0])


def test_migration_metrics() -> None:
    text, fams = _families(_registry())
    assert _value(fams, "vfiod_migrations", guest="g1", result="completed") == 1
    assert _value(fams, "vfiod_migration_last_downtime_seconds", guest="g1") == 0.1
    assert _value(fams, "vfiod_migration_predicted_downtime_seconds", guest="g1") == 0.12
    assert _value(fams, "vfiod_migration_prediction_error_ratio", guest="g1") == pytest.approx(
        0.2)
    assert _value(fams, "vfiod_migration_downtime_seconds",
                  "vfiod_migration_downtime_seconds_bucket", le="0.1") == 1
    assert _value(fams, "vfiod_migration_downtime_seconds",
                  "vfiod_migration_downtime_seconds_bucket", le="0.05") == 0
    assert _value(fams, "vfiod_dirty_sync_duration_seconds",
                  "vfiod_dirty_sync_duration_seconds_count") == 1
    # The running one: active, in pre-copy, will not converge, its numbers as they are.
    assert _value(fams, "vfiod_migration_active", guest="g2") == 1
    assert _value(fams, "vfiod_migration_active", guest="g1") == 0
    # Being migrated away, g2 still runs here.
    assert _value(fams, "vfiod_guest_running", guest="g2") == 1
    assert _value(fams, "vfiod_migration_phase", guest="g2", phase="precopy") == 1
    assert _value(fams, "vfiod_migration_phase", guest="g2", phase="stopcopy") == 0
    assert _value(fams, "vfiod_migration_iterations", guest="g2") == 7
    assert _value(fams, "vfiod_migration_ram_remaining_bytes", guest="g2") == 5 << 20
    assert _value(fams, "vfiod_migration_will_converge", guest="g2") == 0
    assert _value(fams, "vfiod_device_pre_copy_dirty_tracking_enabled", guest="g2") == 0
    assert _value(fams, "vfiod_device_info", device="0000:3b:00.1", protocol="v2",
                  tracker="device-logging") == 1
    assert _value(fams, "vfiod_process_pinned_memory_bytes") == 123
    assert _value(fams, "vfiod_process_resident_memory_bytes") > 0
    # No migration id, peer or error text in any label.
    assert "10.0.0.2" not in text and "completed" in text
    for fam in fams.values():
        assert fam.name.startswith("vfiod_")
        for s in fam.samples:
            assert set(s.labels) <= {"guest", "device", "phase", "result", "protocol",
                                     "tracker", "version", "backend", "le"}


def _rolled_back(reg: Registry, result: str, rollback: dict) -> None:
    rec = reg.begin_migration("g1", "source", "10.0.0.2:4444")
    reg.finish(rec, result, error="pre-copy: EIO on 0000:3b:00.1", rollback=rollback)


def test_device_recoveries_count_how_each_rollback_ended() -> None:
    """The session result's per-device rollback (state, rungs) becomes a counter with a
    bounded outcome: back to RUNNING, back through VFIO_DEVICE_RESET, or not back."""
    reg = _registry()
    _rolled_back(reg, "cancelled", {"0000:3b:00.1": {"state": "RUNNING", "rungs": []}})
    _rolled_back(reg, "failed", {"0000:3b:00.1": {
        "state": "RUNNING", "rungs": ["RUNNING: EIO", "VFIO_DEVICE_RESET: ok"],
        "error": "set RUNNING: EIO"}})
    _rolled_back(reg, "failed", {
        "0000:3b:00.1": {"state": "ERROR", "rungs": ["VFIO_DEVICE_RESET: EIO"],
                         "error": "reset: EIO"},
        "0000:3b:00.2": {"state": "unknown", "error": "OSError: gone"}})
    _rolled_back(reg, "cancelled", {"0000:3b:00.1": {"state": "RUNNING", "rungs": []}})
    _rolled_back(reg, "failed", {})         # a failure before any device was touched
    text, fams = _families(reg)
    fam = "vfiod_device_recoveries"
    assert _value(fams, fam, guest="g1", device="0000:3b:00.1", outcome="running") == 2
    assert _value(fams, fam, guest="g1", device="0000:3b:00.1", outcome="reset") == 1
    assert _value(fams, fam, guest="g1", device="0000:3b:00.1", outcome="failed") == 1
    assert _value(fams, fam, guest="g1", device="0000:3b:00.2", outcome="failed") == 1
    assert len(fams[fam].samples) == 4
    assert {s.name for s in fams[fam].samples} == {"vfiod_device_recoveries_total"}
    assert {s.labels["outcome"] for s in fams[fam].samples} <= {"running", "reset", "failed"}
    assert "EIO" not in text and "gone" not in text        # no error text in a label


def test_the_destination_repeats_the_downtime_without_counting_it_again() -> None:
    """The destination's record carries the source's REPORT (downtime, prediction, error)
    for its status and gauges; the histogram counts each migration once, at the source."""
    reg = Registry(clock=lambda: 1000.0)
    for name, role in (("out", "source"), ("in", "destination")):
        reg.add_guest(GuestConfig(name, (RamConfig("ram0", 0, 1 << 30),)))
        rec = reg.begin_migration(name, role, "10.0.0.3:4444")
        reg.finish(rec, "completed", downtime_s=0.05, predicted_s=0.04, verified=True)
        assert rec.prediction_error == pytest.approx(0.2)
    _, fams = _families(reg)
    assert _value(fams, "vfiod_migration_last_downtime_seconds", guest="in") == 0.05
    assert _value(fams, "vfiod_migration_prediction_error_ratio", guest="in") == pytest.approx(
        0.2)
    assert _value(fams, "vfiod_migration_downtime_seconds",
                  "vfiod_migration_downtime_seconds_count") == 1      # the source's


def test_recovery_outcome_names_only_bounded_labels() -> None:
    assert [recovery_outcome(r) for r in (
        {"state": "RUNNING", "rungs": ["already RUNNING"]},
        {"state": "RUNNING", "rungs": ["VFIO_DEVICE_RESET: ok"]},
        {"state": "STOP", "rungs": ["VFIO_DEVICE_RESET: ok"]},
        {"state": "unknown", "error": "KernelError: ENODEV"},
        {})] == ["running", "reset", "failed", "failed", "failed"]
    assert set(RECOVERY_OUTCOMES) == {"running", "reset", "failed"}


def test_promtool_accepts_the_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    text, _ = _families(_registry())
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_broken_collection_is_counted_not_fatal() -> None:
    reg = _registry()

    def broken() -> None:
        raise RuntimeError("driver went away")
    reg.refreshers.append(broken)
    _, fams = _families(reg)
    assert _value(fams, "vfiod_scrape_errors", "vfiod_scrape_errors_total") == 1
    assert "vfiod_process_resident_memory_bytes" in fams
    assert "vfiod_migrations" not in fams


def test_http_endpoint_on_loopback() -> None:
    server = MetricsServer(VfiodCollector(_registry()), "127.0.0.1", 0)
    try:
        assert server.port > 0 and server.address == f"127.0.0.1:{server.port}"
        body = urllib.request.urlopen(f"http://{server.address}/metrics", timeout=30).read()
        assert b'vfiod_migrations_total{guest="g1",result="completed"} 1.0' in body
    finally:
        server.close()


def test_proc_status_bytes(tmp_path: Path) -> None:
    f = tmp_path / "status"
    f.write_text("VmLck:\t  12 kB\nVmPin:\t 4 kB\nVmRSS:\t 99 kB\n")
    assert proc_status_bytes(("VmLck", "VmPin"), str(f)) == {"VmLck": 12288, "VmPin": 4096}
    assert proc_status_bytes(("VmLck",), str(tmp_path / "none")) == {"VmLck": 0}
