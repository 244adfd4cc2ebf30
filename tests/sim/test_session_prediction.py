"""The downtime prediction of a small guest that dirties nothing is made of what this
migration measured, and the result shows it part by part (docs/architecture.md §4):
no part is a guess (a default link speed) or a one-off cost."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.session_rig import (
    MiB,
    SideContainer,
    add_workload,
    assert_migrated,
    migrate,
    pair,
    spec,
)
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.migration.planning.breakdown import COMPONENTS
from vfiod.migration.planning.predictor import DEFAULT_BANDWIDTH_BPS, FixedCosts, Policy
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.session.history import HostHistories, SwitchoverHistory
from vfiod.migration.session.link import ThrottledLink
from vfiod.vfio import RamRegion


def test_a_tiny_guest_that_dirties_nothing_is_predicted_from_its_own_measurements(
        tmp_path: Path) -> None:
    dev = spec("v2_precopy_log")
    src, dst = pair(tmp_path, [SideContainer([dev])], ram=(RamRegion("ram", 0, 64 * MiB),),
                    fill_bytes=8 * MiB)
    try:
        history = SwitchoverHistory()
        run = migrate(src, dst, history=history)
        assert_migrated(src, dst, run)
        assert history.migrations == 1          # the next migration learns from this one
        r = run.source
        last = r.history[-1]
        # 8 MiB were sent: a measurement, not the 1 Gb/s default for an unknown link
        assert last.bandwidth_bps != DEFAULT_BANDWIDTH_BPS
        assert "measured" in last.bandwidth_source
        b = r.downtime_breakdown
        assert set(b) == set(COMPONENTS)
        assert r.predicted_downtime_s is not None and r.actual_downtime_s is not None
        assert sum(p["predicted_s"] for p in b.values()) == pytest.approx(
            r.predicted_downtime_s)
        assert sum(p["actual_s"] for p in b.values()) == pytest.approx(r.actual_downtime_s)
        # nothing was dirtied: nothing left for the final pass, predicted or sent; with no
        # switchover learnt yet, the stream's end and the verify are the rehearsal's
        assert last.dirty_ram_bytes == 0
        t = r.timings
        assert t["rehearsed_stream_end_s"] > 0 and t["rehearsed_verify_s"] > 0
        assert b["ram_transfer"]["predicted_s"] == pytest.approx(t["rehearsed_stream_end_s"])
        assert b["verify"]["predicted_s"] >= t["rehearsed_verify_s"]
        # within a generous factor of the parts this migration measured (a behaviour
        # check: a default link speed or a one-off cost would be off by far more)
        measured = sum(p["actual_s"] for p in b.values())
        assert r.predicted_downtime_s < 20 * measured + 0.05
    finally:
        src.close()
        dst.close()


def test_a_guests_first_migration_uses_the_lessons_of_a_guest_with_its_devices(
        tmp_path: Path) -> None:
    """On a fleet host most guests migrate away once: the first migration of a guest
    predicts with what another guest's switchover with the same devices taught
    (docs/architecture.md §4 "Earlier switchovers")."""
    dev = spec("v2_precopy_log")
    src, dst = pair(tmp_path, [SideContainer([dev])])
    try:
        hosts = HostHistories()
        devices = src.guest.device_infos()
        measured = FixedCosts(commit_round_trips_s=0.001)
        lent = {c: 0.0 for c in COMPONENTS}
        # the other guest's commit waited 50 ms longer than its round trips said
        hosts.of("other-guest", devices).record(
            measured, {**lent, "commit_round_trips": 0.001},
            {**lent, "commit_round_trips": 0.051}, 0)
        cfg = SessionConfig(policy=Policy(downtime_limit_s=1.0))
        run = migrate(src, dst, cfg, history=hosts.of(src.guest.name, devices))
        assert_migrated(src, dst, run)
        r = run.source
        assert r.downtime_breakdown["commit_round_trips"]["predicted_s"] >= 0.05
        assert r.timings["history_borrowed"] == 1.0
        assert r.timings["history_switchovers"] == 1.0
    finally:
        src.close()
        dst.close()


class QueuedLink:
    """The source's connection, reporting ``extra`` more bytes in its send queue."""

    def __init__(self, conn: Any, extra: int) -> None:
        self.conn, self.extra = conn, extra

    def unsent_bytes(self) -> int:
        return int(self.conn.unsent_bytes()) + self.extra

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_bytes_queued_in_the_socket_reach_the_prediction(tmp_path: Path) -> None:
    extra = 64 * MiB
    src, dst = pair(tmp_path, [SideContainer([spec("v2_precopy_log")])],
                    ram=(RamRegion("ram", 0, 16 * MiB),), fill_bytes=4 * MiB)
    try:
        # the 64 MiB never leave the queue: a limit they fit in at any bandwidth this
        # machine measures under load (the queue's accounting is checked, not convergence)
        run = migrate(src, dst, SessionConfig(policy=Policy(downtime_limit_s=30.0)),
                      history=SwitchoverHistory(), wrap_source=lambda c: QueuedLink(c, extra))
        assert_migrated(src, dst, run)
        r = run.source
        last = r.history[-1]
        queued = r.timings["predicted_queued_bytes"]
        assert queued >= extra
        # no earlier switchover corrects it: the commit's waits are two round trips (the
        # least of the header's and the passes' samples) plus the queued bytes at the
        # bandwidth this migration measured
        b = r.downtime_breakdown
        rtt = r.timings.get("rtt_s", 0.0)      # absent: no sample of the path at all
        assert rtt <= r.timings["header_ack_rtt_s"] or r.timings["header_ack_rtt_s"] == 0
        assert b["commit_round_trips"]["predicted_s"] == pytest.approx(
            2 * rtt + queued / last.bandwidth_bps)
        assert r.predicted_downtime_s is not None
        assert r.predicted_downtime_s >= extra / last.bandwidth_bps
    finally:
        src.close()
        dst.close()


