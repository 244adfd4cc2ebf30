"""The per-guest tracker over type1 containers on the simulated kernel: unaligned merges,
page-size rescale, unmaps during tracking, status, stop (docs/architecture.md §3; docs/kernel-contract.md §3.8,
§3.9). Each test checks against the pages the simulated devices really wrote."""

from __future__ import annotations

import errno
import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from tests.support.dirty_rig import GUEST_PAGE, Rig, dev
from vfiod.dirty.tracker import DirtyTracker
from vfiod.kernel.sim.host import SimHostConfig
from vfiod.kernel.sim.type1 import Type1Config
from vfiod.vfio import DmaMapping, RamRegion

MDEV = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
MDEV2 = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
PCI = "0000:3b:00.1"
G = GUEST_PAGE


class Clock:
    def __init__(self) -> None:
        self.t = itertools.count(1)

    def __call__(self) -> float:
        return float(next(self.t))


def take_all(tr: DirtyTracker, rig: Rig) -> set[int]:
    return rig.sent(tr.take_dirty_runs(1 << 20))


@pytest.fixture
def mdev_rig(tmp_path: Path):  # noqa: ANN201
    rig = Rig(tmp_path, [[dev(MDEV, kind="mdev")], [dev(MDEV2, kind="mdev")]])
    yield rig
    rig.close()


def _two_container_guest(rig: Rig) -> DirtyTracker:
    """Two mdev containers; mappings start at guest pages 37, 100 and 300 (not multiples
    of 64) and have odd page counts; c1's two mappings are IOVA-adjacent but not
    guest-adjacent (two segments)."""
    rig.type1("c0", [10])
    rig.type1("c1", [11])
    rig.map("c0", 0x100000, 37 * G, 45 * G)
    rig.map("c1", 0x200000, 100 * G, 77 * G)
    rig.map("c1", 0x200000 + 77 * G, 300 * G, 3 * G)
    regions = [RamRegion("ram", 0, 512 * G)]
    return DirtyTracker(regions, [c.tracked() for c in rig.containers.values()],
                        clock=Clock())


def test_containers_share_one_scratch_bitmap(mdev_rig: Rig) -> None:
    # One GET_BITMAP buffer per guest, sized for its largest segment (c1's 77 pages: 2
    # words), not one per container (3 words): containers are queried one at a time.
    tr = _two_container_guest(mdev_rig)
    assert tr.scratch_bytes == 0
    tr.start()
    try:
        assert tr.scratch_bytes == 16
    finally:
        tr.stop()


