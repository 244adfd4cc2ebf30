"""Where the VFIO files live: the sysfs and devfs roots as parameters (docs/architecture.md §2).

Production uses ``/sys`` and ``/dev``; tests point both at a tree built in a temporary
directory, so every path the vfio layer touches is derived here and nowhere else.
Layout facts are from docs/kernel-contract.md §3.1 (group path, sysfs links) and §4.1 (cdev, iommufd).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class HostPaths:
    """The roots of the two trees VFIO is reached through."""

    sysfs_root: str = "/sys"
    dev_root: str = "/dev"

    # -- sysfs -------------------------------------------------------------------------
    @property
    def pci_devices(self) -> str:
        return os.path.join(self.sysfs_root, "bus", "pci", "devices")

    @property
    def mdev_devices(self) -> str:
        return os.path.join(self.sysfs_root, "bus", "mdev", "devices")

    @property
    def iommu_groups(self) -> str:
        return os.path.join(self.sysfs_root, "kernel", "iommu_groups")

    def pci_device(self, bdf: str) -> str:
        return os.path.join(self.pci_devices, bdf)

    def mdev_device(self, uuid: str) -> str:
        return os.path.join(self.mdev_devices, uuid)

    def iommu_group_dir(self, number: int) -> str:
        return os.path.join(self.iommu_groups, str(number))

    # -- devfs -------------------------------------------------------------------------
    @property
    def vfio_container(self) -> str:
        """The legacy container node (docs/kernel-contract.md §3.1 step 2)."""
        return os.path.join(self.dev_root, "vfio", "vfio")

    def vfio_group(self, number: int, noiommu: bool = False) -> str:
        """``/dev/vfio/N``; unsafe no-IOMMU groups are named ``noiommu-N`` (§3.1 step 3)."""
        return os.path.join(self.dev_root, "vfio", f"noiommu-{number}" if noiommu else str(number))

    def vfio_cdev(self, name: str) -> str:
        """``/dev/vfio/devices/vfioN`` (docs/kernel-contract.md §4.1 step 1)."""
        return os.path.join(self.dev_root, "vfio", "devices", name)

    @property
    def iommufd(self) -> str:
        return os.path.join(self.dev_root, "iommu")
