"""The simulated guest the dirty-tracking tests share (and a check of the rig itself).

``Rig`` builds a ``SimHost``, opens each container through the real vfio objects (type1
legacy path or cdev + iommufd), maps guest RAM with a chosen IOVA -> guest-physical layout
and writes through the devices' DMA (``SimDevice.dma_write``), remembering which guest
pages were written so tests can prove none of them is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import vfiod.abi.vfio as v
from vfiod.dirty.providers.base import DmaSpace, IommufdSpace
from vfiod.dirty.tracker_layout import IovaMapping, TrackedContainer
from vfiod.kernel.sim.host import SimHost, SimHostConfig
from vfiod.kernel.sim.interfaces import DeviceParts, DeviceSpec
from vfiod.vfio import Container, Group, HostPaths
from vfiod.vfio.cdev import CdevDevice
from vfiod.vfio.device import Device
from vfiod.vfio.iommufd import Iommufd

VADDR_BASE = 0x7F00_0000_0000       # fake user addresses: the simulator never touches them
GUEST_PAGE = 4096


def dev(name: str, kind: str = "pci", dma_logging: bool = False, **extra: object) -> DeviceSpec:
    """A migratable (v2 STOP_COPY|P2P|PRE_COPY) simulated device."""
    flags = v.VFIO_MIGRATION_STOP_COPY | v.VFIO_MIGRATION_P2P | v.VFIO_MIGRATION_PRE_COPY
    return DeviceSpec(name, kind=kind, mig_flags=flags, dma_logging=dma_logging, extra=extra)


def build_parts_or_empty():  # noqa: ANN201
    """Helper C's parts (DMA logging, migration) when they exist, else bare devices."""
    try:
        from vfiod.kernel.sim.migration import build_parts
    except ImportError:
        return lambda spec, fds: DeviceParts()
    return build_parts


def has_dma_logging_sim() -> bool:
    try:
        import vfiod.kernel.sim.migration  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class RigContainer:
    space: DmaSpace
    maps: list[IovaMapping] = field(default_factory=list)
    opt: dict[str, bool] = field(default_factory=dict)

    def tracked(self, disable: Sequence[str] = ()) -> TrackedContainer:
        return TrackedContainer(self.space, list(self.maps), self.opt, disable)


class Rig:
    def __init__(self, tmp: Path, groups: Sequence[Sequence[DeviceSpec]],
                 config: SimHostConfig | None = None) -> None:
        self.host = SimHost.build(tmp, groups, config=config, build_parts=build_parts_or_empty())
        self.kernel = self.host.kernel
        self.paths = HostPaths(self.host.sysfs_root, self.host.dev_root)
        self.containers: dict[str, RigContainer] = {}
        self.closers: list = []
        self.written: set[int] = set()        # guest pages written by DMA, not yet seen sent

    # -- building containers ------------------------------------------------------------
    def type1(self, name: str, group_numbers: Sequence[int]) -> RigContainer:
        c = Container.open(self.kernel, self.paths)
        self.closers.append(c.close)
        devices: list[Device] = []
        for n in group_numbers:
            g = Group.open(self.kernel, self.paths, n)
            g.set_container(c)
            if c.iommu_type is None:
                c.set_iommu()
            devices += [g.get_device(d.name) for d in self.host.group(n).devices]
        rc = RigContainer(DmaSpace(name, devices, type1=c))
        self.containers[name] = rc
        return rc

    def iommufd(self, name: str, device_names: Sequence[str], dirty: bool = True) -> RigContainer:
        ifd = Iommufd.open(self.kernel, self.paths)
        devs = [CdevDevice.open(self.kernel, n, self.paths) for n in device_names]
        self.closers.append(ifd.close)
        for d in devs:
            self.closers.insert(0, d.close)
        ioas = ifd.ioas_alloc()
        dev_ids = [d.bind(ifd) for d in devs]
        hwpt = ifd.hwpt_alloc(dev_ids[0], ioas, dirty_tracking=dirty)
        for d in devs:
            d.attach(hwpt)
        space = IommufdSpace(ifd, ioas, hwpt, dirty_capable=dirty)
        rc = RigContainer(DmaSpace(name, list(devs), iommufd=space))
        self.containers[name] = rc
        return rc

    def map(self, name: str, iova: int, gpa: int, size: int) -> IovaMapping:
        rc = self.containers[name]
        if rc.space.type1 is not None:
            rc.space.type1.map_dma(iova, VADDR_BASE + gpa, size)
        else:
            sp = rc.space.iommufd
            assert sp is not None
            sp.iommufd.ioas_map(sp.ioas_id, VADDR_BASE + gpa, size, iova=iova)
            sp.mappings.append((iova, size))
        m = IovaMapping(iova, size, gpa)
        rc.maps.append(m)
        return m

    def type1_of(self, name: str) -> Container:
        c = self.containers[name].space.type1
        assert c is not None
        return c

    def ioas_of(self, name: str) -> IommufdSpace:
        sp = self.containers[name].space.iommufd
        assert sp is not None
        return sp

    # -- device DMA ---------------------------------------------------------------------
    def write(self, device: str, container: str, iova: int, length: int) -> None:
        """``device`` writes [iova, iova+length); remember the guest pages it touched."""
        self.host.device(device).dma_write(iova, length)
        for m in self.containers[container].maps:
            lo, hi = max(iova, m.iova), min(iova + length, m.iova + m.size)
            if lo < hi:
                g0 = (m.gpa + lo - m.iova) // GUEST_PAGE
                g1 = (m.gpa + hi - 1 - m.iova) // GUEST_PAGE
                self.written.update(range(g0, g1 + 1))

    def sent(self, runs: tuple[np.ndarray, np.ndarray]) -> set[int]:
        """Pages in (first, count) runs; also forget them from ``written``."""
        pages: set[int] = set()
        for f, n in zip(runs[0].tolist(), runs[1].tolist(), strict=True):
            pages.update(range(f, f + n))
        self.written -= pages
        return pages

    def close(self) -> None:
        for fn in self.closers:
            fn()
        self.host.close()


def test_rig_maps_and_writes(tmp_path: Path) -> None:
    rig = Rig(tmp_path, [[dev("3f2504e0-4f89-11d3-9a0c-0305e82c3301", kind="mdev")]])
    try:
        rig.type1("c0", [10])
        rig.map("c0", 0x10000, 37 * GUEST_PAGE, 8 * GUEST_PAGE)
        rig.write("3f2504e0-4f89-11d3-9a0c-0305e82c3301", "c0", 0x10000 + GUEST_PAGE + 5, 10)
        assert rig.written == {38}
    finally:
        rig.close()
