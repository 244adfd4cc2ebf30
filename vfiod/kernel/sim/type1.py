"""The type1 IOMMU driver behind a container: info, DMA mappings and the DMA path of
simulated devices (docs/kernel-contract.md §3.6 - §3.8; dirty tracking in ``type1_dirty``).

Held to the kernel's checks and errno values:
* ``GET_INFO``: argsz >= 16, caps (two-call pattern) in the order MIGRATION, DMA_AVAIL,
  IOVA_RANGE; ``iova_pgsizes`` is PAGE_MASK for an emulated-IOMMU-only container and the
  hardware page sizes once an IOMMU-backed group is attached; no IOVA_RANGE cap (and no
  range check) without one.
* ``MAP_DMA``: argsz >= 32, known flags, READ/WRITE xor VADDR, size/iova/vaddr aligned to
  the minimum page size, no wrap, EEXIST on overlap, ENOSPC at ``dma_entry_limit``,
  EINVAL outside the IOVA ranges, ENOMEM past ``SimKernel.memlock_limit`` (None: the
  caller has CAP_IPC_LOCK).
  The memory behind ``vaddr`` is never touched: the real kernel pins it, we only record.
* ``UNMAP_DMA``: argsz >= 24 (+24 with GET_DIRTY_BITMAP, not combinable with ALL/VADDR),
  ALL needs iova = size = 0, v2 refuses to bisect a mapping (EINVAL), an empty range
  succeeds with size 0; ``size`` is written back with the bytes really unmapped. v1
  (VFIO_TYPE1_IOMMU) removes whole mappings that start inside the range.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import vfiod.abi.vfio as v
from vfiod.abi.layout import offsetofend
from vfiod.kernel.sim.base import copy_to_user, fail
from vfiod.kernel.sim.dirtymap import DirtyMap
from vfiod.kernel.sim.type1_dirty import (
    DIRTY_BITMAP_SIZE_MAX,
    UnmapBitmap,
    dirty_pages,
    unmap_dirty_bitmap,
)
from vfiod.kernel.sim.uaccess import U64_MAX, arg_view, chain_caps, copy_in, copy_out

if TYPE_CHECKING:
    from vfiod.kernel.ops import Buffer
    from vfiod.kernel.sim.group import SimGroup
    from vfiod.kernel.sim.kernel import SimKernel
    from vfiod.kernel.sim.node import SimDevice

PAGE_SIZE = 4096
#: type1's initial pgsize_bitmap: every power of two from 4 KiB up (emulated IOMMU).
PAGE_MASK64 = U64_MAX & ~(PAGE_SIZE - 1)


@dataclass(frozen=True)
class Type1Config:
    """Facts of the host's IOMMU that type1 reports (defaults: an Intel VT-d host)."""

    iommu_pgsizes: int = 0x40201000                     # 4 KiB | 2 MiB | 1 GiB
    iova_ranges: tuple[tuple[int, int], ...] = ((0, (1 << 48) - 1),)   # inclusive ends
    dma_entry_limit: int = 65535                        # vfio_iommu_type1 module param
    caps_align8: bool = True                            # 6.6+ pads capabilities to 8


@dataclass
class VfioDma:
    iova: int
    size: int
    vaddr: int
    flags: int
    charged: int = 0                   # bytes counted against RLIMIT_MEMLOCK
    vaddr_invalid: bool = False
    dirty: DirtyMap = field(default_factory=lambda: DirtyMap(0))

    @property
    def end(self) -> int:
        return self.iova + self.size