def test_an_opted_out_container_counts_what_a_sample_of_its_pages_shows_written(
        tmp_path: Path) -> None:
    """An opted-out container is not queried before stop-and-copy. Its whole mapping
    counted dirty (16 MiB at 40 MB/s: over the 300 ms limit) until a migration had learnt
    its rate, so the first migration of the guest could only be forced by its timeout
    (or cancelled, the default). Now the source reads a sample of the mapping's pages
    again against their CRCs at the tracking's start (``optout_sample``): the first
    migration counts about what its device wrote and switches over within the limit;
    the next one counts at least the rate the first one's stop-and-copy query found."""
    dev = spec("v2_precopy_log")
    opted = spec("v2_stop_copy_log", name="0000:3e:00.3", seed=7)
    window = 16 * MiB
    plans = [SideContainer([dev]),
             SideContainer([opted], maps=[(48 * MiB, window)], opt_out=[opted.name])]
    cfg = SessionConfig(policy=Policy(downtime_limit_s=0.3, timeout_s=1.5,
                                      on_timeout="force"))
    history = SwitchoverHistory()
    runs = []
    for i in range(2):
        src, dst = pair(tmp_path / f"run{i}", plans, ram=(RamRegion("ram", 0, 64 * MiB),),
                        fill_bytes=4 * MiB, seed=2 + i)
        try:
            wl = add_workload(src, [DmaTarget(opted.name, 48 * MiB, window)],
                              dirty_rate_bps=2e6, hot_fraction=0.5, seed=3)
            wl.start()
            wl.wait_for_writes(1)
            run = migrate(src, dst, cfg, rate_bps=40e6, history=history)
            assert_migrated(src, dst, run)
            runs.append(run.source)
        finally:
            src.close()
            dst.close()
    for r in runs:
        last = r.history[-1]
        assert last.decision == "switchover", (last.decision, last.reason)
        # counted: a part of the window, and not much less than the final pass then
        # carried (the device's writes; nothing else dirties this guest)
        assert 0 < last.assumed_dirty_bytes < window
        assert last.assumed_dirty_bytes >= 0.5 * r.verification["final_ram_bytes"], (
            last.assumed_dirty_bytes, r.verification["final_ram_bytes"])


def test_a_paced_links_bucket_is_credited_once_not_measured_as_bandwidth(
        tmp_path: Path) -> None:
    """vfiod's own cap (``ThrottledLink``) passes a full bucket at once after an idle
    moment. The bandwidth estimate measures the paced rate alone (each slice's free bytes
    left out), and the prediction credits the bucket once, at the stop-and-copy
    (``ready_bytes``): measured with the bucket, every pass's first bytes looked free and
    the rate came out above the cap, and the bucket was then counted twice."""
    cap, bucket = 40e6, 4 * MiB
    src, dst = pair(tmp_path, [SideContainer([spec("v2_precopy_log")])],
                    ram=(RamRegion("ram", 0, 32 * MiB),), fill_bytes=16 * MiB)
    try:
        run = migrate(src, dst, SessionConfig(policy=Policy(downtime_limit_s=30.0)),
                      history=SwitchoverHistory(),
                      wrap_source=lambda c: ThrottledLink(c, cap, burst_bytes=bucket))
        assert_migrated(src, dst, run)
        last = run.source.history[-1]
        # pacing only slows a send: the paced rate is at most the cap (16 MiB with a 4 MiB
        # bucket counted as bandwidth: 1.3 times the cap)
        assert last.bandwidth_bps <= 1.05 * cap
    finally:
        src.close()
        dst.close()


class SlowDiskJournal:
    """A switchover journal on a disk whose every record takes ``per_record_s`` to be
    durable (a busy or rotating disk): the daemon's steps, one record each
    (daemon/switchover_records.py: the commit 1, prepared 3, resume 2)."""

    RECORDS = {"committing": 1, "prepared": 3, "resuming": 2, "discarding": 1}

    def __init__(self, per_record_s: float) -> None:
        self.per_record_s = per_record_s

    def _write(self, step: str) -> None:
        time.sleep(self.per_record_s * self.RECORDS[step])    # the disk, not a wait

    def committing(self, mid: str) -> None:
        self._write("committing")

    def prepared(self, mid: str) -> None:
        self._write("prepared")

    def resuming(self, mid: str) -> None:
        self._write("resuming")

    def discarding(self, mid: str) -> None:
        self._write("discarding")

    def switchover_write_s(self) -> float:
        return 6 * self.per_record_s


def test_a_first_prediction_counts_the_switchovers_journal_records(tmp_path: Path) -> None:
    # Both ends journal their switchover steps inside the downtime, one fsync per record.
    # A first migration has learnt nothing, so the prediction must price them from what
    # this host's journal takes; it left them out, and a slow disk's downtime came as a
    # surprise the size of six fsyncs.
    per = 0.02
    src, dst = pair(tmp_path, [SideContainer([spec("v2_precopy_log")])])
    try:
        run = migrate(src, dst, journals=(SlowDiskJournal(per), SlowDiskJournal(per)))
        assert_migrated(src, dst, run)
        r = run.source
        part = r.downtime_breakdown["journal"]
        assert part["predicted_s"] == pytest.approx(6 * per)
        assert part["actual_s"] >= 6 * per            # measured at each step, both ends
        assert r.timings["predicted_journal_s"] == pytest.approx(6 * per)
        assert r.predicted_downtime_s is not None and r.predicted_downtime_s > 6 * per
        assert r.actual_downtime_s is not None and r.actual_downtime_s > 6 * per
    finally:
        src.close()
        dst.close()
