"""ctypes mirrors of the newer half of <linux/vfio.h>: ``VFIO_DEVICE_FEATURE`` and its
payloads (docs/kernel-contract.md §6.1), migration v2 (§6.2 - §6.9), device DMA logging (§7) and the
vfio cdev ioctls (§4.2). Re-exported by ``vfiod.abi.vfio``; import names from there.

Layouts follow the Linux 6.12 uAPI header. The cdev structs are the 6.12 ones
(``vfio_device_bind_iommufd`` 16 bytes, ``vfio_device_attach_iommufd_pt`` 12,
``vfio_device_detach_iommufd_pt`` 8); later kernels append token/pasid fields that are
optional by ``argsz``.
"""

from __future__ import annotations

import ctypes
import enum
from ctypes import c_int32, c_uint8, c_uint32, c_uint64

from vfiod.abi.ioctl import vfio_io
from vfiod.abi.layout import FlexStruct

__all__ = [
    "VFIO_DEVICE_FEATURE", "VFIO_MIG_GET_PRECOPY_INFO", "VFIO_DEVICE_BIND_IOMMUFD",
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT", "VFIO_DEVICE_DETACH_IOMMUFD_PT",
    "vfio_device_feature", "VFIO_DEVICE_FEATURE_MASK", "VFIO_DEVICE_FEATURE_GET",
    "VFIO_DEVICE_FEATURE_SET", "VFIO_DEVICE_FEATURE_PROBE",
    "VFIO_DEVICE_FEATURE_PCI_VF_TOKEN", "VFIO_DEVICE_FEATURE_MIGRATION",
    "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE", "VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY",
    "VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP", "VFIO_DEVICE_FEATURE_LOW_POWER_EXIT",
    "VFIO_DEVICE_FEATURE_DMA_LOGGING_START", "VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP",
    "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT", "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
    "VFIO_DEVICE_FEATURE_BUS_MASTER", "FEATURE_NAMES",
    "vfio_device_feature_migration", "VFIO_MIGRATION_STOP_COPY", "VFIO_MIGRATION_P2P",
    "VFIO_MIGRATION_PRE_COPY",
    "vfio_device_feature_mig_state", "vfio_device_mig_state", "MigState",
    "VFIO_DEVICE_STATE_ERROR", "VFIO_DEVICE_STATE_STOP", "VFIO_DEVICE_STATE_RUNNING",
    "VFIO_DEVICE_STATE_STOP_COPY", "VFIO_DEVICE_STATE_RESUMING",
    "VFIO_DEVICE_STATE_RUNNING_P2P", "VFIO_DEVICE_STATE_PRE_COPY",
    "VFIO_DEVICE_STATE_PRE_COPY_P2P", "VFIO_DEVICE_STATE_NR",
    "vfio_precopy_info", "vfio_device_feature_mig_data_size",
    "vfio_device_low_power_entry_with_wakeup",
    "vfio_device_feature_dma_logging_control", "vfio_device_feature_dma_logging_range",
    "vfio_device_feature_dma_logging_report",
    "vfio_device_bind_iommufd", "vfio_device_attach_iommufd_pt",
    "vfio_device_detach_iommufd_pt",
    "feature_buffer", "FEATURE_HEADER_SIZE",
]

VFIO_DEVICE_FEATURE = vfio_io(17)             # device fd (= VFIO_IOMMU_DIRTY_PAGES)
VFIO_DEVICE_BIND_IOMMUFD = vfio_io(18)        # cdev fd, 6.6+
VFIO_DEVICE_ATTACH_IOMMUFD_PT = vfio_io(19)   # cdev fd, 6.6+
VFIO_DEVICE_DETACH_IOMMUFD_PT = vfio_io(20)   # cdev fd, 6.6+
VFIO_MIG_GET_PRECOPY_INFO = vfio_io(21)       # migration data fd, 6.2+ (= VFIO_EEH_PE_OP)


# -- VFIO_DEVICE_FEATURE (§6.1) ---------------------------------------------------------
class vfio_device_feature(FlexStruct):
    """8-byte header; the feature payload ``data[]`` follows at 8 (argsz = 8 + payload)."""
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32)]
    _flex_ = ("data", c_uint8, 8)


FEATURE_HEADER_SIZE = 8
VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18

VFIO_DEVICE_FEATURE_PCI_VF_TOKEN = 0
VFIO_DEVICE_FEATURE_MIGRATION = 1
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE = 2
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY = 3
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP = 4
VFIO_DEVICE_FEATURE_LOW_POWER_EXIT = 5
VFIO_DEVICE_FEATURE_DMA_LOGGING_START = 6
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP = 7
VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT = 8
VFIO_DEVICE_FEATURE_MIG_DATA_SIZE = 9          # 6.2+
VFIO_DEVICE_FEATURE_BUS_MASTER = 10            # 6.7+, CDX only

