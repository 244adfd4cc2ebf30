"""Device DMA logging through the tracker on the simulated kernel, and its fallback to the
container's type1 tracking (docs/kernel-contract.md §7, docs/testing.md: the 6.12 kernel answers
EOPNOTSUPP to DMA_LOGGING_REPORT). Every test proves no written page goes unsent."""

from __future__ import annotations

import errno
import itertools
from pathlib import Path

import numpy as np
import pytest

from tests.support.dirty_rig import GUEST_PAGE, Rig, dev, has_dma_logging_sim
from vfiod.dirty.providers.base import ProviderUnavailable
from vfiod.dirty.providers.device_logging import DeviceLoggingProvider
from vfiod.dirty.providers.select import select
from vfiod.dirty.tracker import DirtyTracker
from vfiod.kernel.sim.interfaces import DeviceSpec
from vfiod.vfio import RamRegion

pytestmark = pytest.mark.skipif(
    not has_dma_logging_sim(),
    reason="needs vfiod.kernel.sim.migration (helper C's DMA logging handler)")

M1 = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
M2 = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
PCI = "0000:3b:00.1"
PCI_NOLOG = "0000:3b:00.2"
G = GUEST_PAGE


def clock():  # noqa: ANN201
    c = itertools.count(1)
    return lambda: float(next(c))


def _rig(tmp: Path, *specs: DeviceSpec) -> Rig:
    return Rig(tmp, [[s] for s in specs])


def _tracker(rig: Rig, **kw) -> DirtyTracker:  # noqa: ANN003
    return DirtyTracker([RamRegion("ram", 0, 512 * G)],
                        [c.tracked() for c in rig.containers.values()], clock=clock(), **kw)


@pytest.fixture
def mdev_rig(tmp_path: Path):  # noqa: ANN201
    """One container, one mdev with DMA logging: type1 (pinned scope) is precise too, so a
    fallback keeps exact pages and the test can compare sets."""
    rig = _rig(tmp_path, dev(M1, kind="mdev", dma_logging=True))
    rig.type1("c0", [10])
    rig.map("c0", 0x100000, 37 * G, 45 * G)
    rig.map("c0", 0x800000, 130 * G, 7 * G)
    yield rig
    rig.close()


def test_device_logging_is_chosen_and_precise(tmp_path: Path) -> None:
    rig = _rig(tmp_path, dev(PCI, dma_logging=True))
    try:
        rig.type1("c0", [10])
        rig.map("c0", 0x100000, 37 * G, 45 * G)
        tr = _tracker(rig)
        tr.start(initial_all_dirty=False)
        st = tr.status().containers[0]
        assert (st.tracker, st.precise) == ("device-logging", True)
        rig.write(PCI, "c0", 0x100000 + 26 * G, 3 * G)       # guest pages 63..65
        res = tr.sync()
        assert res.providers == {"c0": "device-logging"} and res.new_dirty_pages == 3
        assert rig.sent(tr.take_dirty_runs(64)) == {63, 64, 65}
        tr.stop()
    finally:
        rig.close()


def test_one_device_without_logging_means_type1(tmp_path: Path) -> None:
    rig = _rig(tmp_path, dev(PCI, dma_logging=True), dev(PCI_NOLOG))
    try:
        rig.type1("c0", [10, 11])
        sel = select(rig.containers["c0"].space)
        assert [p.name for p in sel.chain] == ["type1", "none"]
        assert any(PCI_NOLOG in n and "every device" in n for n in sel.notes)
    finally:
        rig.close()


