"""The final dirty sync reports only what was written after the last pass's sync, so it
is priced on the line through the syncs the migration timed: the setup's, which reports
almost nothing, and each pass's (``planning/sync_cost.py``; docs/architecture.md §4).
Before, the median of the pass syncs priced it as a whole pass's report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.support.session_rig import (
    MiB,
    Side,
    SideContainer,
    assert_migrated,
    migrate,
    pair,
    spec,
)
from vfiod.dirty.tracker import DirtyTracker
from vfiod.migration.session.history import SwitchoverHistory
from vfiod.migration.session.source import SourceSession
from vfiod.vfio import RamRegion

#: the syncs' clock in this test: 1 ms a query and 10 µs a reported page (the
#: simulator's own time is noise at this size)
BASE_S, PER_PAGE_S = 1e-3, 10e-6
WRITTEN = 512


def _priced_syncs_and_writes(src: Side, phases: list[tuple[str, int]]) -> Any:
    """``on_source``: every sync of the source's tracker takes ``BASE_S`` plus
    ``PER_PAGE_S`` per page it reported and is logged as (phase, pages); the device
    writes ``WRITTEN`` pages during pass 1, so that pass's sync reports them."""
    def on_source(s: SourceSession) -> None:
        make = s.guest.make_tracker

        def make_tracker(*args: Any, **kwargs: Any) -> DirtyTracker:
            tracker = make(*args, **kwargs)
            real = tracker.sync

            def sync(phase: str = "precopy", **kw: Any) -> Any:
                got = real(phase, **kw)
                phases.append((phase, got.new_dirty_pages))
                return replace(got, duration_s=BASE_S + PER_PAGE_S * got.new_dirty_pages)
            tracker.sync = sync               # type: ignore[method-assign]
            return tracker
        s.guest.make_tracker = make_tracker   # type: ignore[method-assign]

        dev = s.guest.devices[0]
        iterate = dev.driver.save_live_iterate
        done: list[bool] = []

        def write_then_iterate(*args: Any) -> Any:
            if not done:
                done.append(True)
                for page in range(WRITTEN):   # every other page: WRITTEN runs
                    src.host.device(dev.name).dma_write(page * 2 * 4096, 8, b"\x5a" * 8)
            return iterate(*args)
        dev.driver.save_live_iterate = write_then_iterate   # type: ignore[method-assign]
    return on_source


def test_the_final_sync_is_priced_as_a_sync_that_reports_little(tmp_path: Path) -> None:
    dev = spec("v2_precopy_log")
    src, dst = pair(tmp_path, [SideContainer([dev])], ram=(RamRegion("ram", 0, 64 * MiB),),
                    fill_bytes=4 * MiB)
    phases: list[tuple[str, int]] = []
    try:
        run = migrate(src, dst, on_source=_priced_syncs_and_writes(src, phases),
                      history=SwitchoverHistory())
        assert_migrated(src, dst, run)
    finally:
        src.close()
        dst.close()
    passes = [n for p, n in phases if p == "precopy"]
    assert passes and passes[0] >= WRITTEN
    # the line through the setup's (0 pages, 1 ms) and the pass's: the final sync of the
    # few pages written between the last sync and the pause, not the pass's 6 ms or more
    predicted = run.source.downtime_breakdown["final_sync"]["predicted_s"]
    assert predicted == pytest.approx(BASE_S, abs=0.3e-3)
    # the setup timed its second sync (the first pays one-off costs); neither reported
    # a page, and neither was a pass
    assert phases[:2] == [("setup", 0), ("setup", 0)]
