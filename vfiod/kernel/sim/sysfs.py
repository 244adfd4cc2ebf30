"""Writes the part of ``/sys`` that VFIO discovery reads, into a directory, shaped like the
kernel's (docs/kernel-contract.md §3.1 step 1, §4.1 step 1): real directories, attribute files and
relative symlinks, so discovery code reads it with plain readlink/listdir/read.

    devices/pci<dom>:<bus>/<BDF>/{vendor,device,class,driver->,iommu_group->,vfio-dev/vfioN/}
    bus/pci/devices/<BDF> -> ../../../devices/pci<dom>:<bus>/<BDF>
    bus/pci/drivers/<driver>/<BDF> -> the device
    kernel/iommu_groups/<N>/{type, devices/<name> -> the device}
    devices/virtual/<parent>/<parent>/                      an mdev parent (e.g. mtty)
        mdev_supported_types/<type>/{name,available_instances,device_api,create,devices/}
        <UUID>/{mdev_type->, driver->, iommu_group->, vfio-dev/vfioN/}
    bus/mdev/devices/<UUID> -> the mdev;  class/mdev_bus/<parent> -> the parent
    dev/char/<MAJ>:<MIN> -> the char device: devices/virtual/misc/{vfio,iommu},
        devices/virtual/vfio/<N> (a group), <device>/vfio-dev/vfioN (a cdev)
"""

from __future__ import annotations

import os
from pathlib import Path


class SysfsTree:
    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("devices", "bus/pci/devices", "bus/pci/drivers", "bus/mdev/devices",
                  "bus/mdev/drivers", "kernel/iommu_groups", "class/mdev_bus"):
            (root / d).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _link(link: Path, target: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(target, link.parent), link)

    @staticmethod
    def _attr(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

    def group(self, number: int, kind: str) -> Path:
        g = self.root / "kernel/iommu_groups" / str(number)
        if not g.exists():
            (g / "devices").mkdir(parents=True)
            self._attr(g / "type", "DMA-FQ" if kind == "pci" else "DMA")
        return g

    def _bind(self, dev: Path, name: str, bus: str, driver: str | None) -> None:
        if driver is None:
            return
        drv = self.root / "bus" / bus / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        self._link(dev / "driver", drv)
        self._link(drv / name, dev)

    def _join_group(self, dev: Path, name: str, group: int, kind: str) -> None:
        g = self.group(group, kind)
        self._link(dev / "iommu_group", g)
        self._link(g / "devices" / name, dev)

    def pci_device(self, bdf: str, vendor: int, device: int, driver: str | None,
                   group: int) -> Path:
        dom, bus = bdf.split(":")[:2]
        dev = self.root / "devices" / f"pci{dom}:{bus}" / bdf
        dev.mkdir(parents=True)
        self._attr(dev / "vendor", f"{vendor:#06x}")
        self._attr(dev / "device", f"{device:#06x}")
        # config space 0x2C holds the same pair as the subsystem ids (sim/pci.py)
        self._attr(dev / "subsystem_vendor", f"{vendor:#06x}")
        self._attr(dev / "subsystem_device", f"{device:#06x}")
        self._attr(dev / "class", "0x020000")
        self._bind(dev, bdf, "pci", driver)
        self._join_group(dev, bdf, group, "pci")
        self._link(self.root / "bus/pci/devices" / bdf, dev)
        return dev

    def mdev_device(self, uuid: str, parent: str, mdev_type: str, type_name: str,
                    driver: str, group: int, available: int) -> Path:
        pdir = self.root / "devices/virtual" / parent / parent
        tdir = pdir / "mdev_supported_types" / mdev_type
        if not tdir.exists():
            (tdir / "devices").mkdir(parents=True)
            self._attr(tdir / "name", type_name)
            self._attr(tdir / "device_api", "vfio-pci")
            (tdir / "create").touch(mode=0o200)
        self._attr(tdir / "available_instances", str(available))
        bus_link = self.root / "class/mdev_bus" / parent
        if not bus_link.is_symlink():
            self._link(bus_link, pdir)
        dev = pdir / uuid
        dev.mkdir()
        self._link(dev / "mdev_type", tdir)
        self._link(tdir / "devices" / uuid, dev)
        self._bind(dev, uuid, "mdev", driver)
        self._join_group(dev, uuid, group, "mdev")
        self._link(self.root / "bus/mdev/devices" / uuid, dev)
        return dev

    def cdev(self, dev: Path, cdev_name: str, major: int, minor: int) -> None:
        self._attr(dev / "vfio-dev" / cdev_name / "dev", f"{major}:{minor}")
        self.char_device(major, minor, dev / "vfio-dev" / cdev_name)

    def char_device(self, major: int, minor: int, target: Path) -> None:
        """``dev/char/MAJ:MIN`` -> ``target`` (made if missing), as the kernel links
        every character device it registers."""
        target.mkdir(parents=True, exist_ok=True)
        self._link(self.root / "dev/char" / f"{major}:{minor}", target)
