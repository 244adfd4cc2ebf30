"""The downtime's parts, predicted and measured, in the registry (``ctl status --json``)
and the metrics, with a bounded ``component`` label (docs/architecture.md §4, §6)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vfiod.daemon.config import GuestConfig, RamConfig
from vfiod.daemon.metrics import VfiodCollector
from vfiod.daemon.registry import Registry
from vfiod.migration.planning.breakdown import COMPONENTS


def test_the_breakdown_is_in_the_status_and_the_metrics() -> None:
    reg = Registry(clock=lambda: 1000.0)
    reg.add_guest(GuestConfig("g1", (RamConfig("ram0", 0, 1 << 30),)))
    rec = reg.begin_migration("g1", "source", "10.0.0.2:4444")
    parts = {c: {"predicted_s": 0.001 * (i + 1), "actual_s": 0.002 * (i + 1)}
             for i, c in enumerate(COMPONENTS)}
    reg.finish(rec, "completed", downtime_s=0.042, predicted_s=0.021, downtime_breakdown=parts)
    assert rec.to_json()["downtime_breakdown"] == parts
    cr = CollectorRegistry(auto_describe=False)
    cr.register(VfiodCollector(reg, backend="sim", pinned_bytes=lambda: 0))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(cr).decode())}
    samples = fams["vfiod_migration_downtime_component_seconds"].samples
    got = {(s.labels["component"], s.labels["kind"]): s.value for s in samples}
    assert got[("verify", "predicted")] == parts["verify"]["predicted_s"]
    assert got[("verify", "actual")] == parts["verify"]["actual_s"]
    assert {c for c, _ in got} == set(COMPONENTS)          # bounded: the seven parts
    assert {s.labels["guest"] for s in samples} == {"g1"}


def test_no_breakdown_before_a_migration_completes() -> None:
    reg = Registry(clock=lambda: 1000.0)
    reg.add_guest(GuestConfig("g1", (RamConfig("ram0", 0, 1 << 30),)))
    rec = reg.begin_migration("g1", "source", "10.0.0.2:4444")
    reg.finish(rec, "failed", error="link down")
    assert rec.downtime_breakdown is None
