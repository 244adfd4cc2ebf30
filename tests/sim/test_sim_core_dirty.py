"""Type1 dirty tracking of the simulated kernel: every check of VFIO_IOMMU_DIRTY_PAGES and
of UNMAP_DMA's dirty bitmap (docs/kernel-contract.md §3.8 - §3.9), the scope rule (IOMMU-backed →
all dirty; emulated only → written + pinned pages), read-and-clear, and a 1 TiB guest that
costs no big memory."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest

import vfiod.abi.vfio as v
from vfiod.errors import KernelError
from vfiod.kernel.sim import SimHost
from vfiod.kernel.sim.interfaces import DeviceParts, DeviceSpec
from vfiod.kernel.sim.rawvfio import (
    RawVfio,
    dirty_get,
    dirty_get_buffer,
    dirty_pages,
    map_dma,
    open_device,
)

BDF = "0000:3b:00.1"
UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
PG = 4096
MiB = 1 << 20
VA = 1 << 40
START = v.VFIO_IOMMU_DIRTY_PAGES_FLAG_START
STOP = v.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
ALL_ONES = np.uint64((1 << 64) - 1)


class Listener:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def on_dma_write(self, iova: int, length: int) -> None:
        self.writes.append((iova, length))


@pytest.fixture
def host(tmp_path: Path):
    listeners: dict[str, Listener] = {}

    def parts(spec: DeviceSpec, fds: object) -> DeviceParts:
        listeners[spec.name] = Listener()
        return DeviceParts(dma_listeners=[listeners[spec.name]])

    h = SimHost.build(tmp_path, [[DeviceSpec(BDF)], [DeviceSpec(UUID, kind="mdev")]],
                      build_parts=parts)
    h.listeners = listeners  # type: ignore[attr-defined]
    yield h
    h.close()


@pytest.fixture
def pci(host: SimHost):
    raw = open_device(host.kernel, host.dev_root, 10, BDF)
    yield raw
    raw.close()


@pytest.fixture
def mdev(host: SimHost):
    raw = open_device(host.kernel, host.dev_root, 11, UUID)
    yield raw
    raw.close()


def errno_of(call: Callable[..., object], *args: object, **kwargs: object) -> int:
    with pytest.raises(KernelError) as e:
        call(*args, **kwargs)
    return e.value.errno


def bits(bitmap: np.ndarray) -> list[int]:
    """Indices of the set bits (little-endian words)."""
    return list(np.flatnonzero(np.unpackbits(bitmap.view(np.uint8), bitorder="little")))


# -- validation --------------------------------------------------------------------------------

def test_type1_v1_container_is_eacces(host: SimHost) -> None:
    raw = open_device(host.kernel, host.dev_root, 10, BDF, v.VFIO_TYPE1_IOMMU)
    arg = v.vfio_iommu_type1_dirty_bitmap(argsz=0, flags=0)         # even with bad args
    assert errno_of(lambda: host.kernel.ioctl(raw.container, v.VFIO_IOMMU_DIRTY_PAGES, arg)) \
        == errno.EACCES
    raw.close()


@pytest.mark.parametrize("argsz, flags", [
    (7, START), (8, 8), (8, 0), (8, START | STOP), (48, STOP | v.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP),
])
def test_dirty_pages_flag_rules(host: SimHost, pci: RawVfio, argsz: int, flags: int) -> None:
    arg = v.vfio_iommu_type1_dirty_bitmap(argsz=argsz, flags=flags)
    assert errno_of(lambda: host.kernel.ioctl(pci.container, v.VFIO_IOMMU_DIRTY_PAGES, arg)) \
        == errno.EINVAL


def test_start_stop_are_idempotent(host: SimHost, pci: RawVfio) -> None:
    for flags in (STOP, START, START, STOP, STOP):
        dirty_pages(host.kernel, pci.container, flags)


def get_errno(h: SimHost, raw: RawVfio, iova: int, size: int, bm: np.ndarray,
              pgsize: int = PG, argsz: int = 48, bitmap: dict[str, int] | None = None) -> int:
    buf = dirty_get_buffer(iova, size, bm, pgsize, argsz)
    get = v.vfio_iommu_type1_dirty_bitmap_get.from_buffer(buf, 8)
    for name, val in (bitmap or {}).items():
        setattr(get.bitmap, name, val)
    return errno_of(lambda: h.kernel.ioctl(raw.container, v.VFIO_IOMMU_DIRTY_PAGES, buf))


def test_get_bitmap_before_start_is_einval(host: SimHost, pci: RawVfio) -> None:
    map_dma(host.kernel, pci.container, 0, MiB, VA)
    bm = np.zeros(4, np.uint64)
    assert get_errno(host, pci, 0, MiB, bm) == errno.EINVAL
    dirty_pages(host.kernel, pci.container, START)
    dirty_pages(host.kernel, pci.container, STOP)
    assert get_errno(host, pci, 0, MiB, bm) == errno.EINVAL


def test_get_bitmap_rejects(host: SimHost, pci: RawVfio) -> None:
    k = host.kernel
    map_dma(k, pci.container, 4 * MiB, 4 * MiB, VA)
    dirty_pages(k, pci.container, START)
    bm = np.zeros(16, np.uint64)                       # 1024 pages of room
    cases = {
        "argsz below 48": dict(iova=4 * MiB, size=4 * MiB, argsz=47),
        "iova+size wraps": dict(iova=(1 << 64) - PG, size=2 * PG),
        "bitmap not user memory": dict(iova=4 * MiB, size=4 * MiB, data=1 << 47),
        "bitmap size 0": dict(iova=4 * MiB, size=4 * MiB, size_=0),
        "bitmap above 256 MiB": dict(iova=4 * MiB, size=4 * MiB, size_=(1 << 28) + 8),
        "bitmap too small": dict(iova=4 * MiB, size=4 * MiB, size_=8),
        "pgsize not the minimum": dict(iova=4 * MiB, size=4 * MiB, pgsize=2 * MiB),
        "pgsize 0": dict(iova=4 * MiB, size=4 * MiB, pgsize=0),
        "iova unaligned": dict(iova=4 * MiB + 512, size=4 * MiB),
        "size 0": dict(iova=4 * MiB, size=0),
        "size unaligned": dict(iova=4 * MiB, size=4 * MiB - 512),
        "start bisects": dict(iova=5 * MiB, size=3 * MiB),
        "end bisects": dict(iova=4 * MiB, size=2 * MiB),
    }
    for what, c in cases.items():
        override = {}
        if "data" in c:
            override["data"] = c.pop("data")
        if "size_" in c:
            override["size"] = c.pop("size_")
        assert get_errno(host, pci, bm=bm, bitmap=override, **c) == errno.EINVAL, what


# -- scope rule -------------------------------------------------------------------------------------

def test_iommu_backed_container_reports_everything_dirty_every_time(host: SimHost,
                                                                    pci: RawVfio) -> None:
    k = host.kernel
    map_dma(k, pci.container, 0, 64 * PG, VA)
    map_dma(k, pci.container, 100 * PG, 30 * PG, VA)       # starts mid-word, hole before it
    dirty_pages(k, pci.container, START)
    for _ in range(2):                                     # read-and-clear changes nothing
        bm = dirty_get(k, pci.container, 0, 256 * PG)
        assert bits(bm) == list(range(64)) + list(range(100, 130))


def test_bits_are_relative_to_the_requested_iova(host: SimHost, pci: RawVfio) -> None:
    k = host.kernel
    map_dma(k, pci.container, 10 * PG, 3 * PG, VA)
    map_dma(k, pci.container, 77 * PG, 2 * PG, VA)
    dirty_pages(k, pci.container, START)
    assert bits(dirty_get(k, pci.container, 10 * PG, 69 * PG)) == [0, 1, 2, 67, 68]
    assert bits(dirty_get(k, pci.container, 77 * PG, 2 * PG)) == [0, 1]


def test_emulated_only_container_reports_written_pages(host: SimHost, mdev: RawVfio) -> None:
    k = host.kernel
    dev = host.device(UUID)
    map_dma(k, mdev.container, 0, 256 * PG, VA)
    dev.dma_write(5 * PG, 8)                               # before START: not recorded
    dirty_pages(k, mdev.container, START)
    assert bits(dirty_get(k, mdev.container, 0, 256 * PG)) == []
    dev.dma_write(3 * PG + 100, 2 * PG)                    # touches pages 3, 4 and 5
    dev.dma_write(200 * PG, 1)
    assert bits(dirty_get(k, mdev.container, 0, 256 * PG)) == [3, 4, 5, 200]
    assert bits(dirty_get(k, mdev.container, 0, 256 * PG)) == []      # read-and-clear
    with pytest.raises(KernelError) as e:
        dev.dma_write(300 * PG, 8)                         # unmapped: an IOMMU fault
    assert e.value.errno == errno.EFAULT
    assert host.listeners[UUID].writes == [(5 * PG, 8), (3 * PG + 100, 2 * PG),  # type: ignore[attr-defined]
                                           (200 * PG, 1)]   # the faulting write is not logged


def test_pinned_pages_stay_dirty_until_unpinned(host: SimHost, mdev: RawVfio) -> None:
    k = host.kernel
    dev = host.device(UUID)
    map_dma(k, mdev.container, 0, 128 * PG, VA)
    dev.pin_pages(7 * PG, 2 * PG)
    dirty_pages(k, mdev.container, START)                  # START re-marks pinned pages
    assert bits(dirty_get(k, mdev.container, 0, 128 * PG)) == [7, 8]
    assert bits(dirty_get(k, mdev.container, 0, 128 * PG)) == [7, 8]
    dev.unpin_pages(7 * PG, PG)
    # Page 7 was re-marked by the last GET while still pinned: reported once more.
    assert bits(dirty_get(k, mdev.container, 0, 128 * PG)) == [7, 8]
    assert bits(dirty_get(k, mdev.container, 0, 128 * PG)) == [8]
    with pytest.raises(KernelError) as e:
        dev.unpin_pages(7 * PG, PG)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(KernelError) as e:
        host.device(BDF).pin_pages(0, PG)                  # only emulated devices pin
    assert e.value.errno == errno.EINVAL
    with pytest.raises(KernelError) as e:
        dev.pin_pages(128 * PG, PG)                        # not mapped
    assert e.value.errno == errno.EINVAL


def test_a_physical_device_in_the_container_makes_everything_dirty(host: SimHost,
                                                                   mdev: RawVfio) -> None:
    k = host.kernel
    map_dma(k, mdev.container, 0, 64 * PG, VA)
    dirty_pages(k, mdev.container, START)
    assert bits(dirty_get(k, mdev.container, 0, 64 * PG)) == []
    g = k.open(os.path.join(host.dev_root, "vfio/10"), os.O_RDWR)
    k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(mdev.container))
    assert bits(dirty_get(k, mdev.container, 0, 64 * PG)) == list(range(64))
    k.ioctl(g, v.VFIO_GROUP_UNSET_CONTAINER, 0)
    k.close(g)
    assert bits(dirty_get(k, mdev.container, 0, 64 * PG)) == []


def test_an_all_dirty_answer_also_clears_what_was_written(host: SimHost,
                                                           mdev: RawVfio) -> None:
    # the kernel sets every bit of the mapping's bitmap, copies it out and clears it: a
    # page an mdev wrote while a physical device made everything dirty is not reported
    # again once the physical device has left
    k = host.kernel
    map_dma(k, mdev.container, 0, 64 * PG, VA)
    dirty_pages(k, mdev.container, START)
    g = k.open(os.path.join(host.dev_root, "vfio/10"), os.O_RDWR)
    k.ioctl(g, v.VFIO_GROUP_SET_CONTAINER, ctypes.c_int(mdev.container))
    host.device(UUID).dma_write(5 * PG, 8)
    assert bits(dirty_get(k, mdev.container, 0, 64 * PG)) == list(range(64))
    k.ioctl(g, v.VFIO_GROUP_UNSET_CONTAINER, 0)
    k.close(g)
    assert bits(dirty_get(k, mdev.container, 0, 64 * PG)) == []


def test_mapping_added_while_tracking_starts_clean(host: SimHost, mdev: RawVfio) -> None:
    k = host.kernel
    dirty_pages(k, mdev.container, START)
    map_dma(k, mdev.container, 0, 64 * PG, VA)
    assert bits(dirty_get(k, mdev.container, 0, 64 * PG)) == []
    host.device(UUID).dma_write(63 * PG, PG)
    assert bits(dirty_get(k, mdev.container, 0, 64 * PG)) == [63]


def test_stop_forgets_dirty_pages(host: SimHost, mdev: RawVfio) -> None:
    k = host.kernel
    map_dma(k, mdev.container, 0, 64 * PG, VA)
    dirty_pages(k, mdev.container, START)
    host.device(UUID).dma_write(0, PG)
    dirty_pages(k, mdev.container, STOP)
    dirty_pages(k, mdev.container, START)
    assert bits(dirty_get(k, mdev.container, 0, 64 * PG)) == []


def test_mapping_bitmaps_live_from_start_to_stop_or_unmap(host: SimHost,
                                                          mdev: RawVfio) -> None:
    # type1's per-mapping bitmap is kernel memory (docs/kernel-contract.md §3.9): START
    # gives each mapping one, a mapping made while tracking gets one, a GET clears it in
    # place, STOP and unmap free it; never an array per query
    k = host.kernel
    iommu = k.file_of(mdev.container).iommu  # type: ignore[union-attr]
    map_dma(k, mdev.container, 0, 64 * PG, VA)
    first = iommu.mappings[0].dirty
    assert first.storage is None                           # not tracking: no bitmap
    dirty_pages(k, mdev.container, START)
    kept = first.storage
    assert kept is not None
    map_dma(k, mdev.container, 64 * PG, 64 * PG, VA)
    second = iommu.mappings[1].dirty
    assert second.storage is not None
    host.device(UUID).dma_write(3 * PG, 1)
    host.device(UUID).dma_write(70 * PG, 1)
    assert bits(dirty_get(k, mdev.container, 0, 128 * PG)) == [3, 70]
    assert first.storage is kept and not kept.any()        # cleared in place
    assert bits(dirty_get(k, mdev.container, 0, 128 * PG)) == []
    bm = np.zeros(1, np.uint64)
    assert unmap_with_bitmap(k, mdev, 64 * PG, 64 * PG, bm) == 64 * PG
    assert second.storage is None                          # unmapped: freed
    dirty_pages(k, mdev.container, STOP)
    assert first.storage is None                           # STOP frees the rest


# -- UNMAP_DMA with GET_DIRTY_BITMAP ---------------------------------------------------------------

def unmap_with_bitmap(k, raw: RawVfio, iova: int, size: int, bm: np.ndarray,
                      pgsize: int = PG, argsz: int = 48) -> int:
    buf = bytearray(48)
    u = v.vfio_iommu_type1_dma_unmap.from_buffer(buf)
    u.argsz, u.flags, u.iova, u.size = argsz, v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, iova, size
    b = v.vfio_bitmap.from_buffer(buf, 24)
    b.pgsize, b.size, b.data = pgsize, bm.nbytes, bm.ctypes.data
    k.ioctl(raw.container, v.VFIO_IOMMU_UNMAP_DMA, buf)
    return int(u.size)


def test_unmap_returns_the_final_bitmap(host: SimHost, mdev: RawVfio) -> None:
    k = host.kernel
    map_dma(k, mdev.container, 64 * PG, 64 * PG, VA)
    map_dma(k, mdev.container, 128 * PG, 64 * PG, VA)
    dirty_pages(k, mdev.container, START)
    host.device(UUID).dma_write(65 * PG, 1)
    host.device(UUID).dma_write(130 * PG, 1)
    bm = np.zeros(2, np.uint64)
    assert unmap_with_bitmap(k, mdev, 64 * PG, 128 * PG, bm) == 128 * PG
    assert bits(bm) == [1, 66]
    map_dma(k, mdev.container, 64 * PG, 128 * PG, VA)        # both mappings are gone


def test_unmap_bitmap_rejects(host: SimHost, mdev: RawVfio) -> None:
    k = host.kernel
    map_dma(k, mdev.container, 0, 64 * PG, VA)
    bm = np.zeros(1, np.uint64)
    fail = lambda **kw: errno_of(lambda: unmap_with_bitmap(k, mdev, 0, 64 * PG, bm, **kw))  # noqa: E731
    assert fail() == errno.EINVAL                            # tracking not started
    dirty_pages(k, mdev.container, START)
    assert fail(argsz=24) == errno.EINVAL                    # no room for the vfio_bitmap
    assert fail(pgsize=2 * PG) == errno.EINVAL               # not the minimum page size
    assert fail(pgsize=0) == errno.EINVAL
    assert errno_of(lambda: unmap_with_bitmap(k, mdev, 0, 128 * 64 * PG, bm)) == errno.EINVAL
    assert unmap_with_bitmap(k, mdev, 0, 64 * PG, bm) == 64 * PG      # all checks passed


# -- scale --------------------------------------------------------------------------------------------

def test_one_tib_guest_costs_no_big_memory(host: SimHost, pci: RawVfio) -> None:
    k = host.kernel
    tib = 1 << 40
    proc = psutil.Process()
    bm = np.zeros(tib // PG // 64, np.uint64)           # the caller's 32 MiB bitmap
    bm[:] = 0                                           # touch it now: not the kernel's cost
    before = proc.memory_info().rss
    for part in range(4):                               # four 256 GiB mappings
        map_dma(k, pci.container, part * (tib // 4), tib // 4, VA)
    dirty_pages(k, pci.container, START)
    buf = dirty_get_buffer(0, tib, bm)
    for _ in range(3):
        k.ioctl(pci.container, v.VFIO_IOMMU_DIRTY_PAGES, buf)
    grown = proc.memory_info().rss - before
    assert bool((bm == ALL_ONES).all())
    assert grown < 16 * MiB, f"simulated kernel grew RSS by {grown / MiB:.1f} MiB"
