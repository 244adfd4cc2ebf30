"""ctypes mirrors of <linux/iommufd.h> as far as vfiod uses iommufd: IOAS management,
HWPT allocation, hardware info and HWPT dirty tracking (docs/kernel-contract.md §2, §4.3, §4.4).

Layouts are those of the Linux 6.12 uAPI header: ``iommu_hwpt_alloc`` is 48 bytes
(``fault_id`` appended in 6.11) and ``iommu_hw_info`` 40 bytes (``out_max_pasid_log2``
in what used to be reserved bytes). iommufd copies ``min(size, what it knows)`` and
rejects non-zero bytes it does not understand with E2BIG, so zero the whole struct.
No iommufd.h exists in the 6.1 system headers; tests/abi checks these against 6.12.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

from vfiod.abi.ioctl import IOMMUFD_CMD_BASE, IOMMUFD_TYPE, iommufd_io  # noqa: F401

IOMMUFD_CMD_DESTROY = IOMMUFD_CMD_BASE
IOMMUFD_CMD_IOAS_ALLOC = 0x81
IOMMUFD_CMD_IOAS_ALLOW_IOVAS = 0x82
IOMMUFD_CMD_IOAS_COPY = 0x83
IOMMUFD_CMD_IOAS_IOVA_RANGES = 0x84
IOMMUFD_CMD_IOAS_MAP = 0x85
IOMMUFD_CMD_IOAS_UNMAP = 0x86
IOMMUFD_CMD_OPTION = 0x87
IOMMUFD_CMD_VFIO_IOAS = 0x88
IOMMUFD_CMD_HWPT_ALLOC = 0x89              # 6.6+
IOMMUFD_CMD_GET_HW_INFO = 0x8A             # 6.6+
IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING = 0x8B  # 6.7+
IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP = 0x8C   # 6.7+

IOMMU_DESTROY = iommufd_io(IOMMUFD_CMD_DESTROY)
IOMMU_IOAS_ALLOC = iommufd_io(IOMMUFD_CMD_IOAS_ALLOC)
IOMMU_IOAS_ALLOW_IOVAS = iommufd_io(IOMMUFD_CMD_IOAS_ALLOW_IOVAS)
IOMMU_IOAS_COPY = iommufd_io(IOMMUFD_CMD_IOAS_COPY)
IOMMU_IOAS_IOVA_RANGES = iommufd_io(IOMMUFD_CMD_IOAS_IOVA_RANGES)
IOMMU_IOAS_MAP = iommufd_io(IOMMUFD_CMD_IOAS_MAP)
IOMMU_IOAS_UNMAP = iommufd_io(IOMMUFD_CMD_IOAS_UNMAP)
IOMMU_OPTION = iommufd_io(IOMMUFD_CMD_OPTION)
IOMMU_VFIO_IOAS = iommufd_io(IOMMUFD_CMD_VFIO_IOAS)
IOMMU_HWPT_ALLOC = iommufd_io(IOMMUFD_CMD_HWPT_ALLOC)
IOMMU_GET_HW_INFO = iommufd_io(IOMMUFD_CMD_GET_HW_INFO)
IOMMU_HWPT_SET_DIRTY_TRACKING = iommufd_io(IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING)
IOMMU_HWPT_GET_DIRTY_BITMAP = iommufd_io(IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP)


class iommu_destroy(ctypes.Structure):
    _fields_ = [("size", c_uint32), ("id", c_uint32)]


class iommu_ioas_alloc(ctypes.Structure):
    _fields_ = [("size", c_uint32), ("flags", c_uint32), ("out_ioas_id", c_uint32)]


class iommu_iova_range(ctypes.Structure):
    """``last`` is inclusive."""
    _fields_ = [("start", c_uint64), ("last", c_uint64)]


class iommu_ioas_iova_ranges(ctypes.Structure):
    """``allowed_iovas`` is the address of an iommu_iova_range array of ``num_iovas``
    entries (in: capacity, out: count; EMSGSIZE if too small)."""
    _fields_ = [("size", c_uint32), ("ioas_id", c_uint32), ("num_iovas", c_uint32),
                ("__reserved", c_uint32), ("allowed_iovas", c_uint64),
                ("out_iova_alignment", c_uint64)]


class iommu_ioas_allow_iovas(ctypes.Structure):
    _fields_ = [("size", c_uint32), ("ioas_id", c_uint32), ("num_iovas", c_uint32),
                ("__reserved", c_uint32), ("allowed_iovas", c_uint64)]


IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2


class iommu_ioas_map(ctypes.Structure):
    """``iova`` is an input with FIXED_IOVA, else an output."""
    _fields_ = [("size", c_uint32), ("flags", c_uint32), ("ioas_id", c_uint32),
                ("__reserved", c_uint32), ("user_va", c_uint64), ("length", c_uint64),
                ("iova", c_uint64)]


class iommu_ioas_copy(ctypes.Structure):
    _fields_ = [("size", c_uint32), ("flags", c_uint32), ("dst_ioas_id", c_uint32),
                ("src_ioas_id", c_uint32), ("length", c_uint64), ("dst_iova", c_uint64),
                ("src_iova", c_uint64)]


class iommu_ioas_unmap(ctypes.Structure):
    """iova 0 with length U64_MAX unmaps everything; ``length`` is in/out."""
    _fields_ = [("size", c_uint32), ("ioas_id", c_uint32), ("iova", c_uint64),
                ("length", c_uint64)]


IOMMU_OPTION_RLIMIT_MODE = 0
IOMMU_OPTION_HUGE_PAGES = 1
IOMMU_OPTION_OP_SET = 0
IOMMU_OPTION_OP_GET = 1


class iommu_option(ctypes.Structure):
    _fields_ = [("size", c_uint32), ("option_id", c_uint32), ("op", c_uint16),
                ("__reserved", c_uint16), ("object_id", c_uint32), ("val64", c_uint64)]


IOMMU_VFIO_IOAS_GET = 0
IOMMU_VFIO_IOAS_SET = 1
IOMMU_VFIO_IOAS_CLEAR = 2


class iommu_vfio_ioas(ctypes.Structure):
    _fields_ = [("size", c_uint32), ("ioas_id", c_uint32), ("op", c_uint16),
                ("__reserved", c_uint16)]


IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1   # 6.7+
IOMMU_HWPT_FAULT_ID_VALID = 1 << 2         # 6.11+
IOMMU_HWPT_DATA_NONE = 0


class iommu_hwpt_alloc(ctypes.Structure):
    _fields_ = [("size", c_uint32), ("flags", c_uint32), ("dev_id", c_uint32),
                ("pt_id", c_uint32), ("out_hwpt_id", c_uint32), ("__reserved", c_uint32),
                ("data_type", c_uint32), ("data_len", c_uint32), ("data_uptr", c_uint64),
                ("fault_id", c_uint32), ("__reserved2", c_uint32)]


IOMMU_HW_INFO_TYPE_NONE = 0
IOMMU_HW_INFO_TYPE_INTEL_VTD = 1
IOMMU_HW_CAP_DIRTY_TRACKING = 1 << 0       # 6.7+


class iommu_hw_info(ctypes.Structure):
    _fields_ = [("size", c_uint32), ("flags", c_uint32), ("dev_id", c_uint32),
                ("data_len", c_uint32), ("data_uptr", c_uint64),
                ("out_data_type", c_uint32), ("out_max_pasid_log2", c_uint8),
                ("__reserved", c_uint8 * 3), ("out_capabilities", c_uint64)]


IOMMU_HWPT_DIRTY_TRACKING_ENABLE = 1


class iommu_hwpt_set_dirty_tracking(ctypes.Structure):
    """``flags`` = ENABLE to start, 0 to stop. Enabling clears stale dirty bits (§4.4)."""
    _fields_ = [("size", c_uint32), ("flags", c_uint32), ("hwpt_id", c_uint32),
                ("__reserved", c_uint32)]


IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR = 1


class iommu_hwpt_get_dirty_bitmap(ctypes.Structure):
    """``data`` is the address of a zeroed u64 bitmap; bit n covers iova + n*page_size."""
    _fields_ = [("size", c_uint32), ("hwpt_id", c_uint32), ("flags", c_uint32),
                ("__reserved", c_uint32), ("iova", c_uint64), ("length", c_uint64),
                ("page_size", c_uint64), ("data", c_uint64)]


IOMMUFD_IOCTLS: dict[int, str] = {
    IOMMU_DESTROY: "IOMMU_DESTROY",
    IOMMU_IOAS_ALLOC: "IOMMU_IOAS_ALLOC",
    IOMMU_IOAS_ALLOW_IOVAS: "IOMMU_IOAS_ALLOW_IOVAS",
    IOMMU_IOAS_COPY: "IOMMU_IOAS_COPY",
    IOMMU_IOAS_IOVA_RANGES: "IOMMU_IOAS_IOVA_RANGES",
    IOMMU_IOAS_MAP: "IOMMU_IOAS_MAP",
    IOMMU_IOAS_UNMAP: "IOMMU_IOAS_UNMAP",
    IOMMU_OPTION: "IOMMU_OPTION",
    IOMMU_VFIO_IOAS: "IOMMU_VFIO_IOAS",
    IOMMU_HWPT_ALLOC: "IOMMU_HWPT_ALLOC",
    IOMMU_GET_HW_INFO: "IOMMU_GET_HW_INFO",
    IOMMU_HWPT_SET_DIRTY_TRACKING: "IOMMU_HWPT_SET_DIRTY_TRACKING",
    IOMMU_HWPT_GET_DIRTY_BITMAP: "IOMMU_HWPT_GET_DIRTY_BITMAP",
}
