"""Who hashes what in a migration (docs/protocol.md §7.3), on the simulated backend: the
destination reads no page a second time (every landed page's CRC, from the reader or a RAM
channel thread, is its digest), the source reads again only what it sent live (its
stop-and-copy records' CRCs are the digests), and the digests still catch a write that
dirty tracking never reported (the source reads live pages again after their pass)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.session_rig import (
    PAGE,
    MiB,
    Side,
    SideContainer,
    add_workload,
    assert_migrated,
    migrate,
    pair,
    spec,
    with_channels,
)
from vfiod.dirty.tracker import DirtyTracker
from vfiod.kernel.sim.workload import DmaTarget
from vfiod.migration.planning.predictor import Policy
from vfiod.migration.session.common import SessionConfig
from vfiod.migration.stream.writer import StreamWriter
from vfiod.migration.transport import Listener
from vfiod.vfio import RamRegion

DEV = spec("v2_precopy_log")


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[Any]:
    made: list[Side] = []

    def make(ram_mib: int = 32, **kw: Any) -> tuple[Side, Side]:
        s, d = pair(tmp_path, [SideContainer([DEV])],
                    ram=(RamRegion("ram", 0, ram_mib * MiB),), **kw)
        made.extend((s, d))
        return s, d
    yield make
    for side in made:
        side.close()


@pytest.mark.parametrize("channels", [1, 3])
def test_one_hash_per_page_per_end_over_passes_that_redirty_pages(sides, channels: int,
                                                                  monkeypatch) -> None:
    src, dst = sides(fill_bytes=16 * MiB)
    wl = add_workload(src, [DmaTarget(DEV.name, 0, 8 * MiB)], dirty_rate_bps=40e6,
                      hot_fraction=1.0, seed=11)
    wl.start()
    wl.wait_for_writes(2)
    sync = DirtyTracker.sync

    def sync_then_a_write(self: DirtyTracker, phase: str = "precopy") -> Any:
        # the workload writes after every pre-copy sync, so the final pass has pages
        # however the threads are scheduled
        out = sync(self, phase)
        if phase == "precopy":
            wl.wait_for_writes(wl.writes + 1)
        return out

    monkeypatch.setattr(DirtyTracker, "sync", sync_then_a_write)
    cfg = SessionConfig(channels=channels, slice_bytes=2 * MiB, record_bytes=256 * 1024,
                        batch_bytes=512 * 1024,
                        policy=Policy(downtime_limit_s=1e-6, max_iterations=3,
                                      on_timeout="force"))
    with Listener("127.0.0.1", 0) as lst:
        run = migrate(src, dst, cfg, **(with_channels(lst) if channels > 1 else {}))
    assert_migrated(src, dst, run)             # the digests compared equal, and memory too
    assert run.source.iterations >= 2
    s, d = run.source.verification, run.dest.verification if run.dest else {}
    final_pages = s["final_ram_bytes"] // PAGE
    assert final_pages > 0
    # the destination read nothing again: every page it received came with its CRC
    assert d["hashed_bytes"] == 0 and d["final_rehash_pages"] == 0
    assert d["stream_crc_pages"] * PAGE == d["manifest"]["ram_bytes"]
    # the source took its stop-and-copy pages' CRCs and read only live pages again
    assert s["source_stream_crc_pages"] == final_pages
    assert s["source_final_rehash_pages"] == 0
    assert 0 < s["source_hashed_bytes"] <= run.source.ram_bytes_sent - s["final_ram_bytes"]


def test_a_write_dirty_tracking_never_reported_fails_the_digest_comparison(
        sides, monkeypatch) -> None:
    """The guest writes a page after its live send and dirty tracking misses it (the
    test writes the memory directly, no device DMA): the source reads the page again after
    the pass, the destination holds the old copy, and the comparison fails the migration."""
    src, dst = sides(fill_bytes=4 * MiB)
    words = np.frombuffer(src.guest.ram[0].view(), dtype=np.uint64)
    sent = int(np.flatnonzero(words)[0]) * 8 // PAGE * PAGE    # a page pass 1 sends
    mark = StreamWriter.mark_iteration

    def write_then_mark(self: StreamWriter, number: int) -> None:
        if number == 1:
            words[sent // 8] ^= np.uint64(0xFF)
        mark(self, number)

    monkeypatch.setattr(StreamWriter, "mark_iteration", write_then_mark)
    try:
        run = migrate(src, dst, SessionConfig(policy=Policy(max_iterations=2,
                                                            on_timeout="force",
                                                            downtime_limit_s=1e-9)))
    finally:
        monkeypatch.undo()
    assert run.source.result != "completed"
    assert run.dest is not None and run.dest.verification["content_verified"] is False
    assert "RAM content differs from the source" in run.dest.reason


def test_the_commits_digest_folds_only_what_the_final_pass_changed(sides) -> None:
    """Both ends fold each pre-copy pass's changes into the region digest as the pass
    ends (the source after its re-hash, the destination at the pass mark), so the digest
    at the commit, inside the downtime, folds the final pass's groups of 4,096 pages and
    not every group pre-copy filled (``digest_root.py``: a 16 GiB guest's whole table is
    about 0.7 ms per end)."""
    src, dst = sides(ram_mib=256, fill_bytes=96 * MiB)
    wl = add_workload(src, [DmaTarget(DEV.name, 0, 4 * MiB)], dirty_rate_bps=20e6,
                      hot_fraction=1.0, seed=5)
    wl.start()
    wl.wait_for_writes(2)
    run = migrate(src, dst, SessionConfig(policy=Policy(downtime_limit_s=1e-6,
                                                        max_iterations=2,
                                                        on_timeout="force")))
    assert_migrated(src, dst, run)
    s, d = run.source.verification, run.dest.verification if run.dest else {}
    assert s["final_ram_bytes"] > 0
    filled_groups = 96 * MiB // PAGE // 4096            # what pass 1 changed: 24
    # the workload's 4 MiB window is 1,024 pages: one group, two if split
    assert 1 <= s["source_final_digest_groups"] <= 2 < filled_groups
    assert 1 <= d["final_digest_groups"] <= 2