#: feature id -> the kernel's name without ``VFIO_DEVICE_FEATURE_`` (errors, fault points)
FEATURE_NAMES = {
    VFIO_DEVICE_FEATURE_PCI_VF_TOKEN: "PCI_VF_TOKEN",
    VFIO_DEVICE_FEATURE_MIGRATION: "MIGRATION",
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: "MIG_DEVICE_STATE",
    VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY: "LOW_POWER_ENTRY",
    VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP: "LOW_POWER_ENTRY_WITH_WAKEUP",
    VFIO_DEVICE_FEATURE_LOW_POWER_EXIT: "LOW_POWER_EXIT",
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START: "DMA_LOGGING_START",
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: "DMA_LOGGING_STOP",
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: "DMA_LOGGING_REPORT",
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: "MIG_DATA_SIZE",
    VFIO_DEVICE_FEATURE_BUS_MASTER: "BUS_MASTER",
}


def feature_buffer(feature_id: int, flags: int, payload_size: int) -> bytearray:
    """A zeroed ``VFIO_DEVICE_FEATURE`` argument: the 8-byte header with
    ``argsz = 8 + payload_size`` and ``flags = flags | feature_id``, then the payload.

    ``flags`` holds the GET/SET/PROBE bits only; the id goes in bits 0-15. Bad input is a
    programming error and raises ValueError naming the value.
    """
    if not 0 <= feature_id <= VFIO_DEVICE_FEATURE_MASK:
        raise ValueError(f"feature id {feature_id} is outside 0..0xffff")
    dirs = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PROBE
    if flags & ~dirs:
        raise ValueError(f"feature flags {flags:#x} have bits outside GET|SET|PROBE")
    if payload_size < 0:
        raise ValueError(f"negative feature payload size {payload_size}")
    buf = bytearray(FEATURE_HEADER_SIZE + payload_size)
    head = vfio_device_feature.from_buffer(buf)
    head.argsz = len(buf)
    head.flags = flags | feature_id
    return buf


# -- migration v2 (§6.2 - §6.9) ---------------------------------------------------------
class vfio_device_feature_migration(ctypes.Structure):
    _fields_ = [("flags", c_uint64)]


VFIO_MIGRATION_STOP_COPY = 1 << 0
VFIO_MIGRATION_P2P = 1 << 1
VFIO_MIGRATION_PRE_COPY = 1 << 2               # 6.2+


class vfio_device_feature_mig_state(ctypes.Structure):
    _fields_ = [("device_state", c_uint32), ("data_fd", c_int32)]


class vfio_device_mig_state(enum.IntEnum):
    """``enum vfio_device_mig_state`` (v2, 5.18+; PRE_COPY states 6.2+). The one state
    vocabulary of vfiod: logs, metrics and the CLI use it, v1 is decoded into it."""
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


MigState = vfio_device_mig_state

# The header's enumerator names. Before 5.18 the same STOP/RUNNING names were the v1 bits
# (0 and 1); here they are the v2 values. v1 has its own names in vfiod.abi.v1.
VFIO_DEVICE_STATE_ERROR = int(MigState.ERROR)
VFIO_DEVICE_STATE_STOP = int(MigState.STOP)
VFIO_DEVICE_STATE_RUNNING = int(MigState.RUNNING)
VFIO_DEVICE_STATE_STOP_COPY = int(MigState.STOP_COPY)
VFIO_DEVICE_STATE_RESUMING = int(MigState.RESUMING)
VFIO_DEVICE_STATE_RUNNING_P2P = int(MigState.RUNNING_P2P)
VFIO_DEVICE_STATE_PRE_COPY = int(MigState.PRE_COPY)
VFIO_DEVICE_STATE_PRE_COPY_P2P = int(MigState.PRE_COPY_P2P)
VFIO_DEVICE_STATE_NR = 8


class vfio_precopy_info(ctypes.Structure):
    """Argument of VFIO_MIG_GET_PRECOPY_INFO on the saving data fd (24 bytes)."""
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("initial_bytes", c_uint64),
                ("dirty_bytes", c_uint64)]


class vfio_device_feature_mig_data_size(ctypes.Structure):
    _fields_ = [("stop_copy_length", c_uint64)]


class vfio_device_low_power_entry_with_wakeup(ctypes.Structure):
    _fields_ = [("wakeup_eventfd", c_int32), ("reserved", c_uint32)]


# -- device DMA logging (§7) ------------------------------------------------------------
class vfio_device_feature_dma_logging_control(ctypes.Structure):
    """START payload; ``ranges`` is the address of a vfio_device_feature_dma_logging_range
    array of ``num_ranges`` entries; ``page_size`` is in/out."""
    _fields_ = [("page_size", c_uint64), ("num_ranges", c_uint32),
                ("__reserved", c_uint32), ("ranges", c_uint64)]


class vfio_device_feature_dma_logging_range(ctypes.Structure):
    _fields_ = [("iova", c_uint64), ("length", c_uint64)]


class vfio_device_feature_dma_logging_report(ctypes.Structure):
    """REPORT payload; ``bitmap`` is the address of a zeroed u64 array."""
    _fields_ = [("iova", c_uint64), ("length", c_uint64), ("page_size", c_uint64),
                ("bitmap", c_uint64)]


# -- vfio cdev (§4.2) -------------------------------------------------------------------
class vfio_device_bind_iommufd(ctypes.Structure):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("iommufd", c_int32),
                ("out_devid", c_uint32)]


class vfio_device_attach_iommufd_pt(ctypes.Structure):
    """``pt_id`` is in/out: an IOAS id comes back as the auto-created HWPT's id."""
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("pt_id", c_uint32)]


class vfio_device_detach_iommufd_pt(ctypes.Structure):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32)]