class Type1Iommu:
    """The IOMMU of one container (TYPE1 or TYPE1v2)."""

    def __init__(self, kernel: SimKernel, config: Type1Config, v2: bool, name: str) -> None:
        self.kernel = kernel
        self.config = config
        self.v2 = v2
        self.name = name
        self.groups: list[SimGroup] = []
        self.mappings: list[VfioDma] = []
        self._starts: list[int] = []
        self.tracking = False
        self.pinned: dict[int, int] = {}           # page iova -> pin count

    # -- groups and scope ------------------------------------------------------------------
    def attach(self, group: SimGroup) -> None:
        self.groups.append(group)

    def detach(self, group: SimGroup) -> None:
        self.groups.remove(group)

    def release(self) -> None:
        for m in self.mappings:
            self.kernel.locked_bytes -= m.charged
        self.mappings.clear()
        self._starts.clear()
        self.pinned.clear()
        self.tracking = False

    @property
    def all_dirty(self) -> bool:
        """Any IOMMU-backed (non-pinned-scope) group: type1 cannot see device writes and
        reports every mapped page dirty (docs/kernel-contract.md §3.9 scope rule)."""
        return any(g.kind == "pci" for g in self.groups)

    @property
    def pgsize_bitmap(self) -> int:
        return PAGE_MASK64 & (self.config.iommu_pgsizes if self.all_dirty else U64_MAX)

    @property
    def min_pgsize(self) -> int:
        bitmap = self.pgsize_bitmap
        return bitmap & -bitmap

    @property
    def iova_ranges(self) -> tuple[tuple[int, int], ...]:
        return self.config.iova_ranges if self.all_dirty else ()

    @property
    def dma_avail(self) -> int:
        return max(0, self.config.dma_entry_limit - len(self.mappings))

    # -- lookup ----------------------------------------------------------------------------
    def find(self, addr: int) -> VfioDma | None:
        """The mapping containing IOVA ``addr``."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self.mappings[i].iova <= addr < self.mappings[i].end:
            return self.mappings[i]
        return None

    def overlapping(self, lo: int, hi: int) -> list[VfioDma]:
        """Mappings intersecting [lo, hi), in IOVA order."""
        i = max(0, bisect.bisect_right(self._starts, lo) - 1)
        out = []
        while i < len(self.mappings) and self.mappings[i].iova < hi:
            if self.mappings[i].end > lo:
                out.append(self.mappings[i])
            i += 1
        return out

    def _insert(self, m: VfioDma) -> None:
        i = bisect.bisect_left(self._starts, m.iova)
        self._starts.insert(i, m.iova)
        self.mappings.insert(i, m)

    def remove(self, m: VfioDma) -> None:
        i = bisect.bisect_left(self._starts, m.iova)
        del self._starts[i]
        del self.mappings[i]
        self.kernel.locked_bytes -= m.charged
        m.dirty.release()

    # -- ioctls ----------------------------------------------------------------------------
    def ioctl(self, request: int, arg: int | Buffer, op: str) -> int:
        if request == v.VFIO_IOMMU_GET_INFO:
            return self._get_info(arg, op)
        if request == v.VFIO_IOMMU_MAP_DMA:
            return self._map(arg, op)
        if request == v.VFIO_IOMMU_UNMAP_DMA:
            return self._unmap(arg, op)
        if request == v.VFIO_IOMMU_DIRTY_PAGES:
            return dirty_pages(self, arg, op)
        raise fail(errno.ENOTTY, op, self.name, "not a type1 request")

    def _get_info(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        minsz = offsetofend(v.vfio_iommu_type1_info, "iova_pgsizes")
        info = copy_in(mv, v.vfio_iommu_type1_info, op, self.name, need=minsz)
        if info.argsz < minsz:
            raise fail(errno.EINVAL, op, self.name, f"argsz {info.argsz} < {minsz}")
        capsz = offsetofend(v.vfio_iommu_type1_info, "cap_offset")
        if info.argsz >= capsz:
            minsz = capsz
            info.cap_offset = 0
        info.flags = v.VFIO_IOMMU_INFO_PGSIZES
        info.iova_pgsizes = self.pgsize_bitmap
        base = ctypes.sizeof(v.vfio_iommu_type1_info)
        chain = chain_caps(self._caps(), base, self.config.caps_align8)
        info.flags |= v.VFIO_IOMMU_INFO_CAPS
        if info.argsz < base + len(chain):
            info.argsz = base + len(chain)
        else:
            copy_out(mv, chain, len(chain), op, self.name, offset=base)
            info.cap_offset = base
        copy_out(mv, info, minsz, op, self.name)
        return 0

    def _caps(self) -> list[bytes]:
        mig = v.vfio_iommu_type1_info_cap_migration(
            header=v.vfio_info_cap_header(id=v.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, version=1),
            flags=0, pgsize_bitmap=self.min_pgsize,
            max_dirty_bitmap_size=DIRTY_BITMAP_SIZE_MAX)
        avail = v.vfio_iommu_type1_info_dma_avail(
            header=v.vfio_info_cap_header(id=v.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, version=1),
            avail=self.dma_avail)
        caps = [bytes(mig), bytes(avail)]
        if self.iova_ranges:
            head = v.vfio_iommu_type1_info_cap_iova_range(
                header=v.vfio_info_cap_header(id=v.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
                                              version=1),
                nr_iovas=len(self.iova_ranges))
            body = b"".join(bytes(v.vfio_iova_range(start=s, end=e)) for s, e in self.iova_ranges)
            caps.append(bytes(head) + body)
        return caps

    def _map(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        minsz = offsetofend(v.vfio_iommu_type1_dma_map, "size")
        m = copy_in(mv, v.vfio_iommu_type1_dma_map, op, self.name, need=minsz)
        mask = v.VFIO_DMA_MAP_FLAG_READ | v.VFIO_DMA_MAP_FLAG_WRITE | v.VFIO_DMA_MAP_FLAG_VADDR
        if m.argsz < minsz or m.flags & ~mask:
            raise fail(errno.EINVAL, op, self.name, f"argsz {m.argsz}, flags {m.flags:#x}")
        prot = m.flags & (v.VFIO_DMA_MAP_FLAG_READ | v.VFIO_DMA_MAP_FLAG_WRITE)
        set_vaddr = bool(m.flags & v.VFIO_DMA_MAP_FLAG_VADDR)
        if bool(prot) == set_vaddr:
            raise fail(errno.EINVAL, op, self.name, "need READ/WRITE, or VADDR alone")
        iova, size, vaddr = m.iova, m.size, m.vaddr
        pg = self.min_pgsize
        if not size or (size | iova | vaddr) & (pg - 1):
            raise fail(errno.EINVAL, op, self.name,
                       f"iova {iova:#x} size {size:#x} vaddr {vaddr:#x} not {pg:#x}-aligned")
        if iova + size - 1 > U64_MAX or vaddr + size - 1 > U64_MAX:
            raise fail(errno.EINVAL, op, self.name, "iova or vaddr range wraps")
        hits = self.overlapping(iova, iova + size)
        if set_vaddr:
            if not hits:
                raise fail(errno.ENOENT, op, self.name, f"no mapping at {iova:#x}")
            d = hits[0]
            if not d.vaddr_invalid or d.iova != iova or d.size != size:
                raise fail(errno.EINVAL, op, self.name, "VADDR update must match one "
                           "whole mapping whose vaddr was invalidated")
            d.vaddr, d.vaddr_invalid = vaddr, False
            return 0
        if hits:
            raise fail(errno.EEXIST, op, self.name,
                       f"{iova:#x}+{size:#x} overlaps the mapping at {hits[0].iova:#x}")
        if not self.dma_avail:
            raise fail(errno.ENOSPC, op, self.name,
                       f"{self.config.dma_entry_limit} mappings: dma_entry_limit reached")
        if self.iova_ranges and not any(s <= iova and iova + size - 1 <= e
                                        for s, e in self.iova_ranges):
            raise fail(errno.EINVAL, op, self.name, f"{iova:#x}+{size:#x} is outside the "
                       "IOMMU's usable IOVA ranges")
        charge = size if self.all_dirty else 0     # emulated IOMMUs pin only on demand
        limit = self.kernel.memlock_limit
        if limit is not None and self.kernel.locked_bytes + charge > limit:
            raise fail(errno.ENOMEM, op, self.name, "RLIMIT_MEMLOCK exceeded")
        self.kernel.locked_bytes += charge
        dma = VfioDma(iova, size, vaddr, prot, charge, dirty=DirtyMap(size // pg))
        if self.tracking:
            dma.dirty.allocate()               # vfio_dma_bitmap_alloc of a new mapping
        self._insert(dma)
        return 0

    def _unmap(self, arg: int | Buffer, op: str) -> int:
        mv = arg_view(arg, op, self.name)
        minsz = offsetofend(v.vfio_iommu_type1_dma_unmap, "size")
        u = copy_in(mv, v.vfio_iommu_type1_dma_unmap, op, self.name, need=minsz)
        get_bitmap = v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
        unmap_all, inval = v.VFIO_DMA_UNMAP_FLAG_ALL, v.VFIO_DMA_UNMAP_FLAG_VADDR
        if u.argsz < minsz or u.flags & ~(get_bitmap | unmap_all | inval):
            raise fail(errno.EINVAL, op, self.name, f"argsz {u.argsz}, flags {u.flags:#x}")
        if u.flags & get_bitmap and u.flags & (unmap_all | inval):
            raise fail(errno.EINVAL, op, self.name, "GET_DIRTY_BITMAP with ALL or VADDR")
        bitmap: UnmapBitmap | None = None
        if u.flags & get_bitmap:
            bitmap = unmap_dirty_bitmap(self, mv, u, op)    # validates; returns the writer
        iova, size, pg = u.iova, u.size, self.min_pgsize
        if u.flags & unmap_all:
            if iova or size:
                raise fail(errno.EINVAL, op, self.name, "ALL needs iova = size = 0")
            size = U64_MAX - iova + 1
        elif iova & (pg - 1) or not size or size & (pg - 1) or iova + size - 1 > U64_MAX:
            raise fail(errno.EINVAL, op, self.name,
                       f"iova {iova:#x} size {size:#x}: zero, unaligned or wrapping")
        last = iova + size - 1
        if bitmap is not None and (not self.tracking or bitmap.pgsize != pg):
            raise fail(errno.EINVAL, op, self.name, "dirty tracking is not started, or "
                       f"bitmap pgsize {bitmap.pgsize:#x} is not the minimum {pg:#x}")
        if self.v2 and not u.flags & unmap_all:
            first, end = self.find(iova), self.find(last)
            if (first and first.iova != iova) or (end and end.end != last + 1):
                raise fail(errno.EINVAL, op, self.name,
                           f"{iova:#x}+{size:#x} bisects a mapping (type1v2)")
        unmapped = 0
        for d in self.overlapping(iova, last + 1):
            if not self.v2 and d.iova < iova:
                break                           # v1: a mapping starting before iova stops it
            if u.flags & inval:
                if d.vaddr_invalid:
                    raise fail(errno.EINVAL, op, self.name, f"vaddr at {d.iova:#x} is "
                               "already invalid")
                d.vaddr_invalid = True
                unmapped += d.size
                continue
            if bitmap is not None:
                bitmap(d, iova)
            unmapped += d.size
            self.remove(d)
        u.size = unmapped
        copy_out(mv, u, minsz, op, self.name)
        return 0

    # -- the device side -------------------------------------------------------------------
    def _covering(self, iova: int, length: int, op: str, device: str) -> list[VfioDma]:
        out, addr = [], iova
        while addr < iova + length:
            m = self.find(addr)
            if m is None or m.vaddr_invalid:
                raise fail(errno.EFAULT, op, device, f"IOVA {addr:#x} is not mapped")
            out.append(m)
            addr = m.end
        return out

    def dma_write(self, device: SimDevice, iova: int, length: int, data: bytes | None) -> None:
        op = f"DMA write {iova:#x}+{length:#x}"
        maps = self._covering(iova, length, op, device.name)
        for m in maps:
            if not m.flags & v.VFIO_DMA_MAP_FLAG_WRITE:
                raise fail(errno.EFAULT, op, device.name, f"mapping {m.iova:#x} is read-only")
        pg = self.min_pgsize
        for m in maps:
            lo, hi = max(iova, m.iova), min(iova + length, m.end)
            if data is not None:
                copy_to_user(m.vaddr + lo - m.iova, data[lo - iova:hi - iova], op)
            # Only an emulated device's write goes through vfio_dma_rw, which marks the
            # page; a physical device's DMA is invisible to type1.
            if self.tracking and device.kind == "mdev":
                first = (lo - m.iova) // pg
                m.dirty.mark(first, (hi - 1 - m.iova) // pg - first + 1)

    def pin(self, iova: int, length: int, pin: bool) -> None:
        op = "vfio_pin_pages" if pin else "vfio_unpin_pages"
        if not self.v2:
            raise fail(errno.EACCES, op, self.name, "pinning needs a TYPE1v2 container")
        if iova % PAGE_SIZE or length <= 0 or length % PAGE_SIZE:
            raise fail(errno.EINVAL, op, self.name, "unaligned page range")
        for page in range(iova, iova + length, PAGE_SIZE):
            if self.find(page) is None:
                raise fail(errno.EINVAL, op, self.name, f"IOVA {page:#x} is not mapped")
        pg = self.min_pgsize
        for page in range(iova, iova + length, PAGE_SIZE):
            if pin:
                self.pinned[page] = self.pinned.get(page, 0) + 1
                m = self.find(page)
                if self.tracking and m is not None:
                    m.dirty.mark((page - m.iova) // pg, 1)
            elif self.pinned.get(page, 0) > 0:
                self.pinned[page] -= 1
                if not self.pinned[page]:
                    del self.pinned[page]
            else:
                raise fail(errno.EINVAL, op, self.name, f"page {page:#x} is not pinned")

    def populate_pinned(self, m: VfioDma) -> None:
        """Re-mark the pinned pages of ``m`` (they count as dirty until unpinned)."""
        pg = self.min_pgsize
        for page in self.pinned:
            if m.iova <= page < m.end:
                m.dirty.mark((page - m.iova) // pg, 1)
