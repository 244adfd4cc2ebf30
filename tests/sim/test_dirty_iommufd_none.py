"""iommufd HWPT dirty tracking and the "none" provider through the tracker, on the
simulated kernel (docs/kernel-contract.md §4.4; docs/architecture.md §1 step 4, §3)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.support.dirty_rig import GUEST_PAGE, Rig, dev
from vfiod.dirty.providers.base import ProviderName
from vfiod.dirty.providers.iommufd import IommufdProvider
from vfiod.dirty.providers.none import REASON
from vfiod.dirty.providers.select import preferred, select
from vfiod.dirty.tracker import DirtyTracker
from vfiod.kernel.sim.host import SimHostConfig
from vfiod.vfio import RamRegion

PCI = "0000:3b:00.1"
G = GUEST_PAGE


def clock():  # noqa: ANN201
    c = itertools.count(1)
    return lambda: float(next(c))


@pytest.fixture
def rig(tmp_path: Path):  # noqa: ANN201
    r = Rig(tmp_path, [[dev(PCI)]], config=SimHostConfig(iommu_dirty_tracking=True))
    yield r
    r.close()


def test_iommufd_precise_pages_and_selection(rig: Rig) -> None:
    rig.iommufd("ioas", [PCI])
    rig.map("ioas", 0x100000, 37 * G, 45 * G)
    sel = select(rig.containers["ioas"].space)
    assert [p.name for p in sel.chain] == ["iommufd", "none"]
    assert preferred(rig.containers["ioas"].space) == ProviderName.IOMMUFD == "iommufd"
    assert any("type1: not a type1 container" in n for n in sel.notes)
    tr = DirtyTracker([RamRegion("ram", 0, 128 * G)], [rig.containers["ioas"].tracked()],
                      clock=clock())
    tr.start(initial_all_dirty=False)
    try:
        rig.write(PCI, "ioas", 0x100000 + 27 * G, 1)         # guest page 64
        rig.write(PCI, "ioas", 0x100000 + 26 * G + 100, 1)   # guest page 63
        res = tr.sync()
        assert res.providers == {"ioas": "iommufd"} and res.new_dirty_pages == 2
        assert rig.sent(tr.take_dirty_runs(64)) == {63, 64}
        assert tr.status().containers[0].precise is True
    finally:
        tr.stop()


def test_iommufd_unmap_reads_with_no_clear_then_unmaps(rig: Rig) -> None:
    rig.iommufd("ioas", [PCI])
    rig.map("ioas", 0x100000, 37 * G, 45 * G)
    rig.map("ioas", 0x200000, 90 * G, 5 * G)
    tr = DirtyTracker([RamRegion("ram", 0, 128 * G)], [rig.containers["ioas"].tracked()],
                      clock=clock())
    tr.start(initial_all_dirty=False)
    try:
        rig.write(PCI, "ioas", 0x200000 + 4 * G, 1)           # guest page 94
        log = len(rig.kernel.faults.log)
        assert tr.unmap("ioas", 0x200000, 5 * G) == 1
        calls = [e.split("@")[0] for e in rig.kernel.faults.log[log:]]
        assert calls == ["ioctl:IOMMU_HWPT_GET_DIRTY_BITMAP", "ioctl:IOMMU_IOAS_UNMAP"]
        assert [(m.iova, m.size) for m in rig.ioas_of("ioas").mappings] == [(0x100000, 45 * G)]
        assert rig.sent(tr.take_dirty_runs(64)) == {94}
    finally:
        tr.stop()


def test_iommufd_no_clear_leaves_bits_for_the_next_read(rig: Rig) -> None:
    rc = rig.iommufd("ioas", [PCI])
    rig.map("ioas", 0x100000, 0, 8 * G)
    p = IommufdProvider(rc.space)
    assert p.start([(0x100000, 8 * G)], G) == G
    rig.host.device(PCI).dma_write(0x100000 + 3 * G, 1)
    assert int(p._get(0x100000, 8 * G, None, no_clear=True)[0]) == 0b1000
    assert int(p.report(0x100000, 8 * G)[0]) == 0b1000        # still there, now cleared
    assert int(p.report(0x100000, 8 * G)[0]) == 0
    p.stop()
    p.stop()                                                 # idempotent


def test_hwpt_without_dirty_tracking_means_none(rig: Rig) -> None:
    rig.iommufd("ioas", [PCI], dirty=False)
    rig.map("ioas", 0x100000, 37 * G, 45 * G)
    tr = DirtyTracker([RamRegion("ram", 0, 128 * G)], [rig.containers["ioas"].tracked()],
                      clock=clock())
    tr.start(initial_all_dirty=False)
    try:
        st = tr.status().containers[0]
        assert st.tracker == "none" and st.precise is False
        assert st.reason == REASON == ("no dirty tracking: every mapped page counts as "
                                          "dirty at every sync")
        assert any("IOMMU_HWPT_ALLOC_DIRTY_TRACKING" in n for n in st.notes)
        for _ in range(2):                     # every sync: the whole mapping, nothing else
            res = tr.sync()
            assert res.new_dirty_pages == 45 and res.providers == {"ioas": "none"}
            assert rig.sent(tr.take_dirty_runs(1000)) == set(range(37, 82))
        # unmap under "none": the mapping's pages count dirty one last time
        assert tr.unmap("ioas", 0x100000, 45 * G) == 45
        assert rig.sent(tr.take_dirty_runs(1000)) == set(range(37, 82))
        assert tr.sync().new_dirty_pages == 0
    finally:
        tr.stop()


def test_type1_disabled_by_configuration_gives_none(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [[dev(PCI)]])
    try:
        rig.type1("c0", [10])
        rig.map("c0", 0, 0, 4 * G)
        sel = select(rig.containers["c0"].space, disable={"device-logging", "type1"})
        assert [p.name for p in sel.chain] == ["none"]
        assert "type1: disabled by configuration" in sel.notes
        assert preferred(rig.containers["c0"].space, {"device-logging", "type1"}) == "none"
        assert preferred(rig.containers["c0"].space, {"device-logging"}) == "type1"
        with pytest.raises(ValueError, match="unknown provider name"):
            select(rig.containers["c0"].space, disable={"kvm"})
    finally:
        rig.close()
