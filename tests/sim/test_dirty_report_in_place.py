"""Type1 reports written straight into the guest's bitmap (``GlobalBitmap.merge_report``,
``vfiod/dirty/report_in_place.py``; docs/kernel-contract.md §3.9) on the simulated kernel,
whose GET_BITMAP overwrites the caller's words as the kernel's does: syncs give exactly the
pages the devices wrote, also when two containers map the same RAM or the bitmap holds
bits the sender has not taken, and the scratch buffer is only written when the bitmap's
words hold too much to save."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.sim.test_dirty_tracker_type1 import MDEV, MDEV2, PCI, Clock, take_all
from tests.support.dirty_rig import GUEST_PAGE, Rig, dev
from vfiod.dirty.tracker import DirtyTracker
from vfiod.vfio import RamRegion

G = GUEST_PAGE


def scratch_used(tr: DirtyTracker) -> bool:
    return bool(tr._scratch.words.any())


@pytest.fixture
def shared_ram(tmp_path: Path):  # noqa: ANN201
    """Two mdev containers that both map guest pages [64, 64 + 8192) (32 MiB), at
    different IOVAs: reports over the same RAM must be OR-merged."""
    rig = Rig(tmp_path, [[dev(MDEV, kind="mdev")], [dev(MDEV2, kind="mdev")]])
    rig.type1("c0", [10])
    rig.type1("c1", [11])
    rig.map("c0", 0x100000, 64 * G, 8192 * G)
    rig.map("c1", 0x4000_0000, 64 * G, 8192 * G)
    tr = DirtyTracker([RamRegion("ram", 0, 8320 * G)],
                      [c.tracked() for c in rig.containers.values()], clock=Clock())
    yield rig, tr
    tr.stop()
    rig.close()


def write_pages(rig: Rig, rng: random.Random, n: int) -> None:
    for _ in range(n):
        d, c, iova = rng.choice([(MDEV, "c0", 0x100000), (MDEV2, "c1", 0x4000_0000)])
        rig.write(d, c, iova + rng.randrange(8192) * G, 1)


def test_two_containers_over_the_same_ram_lose_nothing(shared_ram) -> None:  # noqa: ANN001
    rig, tr = shared_ram
    tr.start(initial_all_dirty=False)
    rng = random.Random(1)
    for rnd in range(5):
        write_pages(rig, rng, 40)
        if rnd % 2:
            # pages the sender has not taken yet stay in the bitmap across the sync
            tr.sync()
            write_pages(rig, rng, 10)
        expect = set(rig.written)
        tr.sync()
        assert take_all(tr, rig) == expect
    assert not scratch_used(tr)


def test_everything_dirty_stays_dirty(tmp_path: Path) -> None:
    # a physical device: every GET reports the whole mapping; the bitmap starts all dirty
    rig = Rig(tmp_path, [[dev(PCI)]])
    try:
        rig.type1("c0", [10])
        rig.map("c0", 0x100000, 128 * G, 8192 * G)
        tr = DirtyTracker([RamRegion("ram", 0, 8448 * G)], [rig.containers["c0"].tracked()],
                          clock=Clock())
        tr.start(initial_all_dirty=True)
        res = tr.sync()
        assert res.new_dirty_pages == 8192 and res.dirty_pages == 8448
        assert take_all(tr, rig) == set(range(8448))
        assert not scratch_used(tr)
        tr.stop()
    finally:
        rig.close()


def test_a_bitmap_too_full_to_save_goes_through_the_scratch_buffer(shared_ram) -> None:  # noqa: ANN001
    rig, tr = shared_ram
    tr.start(initial_all_dirty=False)
    # one page in each of 100 of the 128 words: more than the save may hold (64 words)
    for w in range(100):
        rig.write(MDEV, "c0", 0x100000 + (w * 64 + 5) * G, 1)
    tr.sync()                       # clean words: in place
    assert not scratch_used(tr)
    rng = random.Random(2)
    write_pages(rig, rng, 30)
    expect = set(rig.written)
    tr.sync()                       # the 100 words are not taken: the scratch buffer
    assert scratch_used(tr)
    assert take_all(tr, rig) == expect
