"""``SimHost``: a whole simulated hypervisor host in a temporary directory — the sysfs
tree discovery reads, the ``/dev`` nodes, and a ``SimKernel`` serving those nodes
(docs/kernel-contract.md §3.1, §4.1).

    host = SimHost.build(tmp_path, [[DeviceSpec("0000:3b:00.1")],
                                    [DeviceSpec("0000:5e:00.0"), HostDevice("0000:5e:00.1")],
                                    [HostDevice("0000:3b:00.0", driver="mlx5_core")]])
    kernel = host.kernel            # KernelOps; paths: host.sysfs_root, host.dev_root
    host.device("0000:3b:00.1").dma_write(iova, 4096)

Each inner list is one IOMMU group, numbered from ``config.first_group``. A group is
viable unless a ``HostDevice`` in it is bound to a host driver; a group of only
``HostDevice``s has no ``/dev/vfio/N`` ("not ours" devices). An mdev (``kind="mdev"``)
must be alone in its group, as the kernel gives each mdev its own. ``build_parts``
(default ``vfiod.kernel.sim.migration.build_parts``) supplies each device's migration,
DMA logging and extra regions.

Spec knobs read here (``DeviceSpec.extra``): ``parent`` (mdev parent, default "mtty"),
``mdev_type`` (default "<parent>-2"), ``mdev_type_name``, ``iommu_dirty_tracking``
(this device's IOMMU has A/D bits; default ``config.iommu_dirty_tracking``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vfiod.kernel.sim.cdev import CdevFile
from vfiod.kernel.sim.container import ContainerFile
from vfiod.kernel.sim.fdfacts import CDEV_MAJOR, CONTAINER_RDEV, GROUP_MAJOR, IOMMUFD_RDEV
from vfiod.kernel.sim.group import SimGroup
from vfiod.kernel.sim.interfaces import BuildParts, DeviceSpec
from vfiod.kernel.sim.iommufd import IommufdFile
from vfiod.kernel.sim.kernel import NodeOpener, SimKernel
from vfiod.kernel.sim.node import SimDevice
from vfiod.kernel.sim.sysfs import SysfsTree
from vfiod.kernel.sim.type1 import Type1Config


@dataclass(frozen=True)
class HostDevice:
    """A group member that is not a VFIO device: bound to a host driver (the group is not
    viable and the device is "not ours"), or unbound (``driver=None``)."""

    name: str
    driver: str | None = "ixgbe"
    vendor: int = 0x8086
    device: int = 0x10FB


@dataclass(frozen=True)
class SimHostConfig:
    first_group: int = 10
    type1: Type1Config = field(default_factory=Type1Config)
    cdev: bool = True                     # 6.6+: /dev/vfio/devices/vfioN
    iommufd: bool = True                  # /dev/iommu
    iommu_dirty_tracking: bool = False    # IOMMU A/D bits (IOMMU_HW_CAP_DIRTY_TRACKING)
    memlock_limit: int | None = None      # RLIMIT_MEMLOCK bytes; None = CAP_IPC_LOCK
    fault_log_limit: int | None = None    # FaultInjector.log_limit; None keeps every event
    debugfs: str = "vfio"                 # sim/debugfs.py DEBUGFS_MODES: what debugfs shows


Member = DeviceSpec | HostDevice


def _default_build_parts() -> BuildParts:
    from vfiod.kernel.sim.migration import build_parts  # helper C's package

    return build_parts


class SimHost:
    """Build with ``SimHost.build``; ``close()`` frees the real memory behind BARs."""

    def __init__(self, root: Path, kernel: SimKernel, config: SimHostConfig) -> None:
        self.root = root
        self.kernel = kernel
        self.config = config
        self.sysfs_root = str(root / "sys")
        self.dev_root = str(root / "dev")
        self.groups: dict[int, SimGroup] = {}
        self.devices: dict[str, SimDevice] = {}
        self.host_devices: dict[str, HostDevice] = {}

    @classmethod
    def build(cls, root: Path | str,
              groups: Sequence[Sequence[Member]] | Mapping[int, Sequence[Member]],
              *, config: SimHostConfig | None = None, build_parts: BuildParts | None = None,
              kernel: SimKernel | None = None) -> SimHost:
        config = config or SimHostConfig()
        host = cls(Path(root), kernel or SimKernel(), config)
        host.kernel.memlock_limit = config.memlock_limit
        host.kernel.faults.log_limit = config.fault_log_limit
        host.kernel.debugfs.set_mode(config.debugfs)
        numbered: dict[int, Sequence[Member]] = (
            dict(groups) if isinstance(groups, Mapping) else
            {config.first_group + i: list(g) for i, g in enumerate(groups)})
        host._build(numbered, build_parts or _default_build_parts())
        return host

    def _build(self, numbered: dict[int, Sequence[Member]], build_parts: BuildParts) -> None:
        sysfs = SysfsTree(Path(self.sysfs_root))
        dev = Path(self.dev_root)
        (dev / "vfio").mkdir(parents=True, exist_ok=True)
        self._node(dev / "vfio/vfio", lambda flags: ContainerFile(self.kernel, self.config.type1))
        virtual = Path(self.sysfs_root) / "devices/virtual"
        sysfs.char_device(*CONTAINER_RDEV, virtual / "misc/vfio")
        if self.config.iommufd:
            self._node(dev / "iommu", lambda flags: IommufdFile(self.kernel))
            sysfs.char_device(*IOMMUFD_RDEV, virtual / "misc/iommu")
        cdevs = 0
        mdev_counts: dict[tuple[str, str], int] = {}
        for number, members in sorted(numbered.items()):
            specs = [m for m in members if isinstance(m, DeviceSpec)]
            if any(s.kind == "mdev" for s in specs) and len(members) != 1:
                raise ValueError(f"group {number}: an mdev must be alone in its group")
            devices: list[SimDevice] = []
            for m in members:
                if m.name in self.devices or m.name in self.host_devices:
                    raise ValueError(f"device {m.name} appears twice")
                if isinstance(m, HostDevice):
                    self.host_devices[m.name] = m
                    sysfs.pci_device(m.name, m.vendor, m.device, m.driver, number)
                    continue
                node = SimDevice(m, build_parts(m, self.kernel), self.kernel,
                                 self.config.type1.caps_align8)
                node.iommu_dirty_tracking = bool(m.extra.get(
                    "iommu_dirty_tracking", self.config.iommu_dirty_tracking))
                if m.kind == "mdev":
                    parent = str(m.extra.get("parent", "mtty"))
                    mtype = str(m.extra.get("mdev_type", f"{parent}-2"))
                    used = mdev_counts[(parent, mtype)] = mdev_counts.get((parent, mtype), 0) + 1
                    driver = parent if m.driver == "vfio-pci" else m.driver
                    path = sysfs.mdev_device(m.name, parent, mtype,
                                             str(m.extra.get("mdev_type_name", mtype)),
                                             driver, number, max(0, 8 - used))
                elif m.kind == "pci":
                    path = sysfs.pci_device(m.name, m.vendor, m.device, m.driver, number)
                else:
                    raise ValueError(f"{m.name}: kind must be 'pci' or 'mdev', not {m.kind!r}")
                if self.config.cdev:
                    node.cdev_name = f"vfio{cdevs}"
                    sysfs.cdev(path, node.cdev_name, CDEV_MAJOR, cdevs)
                    self._node(dev / "vfio/devices" / node.cdev_name, self._cdev_opener(node))
                    cdevs += 1
                self.devices[m.name] = node
                self.kernel.debugfs.register(m.name, node.parts.mig_state)
                devices.append(node)
            host_members = [(m.name, m.driver) for m in members if isinstance(m, HostDevice)]
            group = SimGroup(number, devices, host_members)
            for node in devices:
                node.group = group
            self.groups[number] = group
            if devices:       # /dev/vfio/N exists once a member is bound to a VFIO driver
                self._node(dev / "vfio" / str(number), self._group_opener(group))
                sysfs.char_device(GROUP_MAJOR, number, virtual / "vfio" / str(number))

    def _cdev_opener(self, node: SimDevice) -> NodeOpener:
        return lambda flags: CdevFile.open(node, self.kernel)

    def _group_opener(self, group: SimGroup) -> NodeOpener:
        return lambda flags: group.open(self.kernel, flags)

    def _node(self, path: Path, opener: NodeOpener) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        self.kernel.register_node(os.fspath(path), opener)

    # -- lookups ---------------------------------------------------------------------------
    def device(self, name: str) -> SimDevice:
        try:
            return self.devices[name]
        except KeyError:
            raise KeyError(f"no simulated VFIO device {name!r}; have "
                           f"{sorted(self.devices)}") from None

    def group(self, number: int) -> SimGroup:
        return self.groups[number]

    def group_of(self, name: str) -> int:
        for number, g in self.groups.items():
            if g.device(name) is not None or any(n == name for n, _ in g.host_members):
                return number
        raise KeyError(f"no device {name!r} in any group")

    def close(self) -> None:
        for node in self.devices.values():
            node.pci.close()
