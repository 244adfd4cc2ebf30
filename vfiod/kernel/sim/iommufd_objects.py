"""The iommufd objects behind ``/dev/iommu`` (docs/kernel-contract.md §4.3 - §4.4): an IOAS (the
IOVA → user-memory areas), a HWPT (an IOMMU page table over an IOAS; with dirty tracking it
records attached devices' DMA writes per area) and a device object (a bound cdev).

IOAS rules: length > 0 and aligned to ``alignment`` (4 KiB), a FIXED_IOVA aligned too and
with the same page offset as ``user_va``, overflow → EOVERFLOW, overlap → EEXIST, past
``memlock_limit`` → ENOMEM. Unmap must cover whole areas (a bisected area, or nothing
mapped in the range → ENOENT); "unmap all" of an empty IOAS succeeds.
"""

from __future__ import annotations

import bisect
import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import vfiod.abi.iommufd as iu
from vfiod.kernel.sim.base import copy_to_user, fail
from vfiod.kernel.sim.dirtymap import DirtyMap, or_into_user
from vfiod.kernel.sim.uaccess import U64_MAX

if TYPE_CHECKING:
    from vfiod.kernel.sim.kernel import SimKernel
    from vfiod.kernel.sim.node import SimDevice

PAGE_SIZE = 4096


@dataclass
class Area:
    iova: int
    length: int
    user_va: int
    flags: int
    charged: int = 0

    @property
    def end(self) -> int:
        return self.iova + self.length


class Ioas:
    def __init__(self, obj_id: int) -> None:
        self.id = obj_id
        self.areas: list[Area] = []
        self._starts: list[int] = []
        self.hwpts: list[Hwpt] = []
        self.alignment = PAGE_SIZE

    def overlapping(self, lo: int, hi: int) -> list[Area]:
        i = max(0, bisect.bisect_right(self._starts, lo) - 1)
        out = []
        while i < len(self.areas) and self.areas[i].iova < hi:
            if self.areas[i].end > lo:
                out.append(self.areas[i])
            i += 1
        return out

    def _free_iova(self, length: int, offset: int) -> int:
        addr = PAGE_SIZE + offset          # never hand out IOVA 0
        for a in self.areas:
            if addr + length <= a.iova:
                break
            addr = max(addr, a.end + offset)
        if addr + length - 1 > U64_MAX:
            raise fail(errno.ENOSPC, "IOMMU_IOAS_MAP", f"IOAS {self.id}", "no free IOVA")
        return addr

    def map(self, user_va: int, length: int, iova: int | None, flags: int,
            kernel: SimKernel, op: str) -> int:
        name = f"IOAS {self.id}"
        if not length or length % self.alignment:
            raise fail(errno.EINVAL, op, name, f"length {length:#x} zero or unaligned")
        if iova is None:
            iova = self._free_iova(length, user_va % self.alignment)
        if iova % self.alignment or user_va % self.alignment != iova % self.alignment:
            raise fail(errno.EINVAL, op, name, f"iova {iova:#x} / user_va {user_va:#x} "
                       "not page-aligned alike")
        if iova + length - 1 > U64_MAX:
            raise fail(errno.EOVERFLOW, op, name, f"{iova:#x}+{length:#x} overflows")
        hit = self.overlapping(iova, iova + length)
        if hit:
            raise fail(errno.EEXIST, op, name, f"overlaps the area at {hit[0].iova:#x}")
        cap = kernel.memlock_limit
        if cap is not None and kernel.locked_bytes + length > cap:
            raise fail(errno.ENOMEM, op, name, "RLIMIT_MEMLOCK exceeded")
        kernel.locked_bytes += length
        i = bisect.bisect_left(self._starts, iova)
        self._starts.insert(i, iova)
        self.areas.insert(i, Area(iova, length, user_va, flags, length))
        return iova

    def _remove(self, areas: list[Area]) -> int:
        freed = 0
        for a in areas:
            i = bisect.bisect_left(self._starts, a.iova)
            del self._starts[i]
            del self.areas[i]
            freed += a.charged
            for h in self.hwpts:
                h.dirty.pop(a.iova, None)
        return freed

    def unmap(self, iova: int, length: int, op: str) -> tuple[int, int]:
        name = f"IOAS {self.id}"
        if not length:
            raise fail(errno.EINVAL, op, name, "length 0")
        if iova + length - 1 > U64_MAX:
            raise fail(errno.EOVERFLOW, op, name, f"{iova:#x}+{length:#x} overflows")
        hit = self.overlapping(iova, iova + length)
        if not hit:
            raise fail(errno.ENOENT, op, name, f"nothing mapped in {iova:#x}+{length:#x}")
        for a in hit:
            if a.iova < iova or a.end > iova + length:
                raise fail(errno.ENOENT, op, name, f"{iova:#x}+{length:#x} cuts the area "
                           f"{a.iova:#x}+{a.length:#x}")
        return self._remove(hit), sum(a.length for a in hit)

    def unmap_all(self) -> tuple[int, int]:
        areas = list(self.areas)
        return self._remove(areas), sum(a.length for a in areas)

    def release(self) -> int:
        return self.unmap_all()[0]


@dataclass
class Hwpt:
    id: int
    ioas: Ioas
    dirty_capable: bool
    auto: bool
    devices: set[int] = field(default_factory=set)
    tracking: bool = False
    dirty: dict[int, DirtyMap] = field(default_factory=dict)      # area iova -> bits

    def set_tracking(self, enable: bool) -> None:
        if enable:
            self.dirty.clear()          # enabling walks the page table and clears stale bits
        self.tracking = enable

    def dma_write(self, device: SimDevice, iova: int, length: int, data: bytes | None) -> None:
        op = f"DMA write {iova:#x}+{length:#x}"
        areas, addr = [], iova
        for a in self.ioas.overlapping(iova, iova + length):
            if a.iova > addr:
                break
            areas.append(a)
            addr = a.end
        if addr < iova + length:
            raise fail(errno.EFAULT, op, device.name, f"IOVA {addr:#x} is not mapped")
        for a in areas:
            if not a.flags & iu.IOMMU_IOAS_MAP_WRITEABLE:
                raise fail(errno.EFAULT, op, device.name, f"area {a.iova:#x} is read-only")
        for a in areas:
            lo, hi = max(iova, a.iova), min(iova + length, a.end)
            if data is not None:
                copy_to_user(a.user_va + lo - a.iova, data[lo - iova:hi - iova], op)
            if self.tracking:
                dm = self.dirty.setdefault(a.iova, DirtyMap(a.length // PAGE_SIZE))
                first = (lo - a.iova) // PAGE_SIZE
                dm.mark(first, (hi - 1 - a.iova) // PAGE_SIZE - first + 1)

    def read_dirty(self, data: int, iova: int, length: int, page: int, clear: bool,
                   op: str) -> None:
        scale = (page // PAGE_SIZE).bit_length() - 1
        for a in self.ioas.overlapping(iova, iova + length):
            dm = self.dirty.get(a.iova)
            if dm is None:
                continue
            lo, hi = max(iova, a.iova), min(iova + length, a.end)
            first = (lo - a.iova) // PAGE_SIZE
            npages = (hi - lo) // PAGE_SIZE
            or_into_user(data, length // page, dm, first, npages, (lo - iova) // PAGE_SIZE,
                         scale, op)
            if clear:
                dm.clear(first, npages)


@dataclass
class Idev:
    id: int
    node: SimDevice
    hwpt: Hwpt | None = None
