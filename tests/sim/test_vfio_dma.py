"""DMA mappings and type1 dirty tracking through ``Container`` on the simulated kernel
(docs/kernel-contract.md §3.7-§3.9, §8): mapping bookkeeping, every refusal surfacing as a named
error with the kernel's errno, read-and-clear bitmaps in both type1 scopes, the
unmap-with-bitmap path, and splitting a query that exceeds the per-call bitmap limit."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import vfiod.abi.vfio as v
from tests.support.vfio_rig import (  # noqa: F401  (rig_fixture: the rig fixture)
    MDEV,
    PCI,
    Opened,
    Rig,
    build_rig,
    open_device,
    rig_fixture,
)
from vfiod.errors import KernelError
from vfiod.kernel.ops import MemlockFacts
from vfiod.kernel.sim import Type1Config
from vfiod.migration.planning.hostfacts import gather_host_facts
from vfiod.vfio import Container, Group

PG = 4096
IOVA = 0x1_0000_0000


class Ram:
    """Guest RAM the way the daemon gets it: a memfd mapped through KernelOps."""

    def __init__(self, r: Rig, size: int) -> None:
        self.kernel = r.kernel
        self.fd = r.kernel.memfd_create("guest-ram", size)
        self.mm = r.kernel.mmap(self.fd, size)
        self.vaddr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def close(self) -> None:
        self.mm.close()
        self.kernel.close(self.fd)


@pytest.fixture
def ram(rig: Rig) -> Iterator[Ram]:
    r = Ram(rig, 64 * PG)
    yield r
    r.close()


@pytest.fixture
def pci(rig: Rig) -> Iterator[Opened]:
    o = open_device(rig, PCI)
    yield o
    o.container.close()


@pytest.fixture
def mdev(rig: Rig) -> Iterator[Opened]:
    o = open_device(rig, MDEV)
    yield o
    o.container.close()


def bits(bitmap: np.ndarray, n: int | None = None) -> list[int]:
    flat = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
    return [int(i) for i in np.flatnonzero(flat[:n] if n is not None else flat)]


# -- mappings -----------------------------------------------------------------------------

def test_map_and_unmap_track_mappings(pci: Opened, ram: Ram) -> None:
    c = pci.container
    m1 = c.map_dma(IOVA, ram.vaddr, 8 * PG)
    m2 = c.map_dma(IOVA + 16 * PG, ram.vaddr + 8 * PG, 4 * PG, writable=False)
    assert c.mappings == (m1, m2) and m2.end == IOVA + 20 * PG
    # one DmaMapping type: what the kernel pinned and where the guest sees it
    assert (m1.vaddr, m1.gpa, m1.flags) == (
        ram.vaddr, IOVA, v.VFIO_DMA_MAP_FLAG_READ | v.VFIO_DMA_MAP_FLAG_WRITE)
    assert m2.flags == v.VFIO_DMA_MAP_FLAG_READ
    m3 = c.map_dma(IOVA + 32 * PG, ram.vaddr, PG, gpa=0x4000)
    assert (m3.iova, m3.gpa, m3.size) == (IOVA + 32 * PG, 0x4000, PG)
    assert c.unmap_dma(IOVA + 32 * PG, PG) == PG
    assert c.iommu_info().dma_avail == 65535 - 2
    assert c.unmap_dma(IOVA + 8 * PG, 8 * PG) == 0          # a hole: nothing unmapped
    assert c.unmap_dma(IOVA, 20 * PG) == 12 * PG
    assert c.mappings == ()


@pytest.mark.parametrize("iova_off,size,err,detail", [
    (2 * PG, 4 * PG, errno.EEXIST, "overlaps the mapping"),
    (100, 4 * PG, errno.EINVAL, "aligned"),
    (0x10 * PG, 0, errno.EINVAL, "aligned"),
])
def test_map_refusals(pci: Opened, ram: Ram, iova_off: int, size: int, err: int,
                      detail: str) -> None:
    c = pci.container
    c.map_dma(IOVA, ram.vaddr, 8 * PG)
    with pytest.raises(KernelError) as ei:
        c.map_dma(IOVA + iova_off, ram.vaddr, size)
    e = ei.value
    assert e.errno == err and detail in str(e)
    assert str(e).startswith(f"VFIO_IOMMU_MAP_DMA(iova {IOVA + iova_off:#x}, size {size:#x}) "
                             "on container ")
    assert len(c.mappings) == 1                              # the failed map is not tracked


def test_map_outside_iova_ranges(pci: Opened, ram: Ram) -> None:
    with pytest.raises(KernelError) as ei:
        pci.container.map_dma(1 << 48, ram.vaddr, PG)
    assert ei.value.errno == errno.EINVAL and "IOVA ranges" in str(ei.value)


def test_map_rejects_values_a_u64_cannot_hold(pci: Opened) -> None:
    with pytest.raises(ValueError, match="iova=-0x1000 does not fit"):
        pci.container.map_dma(-PG, 0, PG)
    with pytest.raises(ValueError, match="size=0x1"):
        pci.container.map_dma(0, 0, 1 << 64)


def test_no_memlock_limit_is_cap_ipc_lock(rig: Rig) -> None:
    assert rig.kernel.memlock() == MemlockFacts(None, None, 0, True)
    assert rig.kernel.memlock().headroom() is None


def test_memlock_and_entry_limits(tmp_path: Path) -> None:
    r = build_rig(tmp_path, memlock_limit=4 * PG, type1=Type1Config(dma_entry_limit=2))
    ram = Ram(r, 16 * PG)
    o = open_device(r, PCI)
    try:
        c = o.container
        with pytest.raises(KernelError) as ei:
            c.map_dma(IOVA, ram.vaddr, 8 * PG)
        assert ei.value.errno == errno.ENOMEM and "RLIMIT_MEMLOCK" in str(ei.value)
        c.map_dma(IOVA, ram.vaddr, PG)
        c.map_dma(IOVA + PG, ram.vaddr + PG, PG)
        with pytest.raises(KernelError) as ei:
            c.map_dma(IOVA + 2 * PG, ram.vaddr + 2 * PG, PG)
        assert ei.value.errno == errno.ENOSPC
        # the simulated kernel answers memlock with its own limit and pinned bytes, so
        # preflight sees the kernel vfiod talks to, not this process's RLIMIT_MEMLOCK
        assert r.kernel.memlock() == MemlockFacts(4 * PG, 4 * PG, 2 * PG, False)
        assert gather_host_facts(r.kernel).memlock.headroom() == 2 * PG
    finally:
        o.container.close()
        ram.close()
        r.host.close()


def test_unmap_bisecting_a_mapping_is_einval(pci: Opened, ram: Ram) -> None:
    c = pci.container
    c.map_dma(IOVA, ram.vaddr, 8 * PG)
    with pytest.raises(KernelError) as ei:
        c.unmap_dma(IOVA, 4 * PG)
    assert ei.value.errno == errno.EINVAL and "bisects" in str(ei.value)
    assert ei.value.op == f"VFIO_IOMMU_UNMAP_DMA(iova {IOVA:#x}, size {4 * PG:#x})"
    assert len(c.mappings) == 1


# -- type1 dirty tracking -----------------------------------------------------------------

def test_pci_container_reports_every_mapped_page(pci: Opened, ram: Ram) -> None:
    c = pci.container
    c.map_dma(IOVA, ram.vaddr, 3 * PG)
    c.map_dma(IOVA + 5 * PG, ram.vaddr + 3 * PG, 2 * PG)
    c.dirty_start()
    for _ in range(2):                      # read-and-clear, yet all dirty every time
        bm = c.dirty_get(IOVA, 7 * PG, PG)
        assert bm.dtype == np.uint64 and bm.size == 1
        assert bits(bm) == [0, 1, 2, 5, 6]   # the hole (pages 3, 4) stays clean
    c.dirty_stop()


def test_mdev_container_reports_device_writes_then_clears(mdev: Opened, ram: Ram,
                                                          rig: Rig) -> None:
    c = mdev.container
    c.map_dma(IOVA, ram.vaddr, 64 * PG)
    c.dirty_start()
    node = rig.host.device(MDEV)
    node.dma_write(IOVA + 3 * PG, 2 * PG)
    node.dma_write(IOVA + 63 * PG + 10, 1)
    assert bits(c.dirty_get(IOVA, 64 * PG, PG)) == [3, 4, 63]
    assert bits(c.dirty_get(IOVA, 64 * PG, PG)) == []
    c.dirty_stop()


def test_dirty_get_reuses_and_zeroes_out(mdev: Opened, ram: Ram, rig: Rig) -> None:
    c = mdev.container
    c.map_dma(IOVA, ram.vaddr, 64 * PG)
    c.dirty_start()
    rig.host.device(MDEV).dma_write(IOVA + 7 * PG, PG)
    out = np.full(3, np.uint64(0xFFFF_FFFF_FFFF_FFFF))
    got = c.dirty_get(IOVA, 64 * PG, PG, out=out)
    assert got is out and bits(out[:1]) == [7]
    assert out[1] == 0xFFFF_FFFF_FFFF_FFFF       # words beyond the range are not touched
    with pytest.raises(ValueError, match="0 words, 1 needed"):
        c.dirty_get(IOVA, 64 * PG, PG, out=np.zeros(0, dtype=np.uint64))
    c.dirty_stop()


def test_dirty_get_clears_out_only_where_the_kernel_leaves_words(
        mdev: Opened, rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """type1 writes every word of its mappings over the caller's (docs/kernel-contract.md
    §3.9): a range mappings cover is handed to the kernel as it is, one with a hole is
    cleared first; either way the result is exactly the dirty pages."""
    c = mdev.container
    ram = Ram(rig, 256 * PG)
    handed: list[np.ndarray] = []
    real = c._get_bitmap
    monkeypatch.setattr(c, "_get_bitmap", lambda iova, size, pgsize, buf, op: (
        handed.append(buf.copy()), real(iova, size, pgsize, buf, op)))
    try:
        c.map_dma(IOVA, ram.vaddr, 100 * PG)
        c.map_dma(IOVA + 100 * PG, ram.vaddr, 28 * PG)      # [0, 128) without a hole
        c.map_dma(IOVA + 192 * PG, ram.vaddr, 64 * PG)      # a hole [128, 192) before it
        c.dirty_start()
        node = rig.host.device(MDEV)
        for p in (5, 99, 100, 127, 200):
            node.dma_write(IOVA + p * PG, 1)
        ones = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
        out = np.full(4, ones)
        assert bits(c.dirty_get(IOVA, 128 * PG, PG, out=out), 128) == [5, 99, 100, 127]
        assert handed[-1].tolist() == [ones, ones]           # not cleared first
        out = np.full(4, ones)
        assert bits(c.dirty_get(IOVA, 256 * PG, PG, out=out)) == [200]
        assert handed[-1].tolist() == [0, 0, 0, 0]           # cleared: the hole's word
        c.dirty_stop()
    finally:
        c.close()
        ram.close()


@pytest.mark.parametrize("case,err", [
    ("not-started", errno.EINVAL), ("pgsize", errno.EINVAL), ("bisect", errno.EINVAL),
])
def test_dirty_get_refusals(pci: Opened, ram: Ram, case: str, err: int) -> None:
    c = pci.container
    c.map_dma(IOVA, ram.vaddr, 8 * PG)
    if case != "not-started":
        c.dirty_start()
    iova, size, pgsize = IOVA, 8 * PG, PG
    if case == "pgsize":
        pgsize = 2 * PG
    if case == "bisect":
        size = 4 * PG
    with pytest.raises(KernelError) as ei:
        c.dirty_get(iova, size, pgsize)
    assert ei.value.errno == err
    assert str(ei.value).startswith(
        f"VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP, iova {iova:#x}, size {size:#x}) on container")
    with pytest.raises(ValueError, match="not 0"):
        c.dirty_get(iova, size, 0)


def test_unmap_with_dirty_bitmap(mdev: Opened, ram: Ram, rig: Rig) -> None:
    c = mdev.container
    c.map_dma(IOVA, ram.vaddr, 4 * PG)
    c.map_dma(IOVA + 4 * PG, ram.vaddr + 4 * PG, 4 * PG)
    with pytest.raises(KernelError) as ei:          # tracking not started
        c.unmap_dma_get_dirty(IOVA, 4 * PG, PG)
    assert ei.value.errno == errno.EINVAL
    assert "VFIO_IOMMU_UNMAP_DMA(GET_DIRTY_BITMAP" in ei.value.op
    assert len(c.mappings) == 2
    c.dirty_start()
    rig.host.device(MDEV).dma_write(IOVA + PG, PG)
    rig.host.device(MDEV).dma_write(IOVA + 6 * PG, PG)
    assert bits(c.unmap_dma_get_dirty(IOVA + 4 * PG, 4 * PG, PG)) == [2]
    assert [m.iova for m in c.mappings] == [IOVA]   # the unmapped one is forgotten
    assert bits(c.dirty_get(IOVA, 4 * PG, PG)) == [1]
    c.dirty_stop()


def test_type1_v1_container_cannot_track(rig: Rig) -> None:
    with Container.open(rig.kernel, rig.paths) as c:
        Group.open(rig.kernel, rig.paths, 10).set_container(c)
        c.set_iommu(v.VFIO_TYPE1_IOMMU)
        with pytest.raises(KernelError) as ei:
            c.dirty_start()
        assert ei.value.errno == errno.EACCES
        assert str(ei.value).startswith("VFIO_IOMMU_DIRTY_PAGES(START) on container")


# -- splitting at the per-call bitmap limit ------------------------------------------------

def test_split_query_matches_the_dirty_pages(mdev: Opened, rig: Rig,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With the limit at 16 bytes (128 pages) per call, a query over mappings of odd
    sizes must be cut between mappings and reassembled at non-64-aligned bit offsets."""
    c = mdev.container
    ram = Ram(rig, 512 * PG)
    try:
        layout = [(0, 100), (100, 27), (140, 70), (210, 1), (211, 128), (339, 61)]  # pages
        for first, n in layout:
            c.map_dma(IOVA + first * PG, ram.vaddr + first * PG, n * PG)
        monkeypatch.setattr(c, "max_dirty_bitmap_bytes", lambda: 16)
        c.dirty_start()
        dirty = [0, 63, 64, 99, 100, 126, 140, 141, 209, 210, 211, 300, 338, 339, 399]
        node = rig.host.device(MDEV)
        for p in dirty:
            node.dma_write(IOVA + p * PG, PG)
        start = len(rig.kernel.faults.log)
        got = c.dirty_get(IOVA, 400 * PG, PG)
        calls = [e for e in rig.kernel.faults.log[start:]
                 if e.startswith("ioctl:VFIO_IOMMU_DIRTY_PAGES")]
        assert len(calls) == 4       # [0,127) [140,211) [211,339) [339,400): cut between maps
        assert bits(got, 400) == dirty
        assert got.size == 7
        assert bits(c.dirty_get(IOVA, 400 * PG, PG)) == []
        c.dirty_stop()
    finally:
        c.close()
        ram.close()


def test_mapping_larger_than_one_bitmap_is_refused(mdev: Opened, ram: Ram,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    c = mdev.container
    c.map_dma(IOVA, ram.vaddr, 64 * PG)
    c.map_dma(IOVA + 64 * PG, ram.vaddr, 64 * PG)
    monkeypatch.setattr(c, "max_dirty_bitmap_bytes", lambda: 4)       # 32 pages per call
    c.dirty_start()
    with pytest.raises(ValueError, match="larger than one dirty bitmap covers"):
        c.dirty_get(IOVA, 128 * PG, PG)
    c.dirty_stop()
