"""``/dev/iommu``: IOAS mappings, hardware info, HWPT allocation and HWPT dirty tracking
(docs/kernel-contract.md §4.1 steps 2, 4-5, 7; structs §4.3; dirty semantics §4.4).

The path vfiod uses for IOMMU-side dirty tracking on 6.7+ kernels: bind a cdev
(``vfiod.vfio.cdev``), allocate an IOAS, check ``IOMMU_HW_CAP_DIRTY_TRACKING``, allocate a
HWPT with ``IOMMU_HWPT_ALLOC_DIRTY_TRACKING`` over the IOAS, attach the device to it, map
memory, enable tracking, read bitmaps, disable, destroy. Every struct is zero-filled:
iommufd rejects non-zero bytes it does not understand (E2BIG).
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from typing import TypeVar

import vfiod.abi.iommufd as iu
from vfiod.errors import KernelError
from vfiod.kernel.ops import Buffer, KernelOps
from vfiod.vfio import bitmap as bm
from vfiod.vfio.call import U64_MAX, OwnedFd, check_uint, ioctl
from vfiod.vfio.paths import HostPaths


@dataclass(frozen=True)
class HwInfo:
    """``IOMMU_GET_HW_INFO`` for one bound device."""

    data_type: int              # IOMMU_HW_INFO_TYPE_*
    capabilities: int           # IOMMU_HW_CAP_*

    @property
    def dirty_tracking(self) -> bool:
        return bool(self.capabilities & iu.IOMMU_HW_CAP_DIRTY_TRACKING)


S = TypeVar("S", bound=ctypes.Structure)


def _new(struct_type: type[S], **fields: int) -> S:
    s = struct_type()            # ctypes zero-fills, so reserved bytes are 0
    s.size = ctypes.sizeof(struct_type)
    for k, val in fields.items():
        setattr(s, k, val)
    return s


class Iommufd(OwnedFd):
    """An open ``/dev/iommu``. Closing it destroys every object it still holds: close the
    cdevs bound to it first."""

    @classmethod
    def open(cls, kernel: KernelOps, paths: HostPaths | None = None) -> Iommufd:
        path = (paths or HostPaths()).iommufd
        try:
            fd = kernel.open(path, os.O_RDWR)
        except KernelError as e:
            detail = ("no iommufd: kernel built without CONFIG_IOMMUFD?"
                      if e.errno == errno.ENOENT else e.detail)
            raise KernelError(e.errno or errno.EIO, f"open({path})", "iommufd",
                              detail) from None
        return cls(kernel, fd, f"iommufd {path}")

    def _call(self, request: int, arg: Buffer, op: str) -> None:
        ioctl(self.kernel, self.fd, request, arg, op, self.name)

    # -- objects ------------------------------------------------------------------------
    def destroy(self, obj_id: int) -> None:
        """``IOMMU_DESTROY`` an IOAS or HWPT (EBUSY while a device is attached to it)."""
        self._call(iu.IOMMU_DESTROY, _new(iu.iommu_destroy, id=obj_id),
                   f"IOMMU_DESTROY({obj_id})")

    def ioas_alloc(self) -> int:
        arg = _new(iu.iommu_ioas_alloc)
        self._call(iu.IOMMU_IOAS_ALLOC, arg, "IOMMU_IOAS_ALLOC")
        return int(arg.out_ioas_id)

    def ioas_iova_ranges(self, ioas_id: int,
                         capacity: int = 8) -> tuple[tuple[tuple[int, int], ...], int]:
        """(allowed (start, last inclusive) ranges, IOVA alignment); retries with the
        count the kernel asked for when ``capacity`` entries were too few (EMSGSIZE)."""
        while True:
            arr = (iu.iommu_iova_range * capacity)()
            arg = _new(iu.iommu_ioas_iova_ranges, ioas_id=ioas_id, num_iovas=capacity,
                       allowed_iovas=ctypes.addressof(arr))
            try:
                self._call(iu.IOMMU_IOAS_IOVA_RANGES, arg, f"IOMMU_IOAS_IOVA_RANGES({ioas_id})")
            except KernelError as e:
                n = int(arg.num_iovas)
                if e.errno == errno.EMSGSIZE and n > capacity:
                    capacity = n
                    continue
                raise
            n = int(arg.num_iovas)
            return (tuple((r.start, r.last) for r in arr[:n]),
                    int(arg.out_iova_alignment))

    def ioas_map(self, ioas_id: int, user_va: int, length: int, iova: int | None = None,
                 readable: bool = True, writable: bool = True) -> int:
        """``IOMMU_IOAS_MAP``: at ``iova`` (FIXED_IOVA) or where the kernel chooses;
        returns the IOVA. ENOMEM: RLIMIT_MEMLOCK exceeded."""
        check_uint("user_va", user_va), check_uint("length", length)
        flags = (iu.IOMMU_IOAS_MAP_READABLE if readable else 0) | \
                (iu.IOMMU_IOAS_MAP_WRITEABLE if writable else 0)
        if iova is not None:
            flags |= iu.IOMMU_IOAS_MAP_FIXED_IOVA
        arg = _new(iu.iommu_ioas_map, flags=flags, ioas_id=ioas_id, user_va=user_va,
                   length=length, iova=check_uint("iova", iova or 0))
        where = f"iova {iova:#x}" if iova is not None else "any iova"
        self._call(iu.IOMMU_IOAS_MAP, arg, f"IOMMU_IOAS_MAP({where}, length {length:#x})")
        return int(arg.iova)

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        """``IOMMU_IOAS_UNMAP`` whole prior mappings; returns bytes unmapped. Use
        ``iova=0, length=U64_MAX`` for everything."""
        check_uint("iova", iova), check_uint("length", length)
        arg = _new(iu.iommu_ioas_unmap, ioas_id=ioas_id, iova=iova, length=length)
        what = "all" if (iova, length) == (0, U64_MAX) else f"iova {iova:#x}, length {length:#x}"
        self._call(iu.IOMMU_IOAS_UNMAP, arg, f"IOMMU_IOAS_UNMAP({what})")
        return int(arg.length)

    # -- hardware info and HWPT (6.6+/6.7+) ---------------------------------------------
    def hw_info(self, dev_id: int) -> HwInfo:
        """``IOMMU_GET_HW_INFO`` with no driver data buffer (data_len 0 is allowed)."""
        arg = _new(iu.iommu_hw_info, dev_id=dev_id)
        self._call(iu.IOMMU_GET_HW_INFO, arg, f"IOMMU_GET_HW_INFO(dev {dev_id})")
        return HwInfo(int(arg.out_data_type),
                      int(arg.out_capabilities))

    def hwpt_alloc(self, dev_id: int, pt_id: int, dirty_tracking: bool = True) -> int:
        """``IOMMU_HWPT_ALLOC`` over IOAS ``pt_id`` for ``dev_id``; EOPNOTSUPP when the
        device's IOMMU cannot track dirty pages."""
        flags = iu.IOMMU_HWPT_ALLOC_DIRTY_TRACKING if dirty_tracking else 0
        arg = _new(iu.iommu_hwpt_alloc, flags=flags, dev_id=dev_id, pt_id=pt_id,
                   data_type=iu.IOMMU_HWPT_DATA_NONE)
        suffix = ", DIRTY_TRACKING" if dirty_tracking else ""
        self._call(iu.IOMMU_HWPT_ALLOC, arg, f"IOMMU_HWPT_ALLOC(dev {dev_id}, pt {pt_id}{suffix})")
        return int(arg.out_hwpt_id)

    def set_dirty_tracking(self, hwpt_id: int, enable: bool) -> None:
        """Enable (clears stale dirty bits first, §4.4) or disable HWPT dirty tracking."""
        arg = _new(iu.iommu_hwpt_set_dirty_tracking, hwpt_id=hwpt_id,
                   flags=iu.IOMMU_HWPT_DIRTY_TRACKING_ENABLE if enable else 0)
        self._call(iu.IOMMU_HWPT_SET_DIRTY_TRACKING, arg,
                   f"IOMMU_HWPT_SET_DIRTY_TRACKING(hwpt {hwpt_id}, "
                   f"{'ENABLE' if enable else 'DISABLE'})")

    def get_dirty_bitmap(self, hwpt_id: int, iova: int, length: int, page_size: int,
                         out: bm.Bitmap | None = None, no_clear: bool = False) -> bm.Bitmap:
        """Dirty bits of [iova, iova+length) into a zeroed bitmap (bit n = page
        iova + n*page_size). ``no_clear`` leaves them set: only before unmapping it."""
        check_uint("iova", iova), check_uint("length", length)
        check_uint("page_size", page_size)
        op = (f"IOMMU_HWPT_GET_DIRTY_BITMAP(hwpt {hwpt_id}, iova {iova:#x}, "
              f"length {length:#x}{', NO_CLEAR' if no_clear else ''})")
        if page_size == 0:
            raise ValueError(f"{op} on {self.name}: page_size must be non-zero")
        result = bm.prepare(out, bm.pages(length, page_size), op)
        arg = _new(iu.iommu_hwpt_get_dirty_bitmap, hwpt_id=hwpt_id, iova=iova, length=length,
                   page_size=page_size, data=result.ctypes.data,
                   flags=iu.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR if no_clear else 0)
        self._call(iu.IOMMU_HWPT_GET_DIRTY_BITMAP, arg, op)
        return result
