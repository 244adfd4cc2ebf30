"""vfiod.vfio.discovery on a sysfs tree laid out like the kernel's (real symlinks in a temp
dir, read through the real ``LinuxKernel`` backend: discovery only reads sysfs)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.support.vfio_rig import BLOCKED, FOREIGN, MDEV, PCI, PCI2, SIBLING, build_rig
from vfiod.errors import KernelError
from vfiod.kernel.linux import LinuxKernel
from vfiod.vfio.discovery import discover, discover_device, group_viability, is_vfio_pci_driver
from vfiod.vfio.paths import HostPaths


class SysTree:
    """Just enough of /sys: PCI devices under /sys/devices, bus links, drivers, groups."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("bus/pci/devices", "bus/pci/drivers", "bus/mdev/devices", "kernel/iommu_groups",
                  "devices/pci0000:00", "devices/virtual/mtty/mtty"):
            (root / d).mkdir(parents=True, exist_ok=True)

    def _group(self, number: int) -> Path:
        g = self.root / "kernel/iommu_groups" / str(number)
        (g / "devices").mkdir(parents=True, exist_ok=True)
        return g

    def _bind(self, dev: Path, driver: str | None, bus: str = "pci") -> None:
        if driver is None:
            return
        drv = self.root / "bus" / bus / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(drv, dev), dev / "driver")

    def pci(self, bdf: str, group: int | None, driver: str | None, vendor: int = 0x15B3,
            device: int = 0x101E, cdev: str | None = None,
            subsystem: tuple[int, int] | None = None) -> None:
        dev = self.root / "devices/pci0000:00" / bdf
        dev.mkdir()
        (dev / "vendor").write_text(f"{vendor:#06x}\n")
        (dev / "device").write_text(f"{device:#06x}\n")
        if subsystem is not None:
            (dev / "subsystem_vendor").write_text(f"{subsystem[0]:#06x}\n")
            (dev / "subsystem_device").write_text(f"{subsystem[1]:#06x}\n")
        self._bind(dev, driver)
        if group is not None:
            g = self._group(group)
            os.symlink(os.path.relpath(g, dev), dev / "iommu_group")
            os.symlink(os.path.relpath(dev, g / "devices"), g / "devices" / bdf)
        if cdev:
            (dev / "vfio-dev" / cdev).mkdir(parents=True)
        os.symlink(os.path.relpath(dev, self.root / "bus/pci/devices"),
                   self.root / "bus/pci/devices" / bdf)

    def mdev(self, uuid: str, mdev_type: str, group: int, driver: str | None = "mtty") -> None:
        parent = self.root / "devices/virtual/mtty/mtty"
        dev = parent / uuid
        dev.mkdir()
        types = parent / "mdev_supported_types" / mdev_type
        types.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(types, dev), dev / "mdev_type")
        self._bind(dev, driver, bus="mdev")
        g = self._group(group)
        os.symlink(os.path.relpath(g, dev), dev / "iommu_group")
        os.symlink(os.path.relpath(dev, g / "devices"), g / "devices" / uuid)
        os.symlink(os.path.relpath(dev, self.root / "bus/mdev/devices"),
                   self.root / "bus/mdev/devices" / uuid)


UUID = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


@pytest.fixture
def tree(tmp_path: Path) -> tuple[SysTree, HostPaths]:
    t = SysTree(tmp_path / "sys")
    t.pci("0000:3b:00.1", 12, "mlx5_vfio_pci", cdev="vfio0",     # ours (variant driver)
          subsystem=(0x15B3, 0x0047))
    t.pci("0000:3b:00.2", 13, "vfio-pci")                         # ours
    t.pci("0000:3b:00.0", 11, "mlx5_core")                        # not ours
    t.pci("0000:5e:00.0", 20, "vfio-pci", vendor=0x8086, device=0x0B25)
    t.pci("0000:5e:00.1", 20, "ixgbe")                            # makes group 20 non-viable
    t.pci("0000:00:1c.0", 14, "pcieport")                         # bridge: fine in a group
    t.pci("0000:01:00.0", 14, "vfio-pci")
    t.pci("0000:02:00.0", 15, None)                               # unbound
    t.pci("0000:03:00.0", None, "vfio-pci")                       # no IOMMU group
    t.mdev(UUID, "mtty-2", 30)
    return t, HostPaths(sysfs_root=str(t.root), dev_root=str(tmp_path / "dev"))


