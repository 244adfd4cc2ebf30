"""``VFIO_IOMMU_GET_INFO`` on a type1 container, decoded (docs/kernel-contract.md §3.6).

Two-call pattern: ask with the fixed 24-byte struct; if the kernel has capabilities that
do not fit it raises ``argsz`` (and still succeeds), so ask again with a buffer that big.
The capability chain gives the usable IOVA ranges, the type1 dirty-tracking capability
(its presence is what says ``VFIO_IOMMU_DIRTY_PAGES`` works) and the DMA mapping budget.
An iommufd-compat container reports no MIGRATION cap (§3.6, last paragraph).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import vfiod.abi.vfio as v
from vfiod.kernel.ops import KernelOps
from vfiod.vfio.call import caps_of, ioctl, lowest_bit, struct_at, tail_at

OP = "VFIO_IOMMU_GET_INFO"
#: 2^28 bytes: the most bitmap memory type1 accepts per GET_BITMAP (§3.9), used when the
#: MIGRATION capability is missing and a caller still asks for a bitmap.
DIRTY_BITMAP_SIZE_MAX = 1 << 28


@dataclass(frozen=True)
class DirtyCap:
    """``VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION``: type1 dirty tracking is available."""

    flags: int
    pgsize_bitmap: int              # type1 reports only the minimum IOMMU page size
    max_dirty_bitmap_size: int      # bytes of bitmap per GET_BITMAP call

    @property
    def pgsize(self) -> int:
        return lowest_bit(self.pgsize_bitmap)


@dataclass(frozen=True)
class IommuInfo:
    flags: int
    iova_pgsizes: int
    iova_ranges: tuple[tuple[int, int], ...]    # (start, end inclusive); () = not reported
    dirty: DirtyCap | None
    dma_avail: int | None
    cap_ids: tuple[int, ...] = ()

    @property
    def min_pgsize(self) -> int:
        """The IOMMU's smallest page: MAP_DMA alignment and the only dirty pgsize type1
        accepts (§3.7, §3.9)."""
        return lowest_bit(self.iova_pgsizes)


def query_iommu_info(kernel: KernelOps, fd: int, target: str) -> IommuInfo:
    """Issue GET_INFO (twice if the capabilities did not fit) and decode the answer."""
    fixed = ctypes.sizeof(v.vfio_iommu_type1_info)
    first = v.vfio_iommu_type1_info(argsz=fixed)
    ioctl(kernel, fd, v.VFIO_IOMMU_GET_INFO, first, OP, target)
    if first.argsz <= fixed:
        data = bytes(first)
        flags, pgsizes, cap_offset = first.flags, first.iova_pgsizes, first.cap_offset
    else:
        buf = bytearray(first.argsz)
        head = v.vfio_iommu_type1_info.from_buffer(buf)
        head.argsz = first.argsz
        ioctl(kernel, fd, v.VFIO_IOMMU_GET_INFO, buf, OP, target)
        flags, pgsizes, cap_offset = head.flags, head.iova_pgsizes, head.cap_offset
        del head
        data = bytes(buf)
    if not flags & v.VFIO_IOMMU_INFO_CAPS:
        cap_offset = 0
    if not flags & v.VFIO_IOMMU_INFO_PGSIZES:
        pgsizes = 0
    return _decode(data, flags, pgsizes, cap_offset, target)


def _decode(data: bytes, flags: int, pgsizes: int, first: int, target: str) -> IommuInfo:
    ranges: tuple[tuple[int, int], ...] = ()
    dirty: DirtyCap | None = None
    avail: int | None = None
    caps = caps_of(data, first, ctypes.sizeof(v.vfio_iommu_type1_info), OP, target)
    for cap_id, _version, off in caps:
        if cap_id == v.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            ranges = _iova_ranges(data, off, target)
        elif cap_id == v.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION:
            m = struct_at(v.vfio_iommu_type1_info_cap_migration, data, off, OP, target)
            dirty = DirtyCap(m.flags, m.pgsize_bitmap, m.max_dirty_bitmap_size)
        elif cap_id == v.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
            avail = struct_at(v.vfio_iommu_type1_info_dma_avail, data, off, OP, target).avail
        # unknown capabilities are skipped: newer kernels may add more
    return IommuInfo(flags, pgsizes, ranges, dirty, avail, tuple(c[0] for c in caps))


def _iova_ranges(data: bytes, off: int, target: str) -> tuple[tuple[int, int], ...]:
    cap_t = v.vfio_iommu_type1_info_cap_iova_range
    cap = struct_at(cap_t, data, off, OP, target)
    return tuple((r.start, r.end) for r in tail_at(cap_t, data, cap.nr_iovas, off, OP, target))
