"""ctypes mirrors of <linux/vfio.h>: container, group, device, region, IRQ and type1 IOMMU
uAPI (docs/kernel-contract.md §0, §2, §3), plus a re-export of the device-feature, migration v2,
DMA-logging and cdev part from ``vfiod.abi.vfio_feature`` (§4.2, §6, §7), so that
``import vfiod.abi.vfio as vfio; vfio.VFIO_DEVICE_FEATURE_GET`` reaches every name.

Names are the kernel's. Layouts are x86-64 and follow the Linux 6.12 uAPI header (the
newest one checked by tests/abi); where 6.12 added explicit padding that older headers
leave implicit or absent (``vfio_device_info.pad``, ``vfio_iommu_type1_info.pad``),
the longer layout is used: kernels copy ``min(argsz, what they know)``, so the longer
``argsz`` is accepted by older kernels too. The v1 migration region lives in
``vfiod.abi.v1``; iommufd in ``vfiod.abi.iommufd``.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

from vfiod.abi.ioctl import VFIO_BASE, VFIO_TYPE, vfio_io  # noqa: F401  (re-export)
from vfiod.abi.layout import FlexStruct
from vfiod.abi.vfio_feature import *  # noqa: F403  (re-export; names listed in its __all__)

VFIO_API_VERSION = 0

# -- VFIO_CHECK_EXTENSION ids (§3.1) ---------------------------------------------------
VFIO_TYPE1_IOMMU = 1
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_TYPE1v2_IOMMU = 3
VFIO_DMA_CC_IOMMU = 4
VFIO_EEH = 5
VFIO_TYPE1_NESTING_IOMMU = 6     # removed in later kernels (__VFIO_RESERVED_...); still 6
VFIO_SPAPR_TCE_v2_IOMMU = 7
VFIO_NOIOMMU_IOMMU = 8
VFIO_UNMAP_ALL = 9
VFIO_UPDATE_VADDR = 10

# -- ioctl request numbers (§2). Numbers are reused across fd kinds: issue on the right fd.
VFIO_GET_API_VERSION = vfio_io(0)          # container
VFIO_CHECK_EXTENSION = vfio_io(1)          # container
VFIO_SET_IOMMU = vfio_io(2)                # container
VFIO_GROUP_GET_STATUS = vfio_io(3)         # group
VFIO_GROUP_SET_CONTAINER = vfio_io(4)      # group
VFIO_GROUP_UNSET_CONTAINER = vfio_io(5)    # group
VFIO_GROUP_GET_DEVICE_FD = vfio_io(6)      # group
VFIO_DEVICE_GET_INFO = vfio_io(7)          # device
VFIO_DEVICE_GET_REGION_INFO = vfio_io(8)   # device
VFIO_DEVICE_GET_IRQ_INFO = vfio_io(9)      # device
VFIO_DEVICE_SET_IRQS = vfio_io(10)         # device
VFIO_DEVICE_RESET = vfio_io(11)            # device
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO = vfio_io(12)   # device (= VFIO_IOMMU_GET_INFO)
VFIO_DEVICE_PCI_HOT_RESET = vfio_io(13)    # device (= VFIO_IOMMU_MAP_DMA)
VFIO_DEVICE_IOEVENTFD = vfio_io(16)        # device (= VFIO_IOMMU_DISABLE)
VFIO_IOMMU_GET_INFO = vfio_io(12)          # container
VFIO_IOMMU_MAP_DMA = vfio_io(13)           # container
VFIO_IOMMU_UNMAP_DMA = vfio_io(14)         # container
VFIO_IOMMU_ENABLE = vfio_io(15)            # container (SPAPR only)
VFIO_IOMMU_DISABLE = vfio_io(16)           # container (SPAPR only)
VFIO_IOMMU_DIRTY_PAGES = vfio_io(17)       # container (= VFIO_DEVICE_FEATURE on a device)


class vfio_info_cap_header(ctypes.Structure):
    """Header of every capability in an info chain; ``next`` is an offset from the start
    of the info buffer, 0 ends the chain (§3.4)."""
    _fields_ = [("id", c_uint16), ("version", c_uint16), ("next", c_uint32)]


# -- group (§3.2) -----------------------------------------------------------------------
class vfio_group_status(ctypes.Structure):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32)]


VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1


# -- device (§3.3) ----------------------------------------------------------------------
class vfio_device_info(ctypes.Structure):
    """24 bytes (6.6+ names the tail ``pad``; the 6.1 header's struct is 20 bytes)."""
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("num_regions", c_uint32),
                ("num_irqs", c_uint32), ("cap_offset", c_uint32), ("pad", c_uint32)]


VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_PLATFORM = 1 << 2
VFIO_DEVICE_FLAGS_AMBA = 1 << 3
VFIO_DEVICE_FLAGS_CCW = 1 << 4
VFIO_DEVICE_FLAGS_AP = 1 << 5
VFIO_DEVICE_FLAGS_FSL_MC = 1 << 6
VFIO_DEVICE_FLAGS_CAPS = 1 << 7
VFIO_DEVICE_FLAGS_CDX = 1 << 8             # 6.6+

VFIO_DEVICE_API_PCI_STRING = "vfio-pci"


# -- regions (§3.4) ---------------------------------------------------------------------
class vfio_region_info(ctypes.Structure):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("index", c_uint32),
                ("cap_offset", c_uint32), ("size", c_uint64), ("offset", c_uint64)]


VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3
VFIO_REGION_INFO_CAP_NVLINK2_SSATGT = 4
VFIO_REGION_INFO_CAP_NVLINK2_LNKSPD = 5


class vfio_region_sparse_mmap_area(ctypes.Structure):
    _fields_ = [("offset", c_uint64), ("size", c_uint64)]


class vfio_region_info_cap_sparse_mmap(FlexStruct):
    """Fixed part 16 bytes; ``areas[nr_areas]`` follows at offset 16."""
    _fields_ = [("header", vfio_info_cap_header), ("nr_areas", c_uint32),
                ("reserved", c_uint32)]
    _flex_ = ("areas", vfio_region_sparse_mmap_area, 16)


class vfio_region_info_cap_type(ctypes.Structure):
    _fields_ = [("header", vfio_info_cap_header), ("type", c_uint32), ("subtype", c_uint32)]


VFIO_REGION_TYPE_PCI_VENDOR_TYPE = 1 << 31
VFIO_REGION_TYPE_PCI_VENDOR_MASK = 0xFFFF
VFIO_REGION_TYPE_GFX = 1
VFIO_REGION_TYPE_CCW = 2
# type 3 / subtype 1 (the v1 migration region) are in vfiod.abi.v1.

# Fixed vfio-pci region indexes; >= VFIO_PCI_NUM_REGIONS are identified by CAP_TYPE.
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR1_REGION_INDEX = 1
VFIO_PCI_BAR2_REGION_INDEX = 2
VFIO_PCI_BAR3_REGION_INDEX = 3
VFIO_PCI_BAR4_REGION_INDEX = 4
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9


# -- IRQs -------------------------------------------------------------------------------
class vfio_irq_info(ctypes.Structure):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("index", c_uint32),
                ("count", c_uint32)]


VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3


class vfio_irq_set(FlexStruct):
    """Fixed part 20 bytes; ``data[]`` (bools u8 or eventfds s32) follows at 20."""
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("index", c_uint32),
                ("start", c_uint32), ("count", c_uint32)]
    _flex_ = ("data", c_uint8, 20)


VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IRQ_SET_DATA_TYPE_MASK = 0x7
VFIO_IRQ_SET_ACTION_TYPE_MASK = 0x38

VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5


# -- type1 IOMMU (§3.6 - §3.9) ----------------------------------------------------------
class vfio_iommu_type1_info(ctypes.Structure):
    """24 bytes on x86-64 in every header (6.1 leaves the tail padding implicit)."""
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("iova_pgsizes", c_uint64),
                ("cap_offset", c_uint32), ("pad", c_uint32)]


VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1

VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION = 2
VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL = 3


class vfio_iova_range(ctypes.Structure):
    """``end`` is inclusive."""
    _fields_ = [("start", c_uint64), ("end", c_uint64)]


class vfio_iommu_type1_info_cap_iova_range(FlexStruct):
    """Fixed part 16 bytes; ``iova_ranges[nr_iovas]`` follows at 16."""
    _fields_ = [("header", vfio_info_cap_header), ("nr_iovas", c_uint32),
                ("reserved", c_uint32)]
    _flex_ = ("iova_ranges", vfio_iova_range, 16)


class vfio_iommu_type1_info_cap_migration(ctypes.Structure):
    """32 bytes; bytes 12..15 are an alignment hole (uninitialised before 6.6: ignore)."""
    _fields_ = [("header", vfio_info_cap_header), ("flags", c_uint32),
                ("pgsize_bitmap", c_uint64), ("max_dirty_bitmap_size", c_uint64)]


class vfio_iommu_type1_info_dma_avail(ctypes.Structure):
    """12 bytes (the kernel pads the chain entry to 16 since 6.6)."""
    _fields_ = [("header", vfio_info_cap_header), ("avail", c_uint32)]


