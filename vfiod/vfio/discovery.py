"""Find VFIO devices in sysfs and say, per device, whether vfiod can use it and why not.

Mirrors docs/kernel-contract.md §3.1 step 1 (the ``iommu_group`` and ``driver`` links; every device in
the group must be bound to a VFIO driver or unbound) and §4.1 step 1 (the ``vfio-dev``
directory naming the cdev). Read-only: nothing here opens a VFIO fd, so discovery is safe
while a VMM owns the devices. All reads go through ``KernelOps`` so tests run on a built
tree and the real-kernel tier on ``/sys``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from vfiod.errors import KernelError
from vfiod.kernel.ops import KernelOps
from vfiod.vfio.paths import HostPaths

#: Drivers that claim DMA ownership the way VFIO needs ("driver_managed_dma"): a group stays
#: viable when its other members are bound to one of these (PCI bridges, stub devices).
_VIABLE_HOST_DRIVERS = frozenset({"pci-stub", "pcieport"})


def is_vfio_pci_driver(driver: str) -> bool:
    """vfio-pci itself or a vendor variant (mlx5_vfio_pci, xe-vfio-pci, ...): docs/architecture.md §1."""
    return driver in ("vfio-pci", "vfio_pci") or driver.endswith(("_vfio_pci", "-vfio-pci"))


@dataclass(frozen=True)
class GroupViability:
    """Whether ``/dev/vfio/N`` can be used: every member is VFIO-bound, unbound or a
    bridge/stub. ``blockers`` names each member that is not, with its driver."""

    number: int
    members: tuple[tuple[str, str | None], ...]    # (device name, driver or None)
    blockers: tuple[str, ...]
    noiommu: bool = False

    @property
    def viable(self) -> bool:
        return not self.blockers


@dataclass(frozen=True)
class DiscoveredDevice:
    """One device as sysfs shows it. ``vfio_capable``: bound to a VFIO driver and its group
    is viable, i.e. ``Group.open``/``get_device`` can succeed; otherwise ``reason`` says why."""

    name: str                       # PCI BDF or mdev UUID (the GET_DEVICE_FD name)
    kind: str                       # "pci" | "mdev"
    group: int | None
    driver: str | None
    vfio_capable: bool
    reason: str
    vendor: int | None = None
    device: int | None = None
    #: PCI subsystem ids (the board/vendor variant of a chip); None on mdevs
    subsystem_vendor: int | None = None
    subsystem_device: int | None = None
    mdev_type: str | None = None
    parent: str | None = None       # mdev parent device name
    cdev: str | None = None         # "vfioN" when the kernel offers the cdev (6.6+)
    noiommu: bool = False


# -- small sysfs helpers (absent attribute → None; other failures propagate) -------------

def _link_name(kernel: KernelOps, path: str) -> str | None:
    if not kernel.exists(path):
        return None
    try:
        return os.path.basename(kernel.readlink(path).rstrip("/"))
    except KernelError as e:
        if e.errno in (errno.ENOENT, errno.EINVAL):    # vanished, or not a link
            return None
        raise


def _hex_attr(kernel: KernelOps, path: str) -> int | None:
    if not kernel.exists(path):
        return None
    try:
        return int(kernel.read_text(path).strip(), 16)
    except ValueError:
        return None


def _group_number(kernel: KernelOps, dev_dir: str) -> int | None:
    name = _link_name(kernel, os.path.join(dev_dir, "iommu_group"))
    if name is None:
        return None
    try:
        return int(name)
    except ValueError:
        return None


def _cdev_name(kernel: KernelOps, dev_dir: str) -> str | None:
    vfio_dev = os.path.join(dev_dir, "vfio-dev")
    if not kernel.exists(vfio_dev):
        return None
    names = [n for n in kernel.listdir(vfio_dev) if n.startswith("vfio")]
    return names[0] if names else None


def _is_noiommu(kernel: KernelOps, paths: HostPaths, number: int) -> bool:
    # No-IOMMU groups are created by VFIO itself and carry this name (docs/kernel-contract.md §3.1).
    name_file = os.path.join(paths.iommu_group_dir(number), "name")
    return kernel.exists(name_file) and kernel.read_text(name_file).strip() == "vfio-noiommu"


# -- groups -------------------------------------------------------------------------------

def group_viability(kernel: KernelOps, paths: HostPaths, number: int) -> GroupViability:
    """Check what the kernel checks before it lets a group be used (docs/kernel-contract.md §3.1)."""
    devices_dir = os.path.join(paths.iommu_group_dir(number), "devices")
    if not kernel.exists(devices_dir):
        return GroupViability(number, (), (f"IOMMU group {number} does not exist",))
    members: list[tuple[str, str | None]] = []
    blockers: list[str] = []
    for name in kernel.listdir(devices_dir):
        dev_dir = os.path.join(devices_dir, name)
        driver = _link_name(kernel, os.path.join(dev_dir, "driver"))
        members.append((name, driver))
        if driver is None or driver in _VIABLE_HOST_DRIVERS or is_vfio_pci_driver(driver):
            continue
        if kernel.exists(os.path.join(dev_dir, "mdev_type")):
            continue        # every mdev bus driver is a VFIO driver
        blockers.append(f"{name} is bound to host driver {driver}")
    return GroupViability(number, tuple(members), tuple(blockers),
                          _is_noiommu(kernel, paths, number))


# -- devices ------------------------------------------------------------------------------

def _verdict(kind: str, group: int | None, driver: str | None,
             viability: GroupViability | None) -> tuple[bool, str]:
    if driver is None:
        return False, "not bound to any driver"
    ours = is_vfio_pci_driver(driver) if kind == "pci" else True
    if not ours:
        return False, f"bound to host driver {driver} (not ours)"
    if group is None:
        return False, f"bound to {driver} but has no IOMMU group"
    if viability is not None and not viability.viable:
        return False, f"IOMMU group {group} is not viable: " + "; ".join(viability.blockers)
    return True, f"bound to {driver}"


class _Discoverer:
    """One discovery pass; caches group viability so a group is read once."""

    def __init__(self, kernel: KernelOps, paths: HostPaths) -> None:
        self.kernel = kernel
        self.paths = paths
        self._groups: dict[int, GroupViability] = {}

    def viability(self, group: int | None) -> GroupViability | None:
        if group is None:
            return None
        if group not in self._groups:
            self._groups[group] = group_viability(self.kernel, self.paths, group)
        return self._groups[group]

    def pci(self, bdf: str) -> DiscoveredDevice:
        k = self.kernel
        dev_dir = self.paths.pci_device(bdf)
        group = _group_number(k, dev_dir)
        driver = _link_name(k, os.path.join(dev_dir, "driver"))
        via = self.viability(group) if driver is not None else None
        ok, reason = _verdict("pci", group, driver, via)
        return DiscoveredDevice(
            name=bdf, kind="pci", group=group, driver=driver, vfio_capable=ok, reason=reason,
            vendor=_hex_attr(k, os.path.join(dev_dir, "vendor")),
            device=_hex_attr(k, os.path.join(dev_dir, "device")),
            subsystem_vendor=_hex_attr(k, os.path.join(dev_dir, "subsystem_vendor")),
            subsystem_device=_hex_attr(k, os.path.join(dev_dir, "subsystem_device")),
            cdev=_cdev_name(k, dev_dir), noiommu=bool(via and via.noiommu))

    def mdev(self, uuid: str) -> DiscoveredDevice:
        k = self.kernel
        dev_dir = self.paths.mdev_device(uuid)
        group = _group_number(k, dev_dir)
        driver = _link_name(k, os.path.join(dev_dir, "driver"))
        via = self.viability(group) if driver is not None else None
        ok, reason = _verdict("mdev", group, driver, via)
        return DiscoveredDevice(
            name=uuid, kind="mdev", group=group, driver=driver, vfio_capable=ok, reason=reason,
            mdev_type=_link_name(k, os.path.join(dev_dir, "mdev_type")),
            parent=self._mdev_parent(dev_dir), cdev=_cdev_name(k, dev_dir),
            noiommu=bool(via and via.noiommu))

    def _mdev_parent(self, dev_dir: str) -> str | None:
        # /sys/bus/mdev/devices/<UUID> links to .../<parent>/<UUID>: the parent is the
        # directory the mdev lives in.
        if not self.kernel.exists(dev_dir):
            return None
        try:
            target = self.kernel.readlink(dev_dir).rstrip("/")
        except KernelError as e:
            if e.errno in (errno.ENOENT, errno.EINVAL):
                return None
            raise
        parts = target.split("/")
        return parts[-2] if len(parts) >= 2 and parts[-2] not in ("", ".", "..") else None


def _names(kernel: KernelOps, path: str) -> list[str]:
    return sorted(kernel.listdir(path)) if kernel.exists(path) else []


def discover(kernel: KernelOps, paths: HostPaths | None = None) -> list[DiscoveredDevice]:
    """Every PCI and mdev device, ours or not, sorted by kind then name."""
    paths = paths or HostPaths()
    d = _Discoverer(kernel, paths)
    out = [d.pci(bdf) for bdf in _names(kernel, paths.pci_devices)]
    out += [d.mdev(uuid) for uuid in _names(kernel, paths.mdev_devices)]
    return out


def discover_device(kernel: KernelOps, name: str,
                    paths: HostPaths | None = None) -> DiscoveredDevice:
    """One device by BDF or mdev UUID; ``KernelError(ENODEV)`` if sysfs has neither."""
    paths = paths or HostPaths()
    d = _Discoverer(kernel, paths)
    if kernel.exists(paths.pci_device(name)):
        return d.pci(name)
    if kernel.exists(paths.mdev_device(name)):
        return d.mdev(name)
    raise KernelError(errno.ENODEV, "discover", name,
                      f"no such device in {paths.pci_devices} or {paths.mdev_devices}")
