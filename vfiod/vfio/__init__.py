"""Typed objects over VFIO fds (docs/architecture.md §2, layer ``vfio``): sysfs discovery, the type1
container, groups, devices (regions, features, migration primitives), the cdev path and
iommufd. Every syscall goes through the ``KernelOps`` passed in; /sys and /dev come from
``HostPaths``. Mirrors docs/kernel-contract.md §3, §4, §6.1-§6.3, §6.7-§6.9 and §7.
"""

from vfiod.vfio.container import Container, DmaMapping
from vfiod.vfio.device import Device, VfioDeviceInfo
from vfiod.vfio.discovery import (
    DiscoveredDevice,
    GroupViability,
    discover,
    discover_device,
    group_viability,
)
from vfiod.vfio.group import Group
from vfiod.vfio.iommu_info import DirtyCap, IommuInfo
from vfiod.vfio.layout import RamRegion
from vfiod.vfio.paths import HostPaths
from vfiod.vfio.regions import IrqInfo, RegionInfo

__all__ = [
    "Container", "DmaMapping", "Device", "VfioDeviceInfo", "DiscoveredDevice", "GroupViability",
    "discover", "discover_device", "group_viability", "Group", "DirtyCap", "IommuInfo",
    "HostPaths", "IrqInfo", "RamRegion", "RegionInfo",
]