class vfio_iommu_type1_dma_map(ctypes.Structure):
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("vaddr", c_uint64),
                ("iova", c_uint64), ("size", c_uint64)]


VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_MAP_FLAG_VADDR = 1 << 2


class vfio_bitmap(ctypes.Structure):
    """``data`` is a user pointer (``__u64 *``) carried as a u64 address."""
    _fields_ = [("pgsize", c_uint64), ("size", c_uint64), ("data", c_uint64)]


class vfio_iommu_type1_dma_unmap(FlexStruct):
    """Fixed part 24 bytes; with GET_DIRTY_BITMAP a ``vfio_bitmap`` follows at 24."""
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32), ("iova", c_uint64),
                ("size", c_uint64)]
    _flex_ = ("data", c_uint8, 24)


VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1
VFIO_DMA_UNMAP_FLAG_VADDR = 1 << 2


class vfio_iommu_type1_dirty_bitmap(FlexStruct):
    """Fixed part 8 bytes; for GET_BITMAP a ``vfio_iommu_type1_dirty_bitmap_get``
    follows at 8 (argsz >= 48; the bitmap memory itself is not counted)."""
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32)]
    _flex_ = ("data", c_uint8, 8)


class vfio_iommu_type1_dirty_bitmap_get(ctypes.Structure):
    _fields_ = [("iova", c_uint64), ("size", c_uint64), ("bitmap", vfio_bitmap)]


VFIO_IOMMU_DIRTY_PAGES_FLAG_START = 1 << 0
VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP = 1 << 1
VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP = 1 << 2


# -- per-fd-kind request tables: dispatch (simulator) and error messages (name the op).
CONTAINER_IOCTLS: dict[int, str] = {
    VFIO_GET_API_VERSION: "VFIO_GET_API_VERSION",
    VFIO_CHECK_EXTENSION: "VFIO_CHECK_EXTENSION",
    VFIO_SET_IOMMU: "VFIO_SET_IOMMU",
    VFIO_IOMMU_GET_INFO: "VFIO_IOMMU_GET_INFO",
    VFIO_IOMMU_MAP_DMA: "VFIO_IOMMU_MAP_DMA",
    VFIO_IOMMU_UNMAP_DMA: "VFIO_IOMMU_UNMAP_DMA",
    VFIO_IOMMU_ENABLE: "VFIO_IOMMU_ENABLE",
    VFIO_IOMMU_DISABLE: "VFIO_IOMMU_DISABLE",
    VFIO_IOMMU_DIRTY_PAGES: "VFIO_IOMMU_DIRTY_PAGES",
}
GROUP_IOCTLS: dict[int, str] = {
    VFIO_GROUP_GET_STATUS: "VFIO_GROUP_GET_STATUS",
    VFIO_GROUP_SET_CONTAINER: "VFIO_GROUP_SET_CONTAINER",
    VFIO_GROUP_UNSET_CONTAINER: "VFIO_GROUP_UNSET_CONTAINER",
    VFIO_GROUP_GET_DEVICE_FD: "VFIO_GROUP_GET_DEVICE_FD",
}
DEVICE_IOCTLS: dict[int, str] = {
    VFIO_DEVICE_GET_INFO: "VFIO_DEVICE_GET_INFO",
    VFIO_DEVICE_GET_REGION_INFO: "VFIO_DEVICE_GET_REGION_INFO",
    VFIO_DEVICE_GET_IRQ_INFO: "VFIO_DEVICE_GET_IRQ_INFO",
    VFIO_DEVICE_SET_IRQS: "VFIO_DEVICE_SET_IRQS",
    VFIO_DEVICE_RESET: "VFIO_DEVICE_RESET",
    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
    VFIO_DEVICE_PCI_HOT_RESET: "VFIO_DEVICE_PCI_HOT_RESET",
    VFIO_DEVICE_IOEVENTFD: "VFIO_DEVICE_IOEVENTFD",
    VFIO_DEVICE_FEATURE: "VFIO_DEVICE_FEATURE",                      # noqa: F405
    VFIO_DEVICE_BIND_IOMMUFD: "VFIO_DEVICE_BIND_IOMMUFD",            # noqa: F405
    VFIO_DEVICE_ATTACH_IOMMUFD_PT: "VFIO_DEVICE_ATTACH_IOMMUFD_PT",  # noqa: F405
    VFIO_DEVICE_DETACH_IOMMUFD_PT: "VFIO_DEVICE_DETACH_IOMMUFD_PT",  # noqa: F405
}
MIG_DATA_IOCTLS: dict[int, str] = {
    VFIO_MIG_GET_PRECOPY_INFO: "VFIO_MIG_GET_PRECOPY_INFO",          # noqa: F405
}

