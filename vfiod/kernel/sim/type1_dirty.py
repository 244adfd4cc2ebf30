"""Type1 dirty-page tracking: ``VFIO_IOMMU_DIRTY_PAGES`` and the dirty bitmap of
``VFIO_IOMMU_UNMAP_DMA`` (docs/kernel-contract.md §3.8 - §3.9).

Validation order and errno values are the kernel's: TYPE1 (v1) container → EACCES first;
argsz < 8 or unknown flags → EINVAL; not exactly one flag → EINVAL. GET_BITMAP: argsz must
cover the 40-byte ``vfio_iommu_type1_dirty_bitmap_get``; no wrap; the bitmap pointer must
be a user address; ``verify_bitmap_size`` (pages > 0, 0 < bitmap bytes <= 2**28, bytes >=
ceil(pages/64)*8); pgsize must be the minimum IOMMU page size; iova/size aligned to it,
size > 0; tracking started; the range must not bisect a mapping. All EINVAL.

Semantics: START gives every mapping a (clean) bitmap and re-marks pinned pages, MAP_DMA
while tracking gives the new mapping one, STOP and unmap free them; repeat START/STOP are
no-op successes. The bitmaps are kept between queries, as the kernel's are: each GET
writes every mapping inside the range, then clears its bitmap in place and re-marks
pinned pages. Scope (``Type1Iommu.all_dirty``): with any
IOMMU-backed group every page of every mapping is dirty on every GET; with only
emulated-IOMMU groups, pages written through ``dma_write`` since the last GET plus pinned
pages. The writing itself is ``dirtymap.type1_copy_to_user``: one memset or memmove per
mapping (a memset and the few marked words for a sparse one), so a full sync of a 1 TiB
guest costs one pass over its 32 MiB bitmap.
"""

from __future__ import annotations

import ctypes
import errno
from typing import TYPE_CHECKING

import vfiod.abi.vfio as v
from vfiod.kernel.sim.base import fail
from vfiod.kernel.sim.dirtymap import type1_copy_to_user, words_for
from vfiod.kernel.sim.uaccess import U64_MAX, arg_view, copy_in, user_range_ok

if TYPE_CHECKING:
    from vfiod.kernel.ops import Buffer
    from vfiod.kernel.sim.type1 import Type1Iommu, VfioDma

#: DIRTY_BITMAP_SIZE_MAX: bytes of bitmap one dirty query may ask for (also reported as
#: max_dirty_bitmap_size in the MIGRATION capability).
DIRTY_BITMAP_SIZE_MAX = 1 << 28

_FLAGS = (v.VFIO_IOMMU_DIRTY_PAGES_FLAG_START | v.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
          | v.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP)


def _verify_bitmap_size(npages: int, bitmap_size: int, op: str, name: str) -> None:
    if (not npages or not bitmap_size or bitmap_size > DIRTY_BITMAP_SIZE_MAX
            or bitmap_size < words_for(npages) * 8):
        raise fail(errno.EINVAL, op, name, f"bitmap of {bitmap_size} bytes for {npages} "
                   f"pages (needs {words_for(npages) * 8}, at most {DIRTY_BITMAP_SIZE_MAX})")


def _pgshift(pgsize: int, op: str, name: str) -> int:
    if pgsize <= 0:
        raise fail(errno.EINVAL, op, name, "bitmap pgsize 0")
    return (pgsize & -pgsize).bit_length() - 1          # __ffs


def write_mapping(iommu: Type1Iommu, m: VfioDma, data: int, base_iova: int, op: str) -> None:
    """Write ``m``'s bits into the user bitmap at ``data`` (bit 0 = ``base_iova``), then
    clear them and re-mark its pinned pages (read-and-clear)."""
    pg = iommu.min_pgsize
    type1_copy_to_user(data, (m.iova - base_iova) // pg, m.size // pg, m.dirty,
                       iommu.all_dirty, op)         # and clears m.dirty
    if iommu.pinned:
        iommu.populate_pinned(m)


class UnmapBitmap:
    """The validated ``vfio_bitmap`` of an UNMAP_DMA with GET_DIRTY_BITMAP."""

    def __init__(self, iommu: Type1Iommu, pgsize: int, data: int, op: str) -> None:
        self.iommu = iommu
        self.pgsize = pgsize
        self.data = data
        self.op = op

    def __call__(self, m: VfioDma, base_iova: int) -> None:
        write_mapping(self.iommu, m, self.data, base_iova, self.op)