def test_precise_pages_at_unaligned_offsets(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _two_container_guest(rig)
    tr.start()
    try:
        assert len(take_all(tr, rig)) == 512            # the first full pass
        rng = random.Random(5)
        for _ in range(6):
            for _ in range(20):
                dev, cname, m = rng.choice([(MDEV, "c0", 0), (MDEV2, "c1", 0), (MDEV2, "c1", 1)])
                mp = rig.containers[cname].maps[m]
                page = rng.randrange(mp.size // G)
                rig.write(dev, cname, mp.iova + page * G + rng.randrange(G), 1)
            expect = set(rig.written)
            res = tr.sync("precopy")
            assert res.dirty_pages == len(expect) == res.new_dirty_pages
            assert res.providers == {"c0": "type1", "c1": "type1"}
            assert take_all(tr, rig) == expect           # exactly the written pages
            assert not rig.written
    finally:
        tr.stop()


def test_write_spanning_two_mappings_and_word_edges(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _two_container_guest(rig)
    tr.start(initial_all_dirty=False)
    try:
        # pages 63..65 of the bitmap word grid inside c1's first mapping (gpa page 100+)
        rig.write(MDEV2, "c1", 0x200000 + 76 * G, 2 * G)   # last page of map 0, first of map 1
        rig.write(MDEV, "c0", 0x100000 + 26 * G, 3 * G)    # guest pages 63, 64, 65
        expect = set(rig.written)
        assert {63, 64, 65, 176, 300} == expect
        tr.sync()
        assert take_all(tr, rig) == expect
    finally:
        tr.stop()


def test_all_dirty_scope_with_a_physical_device(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [[dev(PCI)]])
    try:
        rig.type1("c0", [10])
        rig.map("c0", 0x100000, 37 * G, 45 * G)
        tr = DirtyTracker([RamRegion("ram", 0, 128 * G)], [rig.containers["c0"].tracked()],
                          clock=Clock())
        tr.start(initial_all_dirty=False)
        st = tr.status().containers[0]
        assert st.tracker == "type1" and st.precise is False
        assert "every mapped page dirty" in st.reason
        res = tr.sync()
        # the kernel reports the whole mapping; nothing outside it
        assert res.new_dirty_pages == 45
        assert take_all(tr, rig) == set(range(37, 82))
        tr.stop()
    finally:
        rig.close()


def test_guest_page_coarser_than_iommu_page(mdev_rig: Rig) -> None:
    """16 KiB guest pages over 4 KiB IOMMU pages: one 4 KiB write dirties its 16 KiB page."""
    rig = mdev_rig
    rig.type1("c0", [10])
    gp = 4 * G
    rig.map("c0", 0x100000, 37 * gp, 45 * gp)
    tr = DirtyTracker([RamRegion("ram", 0, 128 * gp)], [rig.containers["c0"].tracked()],
                      page_size=gp, clock=Clock())
    tr.start(initial_all_dirty=False)
    try:
        rig.host.device(MDEV).dma_write(0x100000 + 5 * gp + 3 * G, 8)   # 4th small page
        rig.host.device(MDEV).dma_write(0x100000 + 44 * gp, 1)          # last page
        res = tr.sync()
        assert res.new_dirty_pages == 2
        first, count = tr.take_dirty_runs(100)
        assert list(zip(first.tolist(), count.tolist(), strict=True)) == [(42, 1), (81, 1)]
    finally:
        tr.stop()


def test_unmap_during_tracking_loses_no_bit(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _two_container_guest(rig)
    tr.start(initial_all_dirty=False)
    try:
        rig.write(MDEV2, "c1", 0x200000 + 5 * G, 2 * G)        # pages 105, 106
        rig.write(MDEV2, "c1", 0x200000 + 77 * G + G, 1)       # page 301 (second mapping)
        expect = set(rig.written)
        log = len(rig.kernel.faults.log)
        merged = tr.unmap("c1", 0x200000, 77 * G)             # GET_DIRTY_BITMAP path
        assert merged == 2
        # one UNMAP_DMA and no GET_BITMAP: the bits came with the unmap itself
        calls = [e.split("@")[0] for e in rig.kernel.faults.log[log:]]
        assert calls == ["ioctl:VFIO_IOMMU_UNMAP_DMA"]
        assert [m.iova for m in rig.type1_of("c1").mappings] == [0x200000 + 77 * G]
        assert tr.status().containers[1].mappings == 1
        tr.sync()
        assert take_all(tr, rig) == expect
        # the unmapped IOVA is no longer queried: syncing again finds nothing there
        assert tr.sync().new_dirty_pages == 0
    finally:
        tr.stop()


def test_unmap_refuses_partial_or_empty_ranges(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _two_container_guest(rig)
    tr.start()
    try:
        with pytest.raises(ValueError, match="cuts through the mapping at 0x200000"):
            tr.unmap("c1", 0x200000, 10 * G)
        with pytest.raises(ValueError, match="holds no mapping"):
            tr.unmap("c1", 0x900000, G)
        with pytest.raises(KeyError, match="no container named 'nope'"):
            tr.unmap("nope", 0, G)
        assert len(rig.type1_of("c1").mappings) == 2   # nothing happened
    finally:
        tr.stop()


def test_unmap_before_start_is_a_plain_unmap(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _two_container_guest(rig)
    assert tr.unmap("c0", 0x100000, 45 * G) == 0
    assert rig.type1_of("c0").mappings == ()


def test_add_mapping_is_tracked(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _two_container_guest(rig)
    tr.start(initial_all_dirty=False)
    try:
        m = rig.map("c0", 0x400000, 200 * G, 10 * G)
        tr.add_mapping("c0", m)
        rig.write(MDEV, "c0", 0x400000 + 9 * G, 1)
        tr.sync()
        assert take_all(tr, rig) == {209}
        with pytest.raises(ValueError, match="overlap"):
            tr.add_mapping("c0", DmaMapping(0x400000, G, 400 * G))
    finally:
        tr.stop()


def test_dirty_rate_uses_the_injected_clock(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _two_container_guest(rig)
    tr.start(initial_all_dirty=False)          # clock = 1
    try:
        rig.write(MDEV, "c0", 0x100000, 3 * G)
        res = tr.sync()                        # clock 2 (t0), 3 (t1)
        assert res.duration_s == 1.0
        assert tr.dirty_rate() == 3 * G / 2.0  # 3 pages over [1, 3]
        assert tr.status().dirty_rate_bytes_per_s == 3 * G / 2.0
    finally:
        tr.stop()


def test_stop_is_idempotent_and_stops_every_container_despite_errors(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _two_container_guest(rig)
    tr.start()
    rig.kernel.faults.inject("ioctl:VFIO_IOMMU_DIRTY_PAGES", 5, count=1)   # EIO on c0's STOP
    with pytest.raises(OSError, match="VFIO_IOMMU_DIRTY_PAGES\\(STOP\\).*EIO"):
        tr.stop()
    # c1 was still stopped: a GET now is refused by the kernel (tracking not started)
    c1 = rig.type1_of("c1")
    with pytest.raises(OSError, match="EINVAL"):
        c1.dirty_get(0x200000, 77 * G, G)
    tr.stop()                                  # idempotent, no error now
    assert all(not c.running for c in tr.status().containers)
    with pytest.raises(RuntimeError, match="before start"):
        tr.sync()


def test_bad_layouts_are_refused(mdev_rig: Rig) -> None:
    rig = mdev_rig
    rig.type1("c0", [10])
    c = rig.containers["c0"]
    good = [RamRegion("ram", 0, 64 * G)]
    cases = [
        ([RamRegion("ram", 0, 64 * G), RamRegion("ram", 32 * G, 64 * G)], [], "overlap"),
        ([RamRegion("ram", 100, 64 * G)], [], "multiple of the 0x1000-byte guest page"),
        ([RamRegion("ram", 0, 0)], [], "empty"),
        (good, [DmaMapping(0, 8 * G, 60 * G)], "not inside one RAM region"),
        (good, [DmaMapping(0, 8 * G, 0), DmaMapping(4 * G, 8 * G, 16 * G)], "overlap"),
        (good, [DmaMapping(0, 0, 0)], "empty"),
        (good, [DmaMapping(G + 1, G, 0)], "iova 0x1001"),
    ]
    for regions, maps, msg in cases:
        c.maps = maps
        with pytest.raises(ValueError, match=msg):
            DirtyTracker(regions, [c.tracked()])
    with pytest.raises(ValueError, match="power of two >= 4096"):
        DirtyTracker(good, [], page_size=3 * G)
    c.maps = []
    with pytest.raises(ValueError, match="unique"):
        DirtyTracker(good, [c.tracked(), c.tracked()])


def test_take_dirty_runs_splits_and_clears(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _two_container_guest(rig)
    tr.start()
    try:
        first, count = tr.take_dirty_runs(100)
        assert count.max() == 100 and int(count.sum()) == 512
        assert np.array_equal(first[:3], [0, 100, 200])
        assert tr.status().dirty_pages == 0
        assert tr.take_dirty_runs(100)[0].size == 0
    finally:
        tr.stop()


def test_unmap_failing_before_the_unmap_changes_nothing(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _two_container_guest(rig)
    tr.start(initial_all_dirty=False)
    try:
        rig.write(MDEV, "c0", 0x100000 + 4 * G, 1)                 # page 41
        rig.kernel.faults.inject("ioctl:VFIO_IOMMU_UNMAP_DMA", 5)  # EIO
        with pytest.raises(OSError, match="GET_DIRTY_BITMAP.*EIO") as ei:
            tr.unmap("c0", 0x100000, 45 * G)
        assert ei.value.errno == 5
        assert len(rig.type1_of("c0").mappings) == 1
        assert tr.status().containers[0].mappings == 1
        tr.sync()                                                  # the bit is still there
        assert take_all(tr, rig) == {41}
    finally:
        tr.stop()


def test_unmap_enotty_falls_back_and_still_unmaps(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _two_container_guest(rig)
    tr.start(initial_all_dirty=False)
    try:
        rig.kernel.faults.inject("ioctl:VFIO_IOMMU_UNMAP_DMA", errno.ENOTTY)
        assert tr.unmap("c0", 0x100000, 45 * G) == 45              # "none": all of it
        st = tr.status().containers[0]
        assert st.tracker == "none" and "type1 -> none" in st.fallbacks[0]
        assert rig.type1_of("c0").mappings == ()
        assert take_all(tr, rig) == set(range(37, 82))
    finally:
        tr.stop()


def test_iommu_page_coarser_than_guest_page(tmp_path: Path) -> None:
    """A host IOMMU whose smallest page is 64 KiB: type1 bitmaps are per 64 KiB and are
    spread over 16 guest pages each, at a first guest page (80) not a multiple of 64."""
    cfg = SimHostConfig(type1=Type1Config(iommu_pgsizes=0x10000 | 0x200000))
    rig = Rig(tmp_path, [[dev(PCI)]], config=cfg)
    try:
        rig.type1("c0", [10])
        rig.map("c0", 0x100000, 80 * G, 6 * 16 * G)
        tr = DirtyTracker([RamRegion("ram", 0, 256 * G)], [rig.containers["c0"].tracked()],
                          clock=Clock())
        tr.start(initial_all_dirty=False)
        assert tr.status().containers[0].page_size == 0x10000
        res = tr.sync()
        assert res.new_dirty_pages == 96
        assert take_all(tr, rig) == set(range(80, 176))
        assert tr.unmap("c0", 0x100000, 96 * G) == 96
        assert take_all(tr, rig) == set(range(80, 176))
        tr.stop()
    finally:
        rig.close()


def test_status_of_an_mdev_only_container(mdev_rig: Rig) -> None:
    tr = _two_container_guest(mdev_rig)
    assert tr.status().containers[0].tracker is None     # not started yet
    tr.start()
    try:
        st = tr.status()
        assert st.running and st.guest_pages == 512 and st.dirty_pages == 512
        c0 = st.containers[0]
        assert (c0.tracker, c0.precise, c0.page_size) == ("type1", True, G)
        assert "pinned-page scope" in c0.reason
        assert c0.mapped_bytes == 45 * G and c0.opt_out_active is False
        assert any("device-logging: not supported" in n for n in c0.notes)
    finally:
        tr.stop()