def test_discover_classifies_every_device(tree: tuple[SysTree, HostPaths]) -> None:
    _, paths = tree
    found = {d.name: d for d in discover(LinuxKernel(), paths)}
    assert len(found) == 10

    ours = found["0000:3b:00.1"]
    assert (ours.kind, ours.group, ours.driver, ours.vfio_capable) == ("pci", 12, "mlx5_vfio_pci", True)
    assert (ours.vendor, ours.device, ours.cdev) == (0x15B3, 0x101E, "vfio0")
    assert (ours.subsystem_vendor, ours.subsystem_device) == (0x15B3, 0x0047)
    assert found["0000:3b:00.2"].subsystem_vendor is None        # no attribute: unknown
    assert ours.reason == "bound to mlx5_vfio_pci"

    host = found["0000:3b:00.0"]
    assert not host.vfio_capable and host.driver == "mlx5_core"
    assert host.reason == "bound to host driver mlx5_core (not ours)"

    blocked = found["0000:5e:00.0"]
    assert not blocked.vfio_capable and blocked.group == 20
    assert "group 20 is not viable" in blocked.reason
    assert "0000:5e:00.1 is bound to host driver ixgbe" in blocked.reason

    assert found["0000:01:00.0"].vfio_capable             # bridge in group 14 is allowed
    assert found["0000:02:00.0"].reason == "not bound to any driver"
    assert found["0000:02:00.0"].driver is None
    assert "no IOMMU group" in found["0000:03:00.0"].reason

    m = found[UUID]
    assert (m.kind, m.group, m.driver, m.mdev_type, m.parent) == ("mdev", 30, "mtty", "mtty-2", "mtty")
    assert m.vfio_capable and m.vendor is None


def test_group_viability_lists_blockers(tree: tuple[SysTree, HostPaths]) -> None:
    _, paths = tree
    k = LinuxKernel()
    g20 = group_viability(k, paths, 20)
    assert not g20.viable
    assert dict(g20.members) == {"0000:5e:00.0": "vfio-pci", "0000:5e:00.1": "ixgbe"}
    assert g20.blockers == ("0000:5e:00.1 is bound to host driver ixgbe",)
    assert group_viability(k, paths, 14).viable
    assert group_viability(k, paths, 15).viable          # an unbound member is fine
    assert group_viability(k, paths, 30).viable          # mdev bound to its vendor driver
    missing = group_viability(k, paths, 99)
    assert not missing.viable and "does not exist" in missing.blockers[0]


def test_discover_device_by_name(tree: tuple[SysTree, HostPaths]) -> None:
    _, paths = tree
    k = LinuxKernel()
    assert discover_device(k, "0000:3b:00.2", paths).group == 13
    assert discover_device(k, UUID, paths).kind == "mdev"
    with pytest.raises(KernelError) as ei:
        discover_device(k, "0000:ff:00.0", paths)
    assert ei.value.errno == errno.ENODEV
    assert str(ei.value).startswith("discover on 0000:ff:00.0: ENODEV")


def test_empty_host_has_no_devices(tmp_path: Path) -> None:
    assert discover(LinuxKernel(), HostPaths(sysfs_root=str(tmp_path))) == []


@pytest.mark.parametrize("name,ours", [
    ("vfio-pci", True), ("mlx5_vfio_pci", True), ("hisi_acc_vfio_pci", True),
    ("xe-vfio-pci", True), ("nvgrace-gpu-vfio-pci", True), ("mlx5_core", False),
    ("vfio", False), ("pci-stub", False),
])
def test_vfio_driver_names(name: str, ours: bool) -> None:
    assert is_vfio_pci_driver(name) is ours


def test_discovery_on_a_simulated_host(tmp_path: Path) -> None:
    """The simulator's host builder lays out sysfs like the kernel; discovery agrees with
    what it built (and the same code runs on /sys in the real-kernel tier)."""
    r = build_rig(tmp_path)
    try:
        found = {d.name: d for d in discover(r.kernel, r.paths)}
        assert set(found) == {PCI, PCI2, BLOCKED, SIBLING, FOREIGN, MDEV}
        assert found[PCI].vfio_capable and found[PCI].group == 10
        assert (found[PCI].cdev or "").startswith("vfio")
        assert (found[PCI2].driver, found[PCI2].vfio_capable) == ("mlx5_vfio_pci", True)
        assert not found[BLOCKED].vfio_capable
        assert f"{SIBLING} is bound to host driver ixgbe" in found[BLOCKED].reason
        assert found[SIBLING].reason == "bound to host driver ixgbe (not ours)"
        assert (found[FOREIGN].vendor, found[FOREIGN].device) == (0x15B3, 0x101D)
        assert found[FOREIGN].reason == "bound to host driver mlx5_core (not ours)"
        m = found[MDEV]
        assert (m.kind, m.group, m.driver, m.parent, m.mdev_type) == (
            "mdev", 13, "mtty", "mtty", "mtty-2")
        assert m.vfio_capable
        assert not group_viability(r.kernel, r.paths, 11).viable
    finally:
        r.host.close()
