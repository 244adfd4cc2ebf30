"""The Prometheus endpoint: a custom collector that reads the ``Registry`` at scrape time
(docs/architecture.md §6; Prometheus' metric and label naming conventions). This module
and ``metrics_exposition.py`` (the served text) are the only ones that import
prometheus_client; domain code fills the registry with plain values.

Conventions: the ``vfiod_`` prefix, base units (seconds, bytes, bytes per second, ratios),
counters end in ``_total``, labels are bounded: ``guest``, ``device``, ``phase``, ``result``,
``protocol``, ``tracker``, never a migration id or an error text. Gauges of a migration
(``vfiod_migration_*``) show the running migration, else the guest's last one, and are
absent before a guest's first migration. ``vfiod_device_migration_state`` is the kernel's
``enum vfio_device_mig_state`` value (HELP lists them). Observed devices (another VMM's,
docs/architecture.md §8.5) have ``vfiod_observed_device_migration_state{device,state}``,
1 for the state debugfs shows and 0 for the others (``unknown`` for text that is not a
state; all 0 while unreadable), and ``vfiod_observed_device_readable{device}``. Served on
127.0.0.1 by default.
A collector failure is counted in ``vfiod_scrape_errors_total`` and the scrape still
answers with what it has.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable, Iterator
from typing import Any

import psutil
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import make_wsgi_app, start_http_server

from vfiod import __version__
from vfiod.abi.vfio import vfio_device_mig_state
from vfiod.daemon.lifecycle import RUNS_HERE
from vfiod.daemon.metrics_exposition import FamilyTexts, metrics_app
from vfiod.daemon.registry import PHASES, Buckets, Registry
from vfiod.vfio.debugfs import UNKNOWN_STATE

log = logging.getLogger("vfiod.metrics")

_STATES = ", ".join(f"{m.value}={m.name}" for m in vfio_device_mig_state)
#: the bounded ``state`` label of an observed device: every name debugfs prints, and unknown
_OBSERVED_STATES = (*(m.name for m in vfio_device_mig_state), UNKNOWN_STATE)


def proc_status_bytes(fields: tuple[str, ...], path: str = "/proc/self/status") -> dict[str, int]:
    """``VmLck``/``VmPin``... from /proc/self/status, in bytes (absent = 0)."""
    out = dict.fromkeys(fields, 0)
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in out:
                    parts = value.split()
                    out[key] = int(parts[0]) * 1024 if parts and parts[0].isdigit() else 0
    except OSError:
        pass
    return out


class VfiodCollector:
    """Turns one ``Registry.snapshot()`` into metric families."""

    def __init__(self, registry: Registry, *, backend: str = "linux",
                 pinned_bytes: Callable[[], int] | None = None,
                 proc_status: str = "/proc/self/status",
                 observed: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.registry = registry
        self.observed = observed
        self.backend = backend
        self.pinned_bytes = pinned_bytes
        self.proc_status = proc_status
        self._process = psutil.Process()
        #: the guests' rows of the latest collection and the families built from them
        self._kept: tuple[list[dict[str, Any]], list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self.registry.snapshot()
            families = list(self._families(snap))
        except Exception:  # noqa: BLE001 - a scrape must answer; the count says it broke
            log.exception("metrics: collecting failed")
            self.registry.count_scrape_error()
            families = []
        yield from families
        yield from self._process_families()
        errors = CounterMetricFamily("vfiod_scrape_errors", "Scrapes whose collection failed.")
        errors.add_metric([], self.registry.scrape_errors_total)
        yield errors

    # -- daemon, guests, devices, migrations ------------------------------------------------
    def _families(self, snap: dict[str, Any]) -> Iterator[Metric]:
        info = GaugeMetricFamily("vfiod_build_info", "vfiod version and kernel backend.",
                                 labels=["version", "backend"])
        info.add_metric([__version__, self.backend], 1)
        yield info
        yield from self._per_guest_families(snap["guests"])
        if self.observed is not None:
            yield from _observed_families(self.observed())

        total = CounterMetricFamily("vfiod_migrations", "Finished migrations by result.",
                                    labels=["guest", "result"])
        for (guest, result), n in sorted(snap["migrations_total"].items()):
            total.add_metric([guest, result], n)
        yield total
        rec = CounterMetricFamily(
            "vfiod_device_recoveries", "Devices rolled back after a failed or cancelled "
            "migration, by outcome: running (back to RUNNING), reset (back to RUNNING "
            "through VFIO_DEVICE_RESET), failed.", labels=["guest", "device", "outcome"])
        for (guest, device, outcome), n in sorted(snap["device_recoveries_total"].items()):
            rec.add_metric([guest, device, outcome], n)
        yield rec
        yield _histogram("vfiod_migration_downtime_seconds",
                         "Measured downtime of completed migrations (source stop to "
                         "destination acknowledgement).", snap["downtime"])
        yield _histogram("vfiod_dirty_sync_duration_seconds",
                         "Time one dirty-page sync of a guest took.", snap["sync_duration"])
        req = CounterMetricFamily("vfiod_control_requests", "Control requests by result.",
                                  labels=["result"])
        for result, n in sorted(snap["requests_total"].items()):
            req.add_metric([result], n)
        yield req
        recovered = CounterMetricFamily(
            "vfiod_recoveries", "Guests a restart of vfiod recovered from its journal, by "
            "what it found (docs/architecture.md §1.8).", labels=["outcome"])
        for outcome, n in sorted(snap["recoveries_total"].items()):
            recovered.add_metric([outcome], n)
        yield recovered
        refused = CounterMetricFamily("vfiod_control_refused_peers",
                                      "Control connections refused by peer credentials.")
        refused.add_metric([], snap["refused_peers_total"])
        yield refused

    def _per_guest_families(self, guests: list[dict[str, Any]]) -> list[Metric]:
        """The guest, device and migration families: those of the latest collection while
        the guests' rows equal its rows (a thousand samples at 64 x 4 are not built again
        for nothing; docs/benchmarks.md §2). The families are shared: nobody changes them."""
        kept = self._kept
        if kept is not None and kept[0] == guests:
            return kept[1]
        families = [*self._guest_families(guests), *self._device_families(guests),
                    *self._migration_families(guests)]
        self._kept = (guests, families)
        return families

    def _guest_families(self, guests: list[dict[str, Any]]) -> Iterator[Metric]:
        ram = GaugeMetricFamily("vfiod_guest_ram_bytes", "Configured guest RAM.",
                                labels=["guest"])
        up = GaugeMetricFamily("vfiod_guest_running", "1 if the guest runs on this host.",
                               labels=["guest"])
        unknown = GaugeMetricFamily(
            "vfiod_guest_outcome_unknown", "1 while a migration of the guest is unsettled "
            "here: committed (source) or prepared (destination), waiting for the peer's "
            "word; the guest runs nowhere it can be seen from here (docs/architecture.md "
            "§1.7).", labels=["guest"])
        for g in guests:
            ram.add_metric([g["name"]], g["ram_bytes"])
            up.add_metric([g["name"]], 1 if g["state"] in RUNS_HERE else 0)
            unknown.add_metric([g["name"]], 1 if g["unsettled"] else 0)
        yield ram
        yield up
        yield unknown

    def _device_families(self, guests: list[dict[str, Any]]) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "vfiod_device_migration_state",
            f"Device migration state (enum vfio_device_mig_state: {_STATES}).",
            labels=["guest", "device", "protocol"])
        tracking = GaugeMetricFamily(
            "vfiod_device_pre_copy_dirty_tracking_enabled",
            "1 if the device's container is queried for dirty pages during pre-copy; 0 = "
            "opted out (its pages are taken in stop-and-copy).", labels=["guest", "device"])
        info = GaugeMetricFamily("vfiod_device_info", "Device migration protocol and the "
                                 "dirty tracker of its container.",
                                 labels=["guest", "device", "protocol", "tracker"])
        for g in guests:
            for d in g["devices"]:
                proto = d["protocol"] or "none"
                if d["state"] is not None:
                    state.add_metric([g["name"], d["name"], proto], d["state"])
                tracking.add_metric([g["name"], d["name"]],
                                    1 if d["pre_copy_dirty_page_tracking"] else 0)
                info.add_metric([g["name"], d["name"], proto, d["tracker"] or "none"], 1)
        yield state
        yield tracking
        yield info

    def _migration_families(self, guests: list[dict[str, Any]]) -> Iterator[Metric]:
        def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["guest", *(extra or [])])

        active = gauge("vfiod_migration_active", "1 while a migration of the guest runs.")
        phase = gauge("vfiod_migration_phase", "1 for the phase the guest's migration is in.",
                      ["phase"])
        iters = gauge("vfiod_migration_iterations", "Pre-copy iterations done.")
        pred = gauge("vfiod_migration_predicted_downtime_seconds",
                     "Latest downtime prediction (RAM, device state and fixed costs).")
        last = gauge("vfiod_migration_last_downtime_seconds", "Measured downtime of the "
                     "guest's last completed migration.")
        err = gauge("vfiod_migration_prediction_error_ratio",
                    "|predicted - actual| / actual downtime of the last completed migration.")
        ram = gauge("vfiod_migration_ram_remaining_bytes", "Dirty RAM not yet sent.")
        dev = gauge("vfiod_migration_device_remaining_bytes", "Device state not yet read "
                    "(pre-copy plus stop-copy bytes of all the guest's devices).")
        bw = gauge("vfiod_migration_bandwidth_bytes_per_second", "Bandwidth estimate.")
        dirty = gauge("vfiod_migration_dirty_rate_bytes_per_second", "Guest dirty rate.")
        conv = gauge("vfiod_migration_will_converge", "1 if pre-copy can converge (dirty "
                     "rate below bandwidth and pages are tracked).")
        sync = gauge("vfiod_dirty_sync_last_duration_seconds", "Duration of the last dirty "
                     "sync of the guest's migration.")
        part = gauge("vfiod_migration_downtime_component_seconds", "The last completed "
                     "migration's downtime by part, as predicted before the switchover and "
                     "as measured (kind).", ["component", "kind"])
        half = gauge("vfiod_migration_downtime_half_seconds", "The last completed migration "
                     "coordinated with QEMU's own: its downtime split into QEMU's share and "
                     "the devices' share (half), predicted and measured (kind).",
                     ["half", "kind"])
        for g in guests:
            m, name = g["migration"], g["name"]
            is_active = bool(m and m["result"] is None)
            active.add_metric([name], 1 if is_active else 0)
            for p in PHASES[:-1]:
                phase.add_metric([name, p], 1 if is_active and m["progress"]["phase"] == p
                                 else 0)
            if m is None:
                continue
            pr = m["progress"]
            iters.add_metric([name], pr["iteration"])
            _maybe(pred, [name], m["predicted_downtime_s"] if not is_active
                   and m["predicted_downtime_s"] is not None else pr["predicted_downtime_s"])
            _maybe(last, [name], m["downtime_s"])
            _maybe(err, [name], m["prediction_error"])
            ram.add_metric([name], pr["ram_remaining_bytes"])
            dev.add_metric([name], pr["device_remaining_bytes"])
            _maybe(bw, [name], pr["bandwidth_bps"])
            _maybe(dirty, [name], pr["dirty_rate_bps"])
            if pr["will_converge"] is not None:
                conv.add_metric([name], 1 if pr["will_converge"] else 0)
            _maybe(sync, [name], pr["last_sync_s"])
            for component, figures in (m.get("downtime_breakdown") or {}).items():
                part.add_metric([name, component, "predicted"], figures["predicted_s"])
                part.add_metric([name, component, "actual"], figures["actual_s"])
            vmm = m.get("vmm") or {}
            for kind in ("predicted", "actual"):
                for key, label in (("vmm_s", "qemu"), ("devices_s", "devices")):
                    _maybe(half, [name, label, kind], (vmm.get(kind) or {}).get(key))
        yield from (active, phase, iters, pred, last, err, ram, dev, bw, dirty, conv, sync,
                    part, half)

    # -- the process ----------------------------------------------------------------------
    def _process_families(self) -> Iterator[Metric]:
        try:
            mem = self._process.memory_info()
        except psutil.Error:
            return
        st = proc_status_bytes(("VmLck", "VmPin"), self.proc_status)
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        pinned = self.pinned_bytes() if self.pinned_bytes is not None else st["VmPin"]
        for name, doc, value in (
            ("vfiod_process_resident_memory_bytes", "Resident memory (RSS).", mem.rss),
            ("vfiod_process_virtual_memory_bytes", "Virtual memory size.", mem.vms),
            ("vfiod_process_locked_memory_bytes", "Locked memory (VmLck).", st["VmLck"]),
            ("vfiod_process_pinned_memory_bytes", "Memory pinned for device DMA (VmPin; "
             "the simulated kernel's pinned bytes on the sim backend).", pinned),
            ("vfiod_process_memlock_limit_bytes", "RLIMIT_MEMLOCK soft limit (+Inf = "
             "unlimited).", float("inf") if soft == resource.RLIM_INFINITY else soft),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g


def _observed_families(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "vfiod_observed_device_migration_state", "1 for the migration state debugfs shows "
        "for a device another VMM owns (vfiod only reads it), 0 for the others; all 0 "
        "while it cannot be read.", labels=["device", "state"])
    readable = GaugeMetricFamily(
        "vfiod_observed_device_readable", "1 if the observed device's debugfs migration "
        "state could be read (vfiod ctl status says why not).", labels=["device"])
    for row in rows:
        for name in _OBSERVED_STATES:
            state.add_metric([row["device"], name], 1 if row["state"] == name else 0)
        readable.add_metric([row["device"]], 1 if row["readable"] else 0)
    yield state
    yield readable


def _maybe(family: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
    if value is not None:
        family.add_metric(labels, value)


def _histogram(name: str, doc: str, b: Buckets) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc)
    h.add_metric([], b.cumulative(), sum_value=b.sum)
    return h


class MetricsServer:
    """``/metrics`` over HTTP on ``host:port`` (port 0 = any; ``port`` tells which):
    prometheus-client's server, its application answering a full GET from kept family
    texts (``metrics_exposition.py``; ``texts.formatted`` counts the families formatted)."""

    def __init__(self, collector: VfiodCollector, host: str, port: int) -> None:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(collector)
        self.texts = FamilyTexts(collector)
        self._server, self._thread = start_http_server(port, addr=host, registry=reg)
        # Until this line the library's own application answers: the same bytes, formatted
        # whole (a scraper cannot know a port 0 server's port yet).
        self._server.set_app(metrics_app(self.texts, make_wsgi_app(reg)))
        self.host = host
        self.port = int(self._server.server_address[1])

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
