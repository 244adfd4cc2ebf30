"""The downtime prediction of a small guest that dirties nothing is made of what this
migration measured, and the result shows it part by part (docs/architecture.md §4):
no part is a guess (a default link speed) or a one-off cost."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.session_rig import MiB, SideContainer, assert_migrated, migrate, pair, spec
from vfiod.migration.planning.breakdown import COMPONENTS
from vfiod.migration.planning.predictor import DEFAULT_BANDWIDTH_BPS
from vfiod.migration.session.history import SwitchoverHistory
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
        # nothing was dirtied: nothing left for the final pass, predicted or sent
        assert last.dirty_ram_bytes == 0
        assert b["ram_transfer"]["predicted_s"] == 0.0
        # within a generous factor of the parts this migration measured (a behaviour
        # check: a default link speed or a one-off cost would be off by far more)
        measured = sum(p["actual_s"] for p in b.values())
        assert r.predicted_downtime_s < 20 * measured + 0.05
    finally:
        src.close()
        dst.close()
