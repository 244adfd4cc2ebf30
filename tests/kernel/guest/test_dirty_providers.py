"""vfiod's dirty tracking on real type1 containers (Linux 6.12; docs/kernel-contract.md §3.8, §3.9, §7;
docs/architecture.md §3): provider selection, the type1 and device-logging providers, and the
per-guest tracker with its fallback chain and its unmap path.

What this kernel does, and what each test holds vfiod to:

* an mtty-only container is in pinned-page scope: type1 reports nothing dirty, whatever
  the CPU writes (mtty pins nothing and does no DMA);
* the edu container holds an IOMMU-backed group: type1 reports every mapped page dirty at
  every GET, and UNMAP_DMA with GET_DIRTY_BITMAP returns the unmapped range all dirty;
* device DMA logging on mtty: START succeeds, REPORT fails with EOPNOTSUPP (no
  CONFIG_IOMMUFD_DRIVER); the provider probes REPORT right after START, so the tracker
  falls back to type1 before the first sync (docs/kernel-contract.md §7).

Mappings sit at guest pages 37 and 160 (not multiples of 64) so the merge into the guest
bitmap is checked at unaligned offsets.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from tests.kernel.guest import rig
from tests.kernel.guest.conftest import Opened
from vfiod.dirty.providers import (
    DeviceLoggingProvider,
    DmaSpace,
    ProviderUnavailable,
    Type1Provider,
    select,
)
from vfiod.dirty.tracker import DirtyTracker, TrackedContainer
from vfiod.errors import KernelError
from vfiod.kernel.linux import LinuxKernel
from vfiod.migration.guest import RamBlock
from vfiod.vfio import Container, DmaMapping, RamRegion

PAGE = 4096
RAM_PAGES = 256
IOVA = 0x10_0000_0000
#: (guest page, pages, iova) of the two mappings: apart in IOVA, unaligned in the guest
LAYOUT = ((37, 100, IOVA), (160, 50, IOVA + 0x1000_0000))
MAPPED_PAGES = sum(n for _, n, _ in LAYOUT)
#: dirty runs of the whole layout, as take_dirty_runs returns them
ALL_RUNS = [(37, 100), (160, 50)]


@dataclass
class Mapped:
    ram: RamBlock
    maps: list[DmaMapping]
    space: DmaSpace

    @property
    def container(self) -> Container:
        assert self.space.type1 is not None
        return self.space.type1


def _map(kernel: LinuxKernel, o: Opened, name: str) -> Iterator[Mapped]:
    """Guest RAM mapped for DMA as LAYOUT says; unmapped (if still mapped) afterwards."""
    with rig.guest_ram(kernel, RAM_PAGES * PAGE) as ram:
        maps = []
        for gpa_page, npages, iova in LAYOUT:
            o.container.map_dma(iova, ram.addr + gpa_page * PAGE, npages * PAGE)
            maps.append(DmaMapping(iova, npages * PAGE, gpa_page * PAGE))
        try:
            yield Mapped(ram, maps, DmaSpace(name, [o.device], type1=o.container))
        finally:
            for m in o.container.mappings:
                o.container.unmap_dma(m.iova, m.size)


@pytest.fixture
def mtty_mapped(kernel: LinuxKernel, mtty: Opened) -> Iterator[Mapped]:
    yield from _map(kernel, mtty, "mtty")


@pytest.fixture
def edu_mapped(kernel: LinuxKernel, edu_dev: Opened) -> Iterator[Mapped]:
    yield from _map(kernel, edu_dev, "edu")


def bits(bitmap: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:n]


def runs(t: DirtyTracker) -> list[tuple[int, int]]:
    first, count = t.take_dirty_runs(1024)
    return [(int(f), int(c)) for f, c in zip(first, count, strict=True)]


def still_mapped_in_kernel(c: Container, iova: int, size: int) -> bool:
    """Whether the kernel still maps [iova, iova+size): UNMAP_DMA answers the bytes it
    unmapped (0 for nothing). Only for ranges the test is done with."""
    return c.unmap_dma(iova, size) > 0


def tracker(m: Mapped) -> DirtyTracker:
    return DirtyTracker([RamRegion("ram", 0, RAM_PAGES * PAGE)],
                        [TrackedContainer(m.space, list(m.maps))], PAGE)


# -- selection and the providers on their own -----------------------------------------------

def test_select_on_mtty_offers_device_logging_then_type1(mtty_mapped: Mapped) -> None:
    sel = select(mtty_mapped.space)
    assert [p.name for p in sel.chain] == ["device-logging", "type1", "none"]
    type1 = sel.chain[1]
    assert type1.precise, "an mdev-only container is in pinned-page scope"
    assert "all devices are mdevs" in type1.reason


def test_select_on_edu_skips_device_logging(edu_mapped: Mapped) -> None:
    sel = select(edu_mapped.space)
    assert [p.name for p in sel.chain] == ["type1", "none"]
    assert not sel.chain[0].precise
    bdf = edu_mapped.space.devices[0].name
    assert f"device-logging: not supported by {bdf}" in sel.notes[0]
    assert "every mapped page dirty" in sel.chain[0].reason


def test_type1_provider_on_mtty_reports_nothing(mtty_mapped: Mapped) -> None:
    p = Type1Provider(mtty_mapped.container)
    assert p.start([(m.iova, m.size) for m in mtty_mapped.maps], 2 * PAGE) == PAGE
    try:
        mtty_mapped.ram.mem[:] = b"\xff" * mtty_mapped.ram.size   # CPU writes, not DMA
        for m in mtty_mapped.maps:
            assert not bits(p.report(m.iova, m.size), m.size // PAGE).any()
        gone = mtty_mapped.maps[0]
        final = p.unmap(gone.iova, gone.size)
        assert final.size == -(-(gone.size // PAGE) // 64)
        assert not final.any()
        assert [x.iova for x in mtty_mapped.container.mappings] == [LAYOUT[1][2]]
        assert not still_mapped_in_kernel(mtty_mapped.container, gone.iova, gone.size)
    finally:
        p.stop()
        p.stop()                                # idempotent


def test_type1_provider_on_edu_reports_all_and_unmap_returns_final_bits(
        edu_mapped: Mapped) -> None:
    p = Type1Provider(edu_mapped.container)
    p.start([], PAGE)
    try:
        a, b = edu_mapped.maps
        for _ in range(2):                      # read-and-clear, yet all dirty each time
            for m in (a, b):
                got = p.report(m.iova, m.size)
                assert bits(got, m.size // PAGE).all()
                tail = np.unpackbits(got.view(np.uint8), bitorder="little")[m.size // PAGE:]
                assert not tail.any()
        final = p.unmap(a.iova, a.size)
        assert bits(final, a.size // PAGE).all()
        assert not still_mapped_in_kernel(edu_mapped.container, a.iova, a.size)
        assert bits(p.report(b.iova, b.size), b.size // PAGE).all()     # b untouched
    finally:
        p.stop()


def test_type1_provider_refusals(edu_mapped: Mapped) -> None:
    p = Type1Provider(edu_mapped.container)
    a = edu_mapped.maps[0]
    with pytest.raises(RuntimeError, match="before start"):
        p.report(a.iova, a.size)
    p.start([], PAGE)
    try:
        with pytest.raises(ValueError, match="not aligned"):
            p.report(a.iova + 1, a.size)
        # a range that bisects a mapping: the kernel's EINVAL, not "unavailable"
        with pytest.raises(KernelError) as ei:
            p.report(a.iova + PAGE, a.size - PAGE)
        assert not isinstance(ei.value, ProviderUnavailable)
        assert ei.value.errno == errno.EINVAL
        assert "VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP" in str(ei.value)
    finally:
        p.stop()


def test_device_logging_on_mtty_starts_but_report_is_unavailable(mtty_mapped: Mapped) -> None:
    p = DeviceLoggingProvider(mtty_mapped.space)
    with pytest.raises(ValueError, match="overlaps"):
        p.start([(IOVA, 2 * PAGE), (IOVA + PAGE, PAGE)], PAGE)
    ranges = [(m.iova, m.size) for m in mtty_mapped.maps]
    dev = mtty_mapped.space.devices[0]
    # START succeeds on this kernel; the provider's REPORT probe right after it gets
    # EOPNOTSUPP, so start() itself says "unavailable" and logging is stopped again
    with pytest.raises(ProviderUnavailable) as ei:
        p.start(ranges, PAGE)
    e = ei.value
    assert (e.provider, e.errno) == ("device-logging", errno.EOPNOTSUPP)
    assert "DMA_LOGGING_REPORT" in e.op and dev.name == e.target
    assert str(e).endswith("EOPNOTSUPP")
    # logging was stopped: a fresh START works (a second START on a live session is EINVAL)
    with pytest.raises(ProviderUnavailable):
        DeviceLoggingProvider(mtty_mapped.space).start(ranges, PAGE)


# -- the tracker: merge into the guest bitmap, fallback, unmap ------------------------------

def test_tracker_on_mtty_falls_back_to_type1_and_loses_nothing(
        mtty_mapped: Mapped, numba_cache: None) -> None:
    t = tracker(mtty_mapped)
    t.start(initial_all_dirty=False)
    try:
        # the REPORT probe after START said EOPNOTSUPP: type1 from the start, so the
        # first sync costs no whole-container pass
        r = t.sync()
        assert (r.providers, r.lost, r.new_dirty_pages) == ({"mtty": "type1"}, {}, 0)
        st = t.status().containers[0]
        assert (st.tracker, st.precise, st.running) == ("type1", True, True)
        assert st.fallbacks[0].startswith("device-logging -> type1: ")
        assert "EOPNOTSUPP" in st.fallbacks[0]

        # from now on type1 in pinned-page scope: CPU writes are not device DMA
        mtty_mapped.ram.mem[:] = b"\x5a" * mtty_mapped.ram.size
        r = t.sync()
        assert (r.providers, r.lost, r.new_dirty_pages, r.dirty_pages) == (
            {"mtty": "type1"}, {}, 0, 0)

        # unmap through the tracker: UNMAP_DMA with GET_DIRTY_BITMAP
        gone = mtty_mapped.maps[0]
        assert t.unmap("mtty", gone.iova, gone.size) == 0
        assert [m.iova for m in mtty_mapped.container.mappings] == [LAYOUT[1][2]]
        assert t.status().containers[0].mappings == 1
        assert t.sync().new_dirty_pages == 0
    finally:
        t.stop()
    assert not t.status().containers[0].running
    assert not still_mapped_in_kernel(mtty_mapped.container, gone.iova, gone.size)


def test_tracker_on_edu_counts_every_mapped_page_every_sync(
        edu_mapped: Mapped, numba_cache: None) -> None:
    t = tracker(edu_mapped)
    t.start(initial_all_dirty=False)
    try:
        st = t.status().containers[0]
        assert (st.tracker, st.precise) == ("type1", False)
        for _ in range(2):
            r = t.sync()
            assert (r.providers, r.lost) == ({"edu": "type1"}, {})
            assert r.new_dirty_pages == MAPPED_PAGES
            assert runs(t) == ALL_RUNS          # merged at guest pages 37 and 160
        # the final bits of an unmapped range land where that range was in the guest
        a, b = edu_mapped.maps
        assert t.unmap("edu", a.iova, a.size) == a.size // PAGE
        assert runs(t) == [ALL_RUNS[0]]
        assert not still_mapped_in_kernel(edu_mapped.container, a.iova, a.size)
        r = t.sync()
        assert r.new_dirty_pages == b.size // PAGE
        assert runs(t) == [ALL_RUNS[1]]
    finally:
        t.stop()


def test_tracker_unmap_cutting_a_mapping_changes_nothing(
        edu_mapped: Mapped, numba_cache: None) -> None:
    t = tracker(edu_mapped)
    t.start(initial_all_dirty=False)
    try:
        a = edu_mapped.maps[0]
        with pytest.raises(ValueError, match="cuts through the mapping"):
            t.unmap("edu", a.iova, PAGE)
        with pytest.raises(KeyError, match="no container named 'nope'"):
            t.unmap("nope", a.iova, a.size)
        # nothing was unmapped: the kernel still reports all of both mappings
        assert len(edu_mapped.container.mappings) == 2
        assert t.sync().new_dirty_pages == MAPPED_PAGES
        assert runs(t) == ALL_RUNS
    finally:
        t.stop()
