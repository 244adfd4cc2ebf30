"""A type1 VFIO container: ``/dev/vfio/vfio``, its IOMMU, DMA mappings and type1 dirty
tracking (docs/kernel-contract.md §3.1 steps 2, 5-6; §3.6-§3.9).

The container owns its groups (and through them their devices), so ``close()`` releases
fds in the only order the kernel accepts without EBUSY: devices, then groups (each
UNSET_CONTAINER once it has no device fds), then the container (docs/architecture.md §2).

Dirty bitmaps: the caller passes ranges that start and end on mapping boundaries (the
kernel refuses a range that bisects a mapping, §3.9); a range whose bitmap would exceed the
kernel's per-call limit is split here at mapping boundaries and reassembled.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import vfiod.abi.vfio as v
from vfiod.errors import KernelError
from vfiod.kernel.ops import KernelOps
from vfiod.vfio import bitmap as bm
from vfiod.vfio.call import OwnedFd, check_uint, ioctl
from vfiod.vfio.iommu_info import DIRTY_BITMAP_SIZE_MAX, IommuInfo, query_iommu_info
from vfiod.vfio.paths import HostPaths

if TYPE_CHECKING:
    from vfiod.vfio.group import Group

_IOMMU_NAMES = {v.VFIO_TYPE1_IOMMU: "VFIO_TYPE1_IOMMU", v.VFIO_TYPE1v2_IOMMU: "VFIO_TYPE1v2_IOMMU",
                v.VFIO_NOIOMMU_IOMMU: "VFIO_NOIOMMU_IOMMU"}


@dataclass(frozen=True)
class DmaMapping:
    """IOVA [iova, iova + size) mapped for device DMA onto guest-physical [gpa, gpa + size).

    The one mapping type of vfiod: ``Container.map_dma`` returns it and the dirty tracker
    takes it. ``vaddr`` is the process address the kernel pinned and ``flags`` the
    device-side permissions; a mapping that only describes the guest layout to the tracker
    has no ``vaddr``.
    """

    iova: int
    size: int
    gpa: int
    vaddr: int | None = None
    flags: int = v.VFIO_DMA_MAP_FLAG_READ | v.VFIO_DMA_MAP_FLAG_WRITE

    @property
    def end(self) -> int:
        return self.iova + self.size


class _UnmapWithBitmap(ctypes.Structure):
    """``vfio_iommu_type1_dma_unmap`` with its ``vfio_bitmap`` tail (48 bytes, §3.8)."""
    _fields_ = [("unmap", v.vfio_iommu_type1_dma_unmap), ("bitmap", v.vfio_bitmap)]


class _DirtyGet(ctypes.Structure):
    """``vfio_iommu_type1_dirty_bitmap`` + ``..._get`` (argsz 48, §3.9)."""
    _fields_ = [("head", v.vfio_iommu_type1_dirty_bitmap),
                ("get", v.vfio_iommu_type1_dirty_bitmap_get)]


class Container(OwnedFd):
    """One open container fd. Build with ``open`` (vfiod owns it) or ``adopt`` (a VMM
    handed the fd over the control socket). ``close`` closes its groups (and their
    devices) first."""

    def __init__(self, kernel: KernelOps, fd: int, name: str, iommu_type: int | None = None):
        super().__init__(kernel, fd, name)
        self.iommu_type = iommu_type
        self.groups: list[Group] = []
        self._maps: list[DmaMapping] = []      # sorted by iova
        self._info: IommuInfo | None = None

    # -- setup (§3.1) -----------------------------------------------------------------
    @classmethod
    def open(cls, kernel: KernelOps, paths: HostPaths | None = None) -> Container:
        """Open the container node and check it speaks VFIO API 0 with type1v2."""
        path = (paths or HostPaths()).vfio_container
        try:
            fd = kernel.open(path, os.O_RDWR)
        except KernelError as e:
            raise e.with_context(op=f"open({path})", target="VFIO container") from None
        c = cls(kernel, fd, f"container {path}")
        try:
            c._check_api()
        except BaseException:
            kernel.close(fd)
            raise
        return c

    @classmethod
    def adopt(cls, kernel: KernelOps, fd: int, iommu_type: int | None = None) -> Container:
        """Wrap a container fd received from a VMM; ``iommu_type`` if it is already set."""
        c = cls(kernel, fd, f"container fd {fd}", iommu_type)
        c._check_api()
        return c

    def _check_api(self) -> None:
        version = ioctl(self.kernel, self.fd, v.VFIO_GET_API_VERSION, 0,
                        "VFIO_GET_API_VERSION", self.name)
        if version != v.VFIO_API_VERSION:
            raise KernelError(errno.EPROTONOSUPPORT, "VFIO_GET_API_VERSION", self.name,
                              f"kernel speaks VFIO API {version}, vfiod needs "
                              f"{v.VFIO_API_VERSION}")
        if self.check_extension(v.VFIO_TYPE1v2_IOMMU) <= 0:
            raise KernelError(errno.ENODEV, "VFIO_CHECK_EXTENSION(VFIO_TYPE1v2_IOMMU)",
                              self.name, "the kernel offers no type1v2 IOMMU "
                              "(no IOMMU, or only no-IOMMU mode)")

    def check_extension(self, extension: int) -> int:
        """``VFIO_CHECK_EXTENSION``: > 0 if supported (the id travels by value)."""
        return ioctl(self.kernel, self.fd, v.VFIO_CHECK_EXTENSION, extension,
                     f"VFIO_CHECK_EXTENSION({_IOMMU_NAMES.get(extension, extension)})",
                     self.name)

    def set_iommu(self, iommu_type: int = v.VFIO_TYPE1v2_IOMMU) -> None:
        """``VFIO_SET_IOMMU``: allowed once, after at least one group is attached."""
        op = f"VFIO_SET_IOMMU({_IOMMU_NAMES.get(iommu_type, iommu_type)})"
        if self.iommu_type is not None:
            raise KernelError(errno.EINVAL, op, self.name,
                              f"IOMMU already set to {_IOMMU_NAMES.get(self.iommu_type)}")
        if not self.groups:
            raise KernelError(errno.EINVAL, op, self.name,
                              "attach a group (Group.set_container) before setting the IOMMU")
        ioctl(self.kernel, self.fd, v.VFIO_SET_IOMMU, iommu_type, op, self.name)
        self.iommu_type = iommu_type
        self._info = None

    def iommu_info(self, refresh: bool = True) -> IommuInfo:
        """``VFIO_IOMMU_GET_INFO`` (two calls when capabilities need a bigger buffer).
        ``refresh=False`` reuses the last answer (only ``dma_avail`` changes over time)."""
        if self._info is None or refresh:
            self._info = query_iommu_info(self.kernel, self.fd, self.name)
        return self._info

    # -- DMA mappings (§3.7, §3.8) ----------------------------------------------------
    @property
    def mappings(self) -> tuple[DmaMapping, ...]:
        return tuple(self._maps)

    def map_dma(self, iova: int, vaddr: int, size: int, readable: bool = True,
                writable: bool = True, *, gpa: int | None = None) -> DmaMapping:
        """``VFIO_IOMMU_MAP_DMA`` (device-side permissions); pins and charges memlock.
        ``gpa``: the guest-physical address of the memory (default ``iova``: vfiod maps a
        guest's RAM at IOVA = guest-physical address)."""
        check_uint("iova", iova), check_uint("vaddr", vaddr), check_uint("size", size)
        flags = (v.VFIO_DMA_MAP_FLAG_READ if readable else 0) | \
                (v.VFIO_DMA_MAP_FLAG_WRITE if writable else 0)
        arg = v.vfio_iommu_type1_dma_map(argsz=ctypes.sizeof(v.vfio_iommu_type1_dma_map),
                                         flags=flags, vaddr=vaddr, iova=iova, size=size)
        ioctl(self.kernel, self.fd, v.VFIO_IOMMU_MAP_DMA, arg,
              f"VFIO_IOMMU_MAP_DMA(iova {iova:#x}, size {size:#x})", self.name)
        m = DmaMapping(iova, size, iova if gpa is None else gpa, vaddr, flags)
        bisect.insort(self._maps, m, key=lambda x: x.iova)
        return m

    def know_mapping(self, m: DmaMapping) -> None:
        """Record a mapping the VMM that handed this container over made
        (docs/architecture.md §8.1): dirty queries split at it like at vfiod's own."""
        bisect.insort(self._maps, m, key=lambda x: x.iova)

    def unmap_dma(self, iova: int, size: int) -> int:
        """``VFIO_IOMMU_UNMAP_DMA``; returns the bytes the kernel unmapped (0 if the range
        held no mapping; a range bisecting a mapping is EINVAL)."""
        check_uint("iova", iova), check_uint("size", size)
        arg = v.vfio_iommu_type1_dma_unmap(
            argsz=ctypes.sizeof(v.vfio_iommu_type1_dma_unmap), flags=0, iova=iova, size=size)
        ioctl(self.kernel, self.fd, v.VFIO_IOMMU_UNMAP_DMA, arg,
              f"VFIO_IOMMU_UNMAP_DMA(iova {iova:#x}, size {size:#x})", self.name)
        self._forget(iova, size)
        return int(arg.size)

    def unmap_dma_get_dirty(self, iova: int, size: int, pgsize: int) -> bm.Bitmap:
        """Unmap and return the range's final dirty bitmap in one call, so an unmap during
        migration loses no dirty bits (GET_DIRTY_BITMAP flag, §3.8). Needs tracking on."""
        check_uint("iova", iova), check_uint("size", size), check_uint("pgsize", pgsize)
        op = f"VFIO_IOMMU_UNMAP_DMA(GET_DIRTY_BITMAP, iova {iova:#x}, size {size:#x})"
        if pgsize == 0:
            raise ValueError(f"{op}: pgsize must be the IOMMU page size, not 0")
        npages = bm.pages(size, pgsize)
        out = bm.prepare(None, npages, op)
        arg = _UnmapWithBitmap()
        arg.unmap.argsz = ctypes.sizeof(_UnmapWithBitmap)
        arg.unmap.flags = v.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
        arg.unmap.iova, arg.unmap.size = iova, size
        arg.bitmap.pgsize, arg.bitmap.size = pgsize, out.nbytes
        arg.bitmap.data = out.ctypes.data
        ioctl(self.kernel, self.fd, v.VFIO_IOMMU_UNMAP_DMA, arg, op, self.name)
        self._forget(iova, size)
        return out

    def _forget(self, iova: int, size: int) -> None:
        end = iova + size
        self._maps = [m for m in self._maps if not (m.iova >= iova and m.end <= end)]

    # -- type1 dirty tracking (§3.9) --------------------------------------------------
    def _dirty_flag(self, flag: int, name: str) -> None:
        arg = v.vfio_iommu_type1_dirty_bitmap(
            argsz=ctypes.sizeof(v.vfio_iommu_type1_dirty_bitmap), flags=flag)
        ioctl(self.kernel, self.fd, v.VFIO_IOMMU_DIRTY_PAGES, arg,
              f"VFIO_IOMMU_DIRTY_PAGES({name})", self.name)

    def dirty_start(self) -> None:
        self._dirty_flag(v.VFIO_IOMMU_DIRTY_PAGES_FLAG_START, "START")

    def dirty_stop(self) -> None:
        self._dirty_flag(v.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, "STOP")

    def max_dirty_bitmap_bytes(self) -> int:
        info = self.iommu_info(refresh=False)
        return info.dirty.max_dirty_bitmap_size if info.dirty else DIRTY_BITMAP_SIZE_MAX

    def dirty_get(self, iova: int, size: int, pgsize: int,
                  out: bm.Bitmap | None = None) -> bm.Bitmap:
        """Read-and-clear the dirty bits of [iova, iova+size) into a zeroed u64 bitmap
        (bit i = page iova + i*pgsize). ``out`` is reused if given.

        The kernel copies each mapping's bits over the caller's words (§3.9; the words a
        hole between mappings covers it leaves alone), so ``out`` is cleared first only
        when vfiod's mappings leave a hole in the range or a piece of a split query
        starts inside a word: at 4 TiB that clearing was 128 MiB of writes per sync."""
        check_uint("iova", iova), check_uint("size", size), check_uint("pgsize", pgsize)
        op = f"VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP, iova {iova:#x}, size {size:#x})"
        if pgsize == 0:
            raise ValueError(f"{op}: pgsize must be the IOMMU page size, not 0")
        npages = bm.pages(size, pgsize)
        chunks = self._dirty_chunks(iova, size, pgsize, op)
        written = self._covers(iova, size) and all(
            (c_iova - iova) // pgsize % 64 == 0 for c_iova, _ in chunks)
        result = bm.prepare(out, npages, op, clear=not written)
        for c_iova, c_size in chunks:
            bit_off = (c_iova - iova) // pgsize
            c_pages = bm.pages(c_size, pgsize)
            if bit_off % 64 == 0:
                # word-aligned: let the kernel write straight into the result
                view = result[bit_off // 64:bit_off // 64 + bm.words_for(c_pages)]
                self._get_bitmap(c_iova, c_size, pgsize, view, op)
            else:
                tmp = bm.prepare(None, c_pages, op)
                self._get_bitmap(c_iova, c_size, pgsize, tmp, op)
                bm.or_at(result, tmp, c_pages, bit_off)
        return result

    def _get_bitmap(self, iova: int, size: int, pgsize: int, buf: bm.Bitmap, op: str) -> None:
        arg = _DirtyGet()
        arg.head.argsz = ctypes.sizeof(_DirtyGet)
        arg.head.flags = v.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP
        arg.get.iova, arg.get.size = iova, size
        arg.get.bitmap.pgsize, arg.get.bitmap.size = pgsize, buf.nbytes
        arg.get.bitmap.data = buf.ctypes.data
        ioctl(self.kernel, self.fd, v.VFIO_IOMMU_DIRTY_PAGES, arg, op, self.name)

    def _covers(self, iova: int, size: int) -> bool:
        """Whether vfiod's mappings cover [iova, iova+size) without a hole."""
        at, end = iova, iova + size
        for m in self._maps:            # sorted by iova
            if m.end <= at:
                continue
            if m.iova > at:
                return False
            at = m.end
            if at >= end:
                return True
        return False

    def _dirty_chunks(self, iova: int, size: int, pgsize: int,
                      op: str) -> list[tuple[int, int]]:
        """Split [iova, iova+size) so each bitmap fits the kernel's limit, cutting only
        between mappings (never inside one). Ranges the kernel would reject anyway
        (misaligned, empty) go through unsplit so its errno reaches the caller."""
        max_span = self.max_dirty_bitmap_bytes() * 8 * pgsize
        if size <= max_span or size % pgsize or iova % pgsize:
            return [(iova, size)]
        end = iova + size
        maps = [m for m in self._maps if m.end > iova and m.iova < end]
        if not maps:
            raise ValueError(f"{op}: a {size:#x}-byte range needs more than one bitmap "
                             f"(limit {max_span:#x} bytes of IOVA) and vfiod knows no "
                             "mappings in it to split at")
        chunks: list[tuple[int, int]] = []
        start = max(maps[0].iova, iova)
        last_end = start
        for m in maps:
            m_end = min(m.end, end)
            if m_end - start > max_span:
                if last_end > start:
                    chunks.append((start, last_end - start))
                start = max(m.iova, iova)
                if m_end - start > max_span:
                    raise ValueError(f"{op}: mapping at {m.iova:#x} ({m.size:#x} bytes) is "
                                     f"larger than one dirty bitmap covers ({max_span:#x})")
            last_end = m_end
        chunks.append((start, last_end - start))
        return chunks

    # -- teardown ---------------------------------------------------------------------
    def _close_members(self) -> KernelError | None:
        """Each group closes its devices, then itself, before the container fd goes."""
        first: KernelError | None = None
        for g in list(self.groups):
            try:
                g.close()
            except KernelError as e:
                first = first or e
        self.groups.clear()
        self._maps.clear()
        return first