def unmap_dirty_bitmap(iommu: Type1Iommu, mv: memoryview,
                       unmap: v.vfio_iommu_type1_dma_unmap, op: str) -> UnmapBitmap:
    """The ioctl-level checks of UNMAP_DMA's bitmap (before any unmapping)."""
    minsz = ctypes.sizeof(v.vfio_iommu_type1_dma_unmap)
    if unmap.argsz < minsz + ctypes.sizeof(v.vfio_bitmap):
        raise fail(errno.EINVAL, op, iommu.name,
                   f"argsz {unmap.argsz} has no room for a vfio_bitmap")
    bm = copy_in(mv, v.vfio_bitmap, op, iommu.name, offset=minsz)
    if not user_range_ok(bm.data, bm.size):
        raise fail(errno.EINVAL, op, iommu.name, f"bitmap {bm.data:#x}+{bm.size} is not "
                   "user memory")
    _verify_bitmap_size(unmap.size >> _pgshift(bm.pgsize, op, iommu.name), bm.size, op,
                        iommu.name)
    return UnmapBitmap(iommu, bm.pgsize, bm.data, op)


def dirty_pages(iommu: Type1Iommu, arg: int | Buffer, op: str) -> int:
    name = iommu.name
    if not iommu.v2:
        raise fail(errno.EACCES, op, name, "dirty tracking needs a TYPE1v2 container")
    mv = arg_view(arg, op, name)
    minsz = ctypes.sizeof(v.vfio_iommu_type1_dirty_bitmap)
    d = copy_in(mv, v.vfio_iommu_type1_dirty_bitmap, op, name, need=minsz)
    if d.argsz < minsz or d.flags & ~_FLAGS:
        raise fail(errno.EINVAL, op, name, f"argsz {d.argsz}, flags {d.flags:#x}")
    if not d.flags or d.flags & (d.flags - 1):
        raise fail(errno.EINVAL, op, name, f"flags {d.flags:#x}: exactly one of START, "
                   "STOP, GET_BITMAP per call")
    if d.flags & v.VFIO_IOMMU_DIRTY_PAGES_FLAG_START:
        if not iommu.tracking:
            for m in iommu.mappings:
                m.dirty.allocate()
                iommu.populate_pinned(m)
            iommu.tracking = True
        return 0
    if d.flags & v.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP:
        if iommu.tracking:
            iommu.tracking = False
            for m in iommu.mappings:
                m.dirty.release()
        return 0
    return _get_bitmap(iommu, mv, d.argsz, op)


def _get_bitmap(iommu: Type1Iommu, mv: memoryview, argsz: int, op: str) -> int:
    name = iommu.name
    minsz = ctypes.sizeof(v.vfio_iommu_type1_dirty_bitmap)
    if argsz - minsz < ctypes.sizeof(v.vfio_iommu_type1_dirty_bitmap_get):
        raise fail(errno.EINVAL, op, name, f"argsz {argsz} < 48 (header + "
                   "vfio_iommu_type1_dirty_bitmap_get)")
    r = copy_in(mv, v.vfio_iommu_type1_dirty_bitmap_get, op, name, offset=minsz)
    bm = r.bitmap
    if r.iova + r.size > U64_MAX + 1:
        raise fail(errno.EINVAL, op, name, f"{r.iova:#x}+{r.size:#x} wraps")
    if not user_range_ok(bm.data, bm.size):
        raise fail(errno.EINVAL, op, name, f"bitmap {bm.data:#x}+{bm.size} is not user memory")
    _verify_bitmap_size(r.size >> _pgshift(bm.pgsize, op, name), bm.size, op, name)
    pg = iommu.min_pgsize
    if bm.pgsize != pg:
        raise fail(errno.EINVAL, op, name, f"pgsize {bm.pgsize:#x}: only the minimum IOMMU "
                   f"page size {pg:#x} is accepted")
    if r.iova & (pg - 1) or not r.size or r.size & (pg - 1):
        raise fail(errno.EINVAL, op, name, f"{r.iova:#x}+{r.size:#x} not {pg:#x}-aligned")
    if not iommu.tracking:
        raise fail(errno.EINVAL, op, name, "dirty tracking is not started")
    last = r.iova + r.size - 1
    first_m, last_m = iommu.find(r.iova), iommu.find(last)
    if (first_m and first_m.iova != r.iova) or (last_m and last_m.end != last + 1):
        raise fail(errno.EINVAL, op, name, f"{r.iova:#x}+{r.size:#x} bisects a mapping")
    for m in iommu.overlapping(r.iova, last + 1):
        write_mapping(iommu, m, bm.data, r.iova, op)
    return 0