def test_report_eopnotsupp_falls_back_to_type1_and_loses_nothing(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _tracker(rig)
    tr.start()
    try:
        rig.sent(tr.take_dirty_runs(1 << 20))
        rig.write(M1, "c0", 0x100000 + 2 * G, 1)             # page 39, seen by logging
        tr.sync()
        rig.sent(tr.take_dirty_runs(1 << 20))
        rig.write(M1, "c0", 0x800000 + 6 * G, 1)             # page 136: in the lost log
        # the 6.12 guest kernel: START worked, every REPORT says EOPNOTSUPP
        rig.kernel.faults.inject("feature:DMA_LOGGING_REPORT", errno.EOPNOTSUPP, count=-1)
        res = tr.sync()
        assert res.providers == {"c0": "type1"}
        assert res.lost["c0"].startswith("device-logging dirty tracking unavailable")
        assert "EOPNOTSUPP" in res.lost["c0"]
        assert res.new_dirty_pages == 45 + 7                 # whole container, this once
        assert rig.sent(tr.take_dirty_runs(1 << 20)) == set(range(37, 82)) | set(range(130, 137))
        assert not rig.written
        st = tr.status().containers[0]
        assert st.tracker == "type1"
        assert st.fallbacks and st.fallbacks[0].startswith("device-logging -> type1:")
        # type1 (pinned scope) carries on precisely: a later write is found exactly
        rig.write(M1, "c0", 0x100000 + 40 * G, 1)            # page 77
        res = tr.sync()
        assert res.lost == {} and rig.sent(tr.take_dirty_runs(1 << 20)) == {77}
        assert not rig.written
    finally:
        tr.stop()


def test_the_612_kernel_report_answer_falls_back_at_start(tmp_path: Path) -> None:
    """docs/testing.md: on the 6.12 guest kernel START succeeds and REPORT is EOPNOTSUPP. The
    provider probes REPORT right after START, so the fallback happens before the first RAM
    pass and costs no extra whole-container pass at the first sync."""
    rig = _rig(tmp_path, dev(M1, kind="mdev", dma_logging=True,
                             dma_logging_report_errno=errno.EOPNOTSUPP))
    try:
        rig.type1("c0", [10])
        rig.map("c0", 0x100000, 37 * G, 45 * G)
        tr = _tracker(rig)
        tr.start(initial_all_dirty=False)
        st = tr.status().containers[0]
        assert st.tracker == "type1"
        assert "EOPNOTSUPP" in repr(st)                       # the fallback is explained
        rig.write(M1, "c0", 0x100000 + 3 * G, 1)
        res = tr.sync()
        assert res.providers == {"c0": "type1"} and res.lost == {}
        assert rig.sent(tr.take_dirty_runs(1 << 20)) == {40}
        assert not rig.written
        tr.stop()
    finally:
        rig.close()


class _FakeLoggingDevice:
    """A device whose log already holds one dirty page when the START probe reads it."""

    name = "fake"

    def __init__(self, dirty_iova: int) -> None:
        self.log = {dirty_iova}

    def dma_logging_start(self, ranges: object, page_size: int) -> int:
        return page_size

    def dma_logging_stop(self) -> None:
        pass

    def dma_logging_report(self, iova: int, length: int, page_size: int,
                           out: np.ndarray | None = None) -> np.ndarray:
        n = length // page_size
        bits = np.zeros((n + 63) // 64, dtype=np.uint64) if out is None else out
        bits[:] = 0
        for page in [p for p in self.log if iova <= p < iova + length]:
            i = (page - iova) // page_size
            bits[i >> 6] |= np.uint64(1 << (i & 63))
            self.log.discard(page)                       # REPORT reads and clears
        return bits


def test_start_probe_carries_a_dirty_bit_into_the_next_report() -> None:
    from vfiod.dirty.providers.base import DmaSpace
    from vfiod.dirty.providers.device_logging import DeviceLoggingProvider

    space = DmaSpace("c0", devices=[], type1=object())  # type: ignore[arg-type]
    fake = _FakeLoggingDevice(dirty_iova=0x100000)
    prov = DeviceLoggingProvider(space, devices=[fake])  # type: ignore[list-item]
    prov.start([(0x100000, 64 * 4096)], 4096)
    assert fake.log == set()                             # the probe read (and cleared) it
    bits = prov.report(0x100000, 64 * 4096)
    assert int(bits[0]) & 1                               # ... and it was not lost
    assert int(prov.report(0x100000, 64 * 4096)[0]) == 0  # carried once only


def test_driver_capping_ranges_lower_answers_e2big_then_merged(tmp_path: Path) -> None:
    rig = _rig(tmp_path, dev(PCI, dma_logging=True, dma_logging_max_ranges=2))
    try:
        rig.type1("c0", [10])
        for i in range(5):
            rig.map("c0", 0x100000 + i * 4 * G, i * G, G)
        tr = _tracker(rig)
        tr.start(initial_all_dirty=False)
        prov = tr.provider("c0")
        assert isinstance(prov, DeviceLoggingProvider)
        assert len(prov.ranges) == 2
        rig.write(PCI, "c0", 0x100000 + 16 * G, 1)
        tr.sync()
        assert rig.sent(tr.take_dirty_runs(64)) == {4}
        tr.stop()
    finally:
        rig.close()


def test_start_enotty_falls_back_at_start(mdev_rig: Rig) -> None:
    rig = mdev_rig
    rig.kernel.faults.inject("feature:DMA_LOGGING_START", errno.ENOTTY)
    tr = _tracker(rig)
    tr.start(initial_all_dirty=False)
    try:
        st = tr.status().containers[0]
        assert st.tracker == "type1"
        assert "ENOTTY" in st.fallbacks[0]
        rig.write(M1, "c0", 0x100000, 1)
        tr.sync()
        assert rig.sent(tr.take_dirty_runs(64)) == {37}
    finally:
        tr.stop()


def test_report_eio_restarts_logging_and_counts_all_dirty(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _tracker(rig)
    tr.start(initial_all_dirty=False)
    try:
        rig.kernel.faults.inject("feature:DMA_LOGGING_REPORT", errno.EIO)
        res = tr.sync()
        assert res.providers == {"c0": "device-logging"}     # restarted, not replaced
        assert "log treated as lost" in res.lost["c0"] and "EIO" in res.lost["c0"]
        assert res.new_dirty_pages == 52
        assert any("EIO" in e for e in tr.status().containers[0].errors)
        rig.sent(tr.take_dirty_runs(1 << 20))
        rig.write(M1, "c0", 0x800000, 1)                     # page 130, new session
        assert tr.sync().lost == {}
        assert rig.sent(tr.take_dirty_runs(1 << 20)) == {130}
    finally:
        tr.stop()


def test_e2big_from_a_driver_merges_ranges_and_retries(mdev_rig: Rig) -> None:
    rig = mdev_rig
    space = rig.containers["c0"].space
    rig.kernel.faults.inject("feature:DMA_LOGGING_START", errno.E2BIG)
    p = DeviceLoggingProvider(space)
    assert p.start([(0x100000, 45 * G), (0x800000, 7 * G)], G) == G
    assert p.ranges == [(0x100000, 0x800000 + 7 * G - 0x100000)]   # merged to one
    rig.host.device(M1).dma_write(0x800000 + G, 1)
    assert int(p.report(0x800000, 7 * G)[0]) == 0b10
    p.stop()


def test_300_mappings_are_merged_below_the_kernel_limit(tmp_path: Path) -> None:
    rig = _rig(tmp_path, dev(PCI, dma_logging=True))
    try:
        rig.type1("c0", [10])
        for i in range(300):
            rig.map("c0", 0x100000 + i * 2 * G, i * G, G)     # IOVA gaps, guest-contiguous
        tr = DirtyTracker([RamRegion("ram", 0, 512 * G)], [rig.containers["c0"].tracked()],
                          clock=clock())
        tr.start(initial_all_dirty=False)
        prov = tr.provider("c0")
        assert isinstance(prov, DeviceLoggingProvider)
        assert len(prov.ranges) <= 256
        rig.write(PCI, "c0", 0x100000 + 299 * 2 * G, 1)
        rig.write(PCI, "c0", 0x100000 + 64 * 2 * G, 1)
        tr.sync()
        assert rig.sent(tr.take_dirty_runs(64)) == {64, 299}
        tr.stop()
    finally:
        rig.close()


def test_unmap_under_device_logging_unmaps_then_reports(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _tracker(rig)
    tr.start(initial_all_dirty=False)
    try:
        rig.write(M1, "c0", 0x800000 + 3 * G, 1)              # page 133
        log = len(rig.kernel.faults.log)
        assert tr.unmap("c0", 0x800000, 7 * G) == 1
        calls = [e.split("@")[0] for e in rig.kernel.faults.log[log:]]
        assert calls == ["ioctl:VFIO_IOMMU_UNMAP_DMA", "ioctl:VFIO_DEVICE_FEATURE",
                         "feature:DMA_LOGGING_REPORT"]
        assert rig.sent(tr.take_dirty_runs(64)) == {133}
    finally:
        tr.stop()


def test_two_devices_reports_are_ored(tmp_path: Path) -> None:
    rig = _rig(tmp_path, dev(PCI, dma_logging=True),
               dev("0000:5e:00.0", dma_logging=True))
    try:
        rig.type1("c0", [10, 11])
        rig.map("c0", 0x100000, 37 * G, 45 * G)
        tr = _tracker(rig)
        tr.start(initial_all_dirty=False)
        assert tr.status().containers[0].tracker == "device-logging"
        rig.write(PCI, "c0", 0x100000, 1)
        rig.write("0000:5e:00.0", "c0", 0x100000 + 44 * G, 1)
        tr.sync()
        assert rig.sent(tr.take_dirty_runs(64)) == {37, 81}
        tr.stop()
    finally:
        rig.close()


def test_provider_misuse_is_a_clear_error(mdev_rig: Rig) -> None:
    p = DeviceLoggingProvider(mdev_rig.containers["c0"].space)
    with pytest.raises(RuntimeError, match="before start"):
        p.report(0x100000, G)
    with pytest.raises(ValueError, match="overlaps"):
        p.start([(0x100000, 4 * G), (0x102000, 4 * G)], G)
    assert p.start([(0x100000, 45 * G)], G) == G
    with pytest.raises(ValueError, match="not aligned"):
        p.report(0x100000 + 1, G)
    p.stop()
    assert isinstance(ProviderUnavailable("device-logging", "op", "t", errno.ENOTTY),
                      Exception)


def test_report_failing_after_the_unmap_counts_the_range_dirty(mdev_rig: Rig) -> None:
    rig = mdev_rig
    tr = _tracker(rig)
    tr.start(initial_all_dirty=False)
    try:
        rig.kernel.faults.inject("feature:DMA_LOGGING_REPORT", errno.EIO)
        assert tr.unmap("c0", 0x800000, 7 * G) == 7
        st = tr.status().containers[0]
        assert st.tracker == "device-logging" and st.mappings == 1
        assert any("unmap failed" in e for e in st.errors)
        # the restarted log may have missed writes: the remaining mapping counts too
        assert rig.sent(tr.take_dirty_runs(1 << 20)) == set(range(37, 82)) | set(range(130, 137))
    finally:
        tr.stop()
