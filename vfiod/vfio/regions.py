"""``VFIO_DEVICE_GET_REGION_INFO`` and ``VFIO_DEVICE_GET_IRQ_INFO``, decoded
(docs/kernel-contract.md §3.3, §3.4).

Region info uses the two-call pattern: with the fixed 32-byte struct the kernel reports
``flags |= CAPS``, leaves ``cap_offset`` 0 and raises ``argsz`` when the capabilities do not
fit, and still succeeds; the second call with that ``argsz`` returns the chain. Decoded
here: sparse-mmap areas (only those sub-ranges may be mmapped) and the region type/subtype
(how device-specific regions such as the v1 migration region are found).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import vfiod.abi.vfio as v
from vfiod.kernel.ops import KernelOps
from vfiod.vfio.call import caps_of, ioctl, struct_at, tail_at


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: int
    size: int                    # 0: region not implemented
    offset: int                  # file offset in the device fd; use verbatim (§3.4)
    sparse: tuple[tuple[int, int], ...] | None = None    # (offset, size) mmappable areas
    type: int | None = None
    subtype: int | None = None
    msix_mappable: bool = False
    cap_ids: tuple[int, ...] = ()

    @property
    def readable(self) -> bool:
        return bool(self.flags & v.VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & v.VFIO_REGION_INFO_FLAG_WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & v.VFIO_REGION_INFO_FLAG_MMAP)

    def mmap_areas(self) -> tuple[tuple[int, int], ...]:
        """Ranges (offset in region, size) that may be mmapped: the sparse list if the
        kernel gave one, else the whole region if MMAP is set, else none."""
        if not self.mmappable:
            return ()
        if self.sparse is not None:
            return self.sparse
        return ((0, self.size),)


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: int                   # VFIO_IRQ_INFO_*
    count: int


def query_region_info(kernel: KernelOps, fd: int, index: int, target: str) -> RegionInfo:
    op = f"VFIO_DEVICE_GET_REGION_INFO(index {index})"
    fixed = ctypes.sizeof(v.vfio_region_info)
    first = v.vfio_region_info(argsz=fixed, index=index)
    ioctl(kernel, fd, v.VFIO_DEVICE_GET_REGION_INFO, first, op, target)
    if first.argsz <= fixed:
        return RegionInfo(index, first.flags, first.size, first.offset)
    # second call: a buffer as large as the kernel asked for
    buf = bytearray(first.argsz)
    head = v.vfio_region_info.from_buffer(buf)
    head.argsz, head.index = first.argsz, index
    ioctl(kernel, fd, v.VFIO_DEVICE_GET_REGION_INFO, buf, op, target)
    flags, size, offset, cap_offset = head.flags, head.size, head.offset, head.cap_offset
    del head
    data = bytes(buf)
    if not flags & v.VFIO_REGION_INFO_FLAG_CAPS:
        cap_offset = 0
    sparse: tuple[tuple[int, int], ...] | None = None
    rtype = rsub = None
    msix = False
    caps = caps_of(data, cap_offset, fixed, op, target)
    for cap_id, _version, off in caps:
        if cap_id == v.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
            cap_t = v.vfio_region_info_cap_sparse_mmap
            cap = struct_at(cap_t, data, off, op, target)
            sparse = tuple((a.offset, a.size)
                           for a in tail_at(cap_t, data, cap.nr_areas, off, op, target))
        elif cap_id == v.VFIO_REGION_INFO_CAP_TYPE:
            t = struct_at(v.vfio_region_info_cap_type, data, off, op, target)
            rtype, rsub = t.type, t.subtype
        elif cap_id == v.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
            msix = True
        # others (NVLINK2, newer ids) are not used by vfiod
    return RegionInfo(index, flags, size, offset, sparse, rtype, rsub, msix,
                      tuple(c[0] for c in caps))


def query_irq_info(kernel: KernelOps, fd: int, index: int, target: str) -> IrqInfo:
    arg = v.vfio_irq_info(argsz=ctypes.sizeof(v.vfio_irq_info), index=index)
    ioctl(kernel, fd, v.VFIO_DEVICE_GET_IRQ_INFO, arg,
          f"VFIO_DEVICE_GET_IRQ_INFO(index {index})", target)
    return IrqInfo(index, arg.flags, arg.count)
