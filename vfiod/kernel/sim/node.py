"""A simulated VFIO device as the kernel holds it, independent of any open fd: its spec,
the parts ``build_parts`` plugged into it, its PCI function (regions, IRQs), which IOMMU
domain its DMA goes through, and the test hooks that make it act like hardware
(``dma_write``, ``pin_pages``, ``signal_irq``).

DMA (docs/kernel-contract.md §3.9, §4.4, §7): a device write goes through the domain the device is
attached to — the type1 container of its group, or the iommufd HWPT its cdev is attached
to — which translates and marks pages dirty by its own rules; then every ``DmaListener``
(device DMA logging) hears about it. A write to an IOVA nothing maps is an IOMMU fault:
``EFAULT``, and no listener hears of it.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Protocol

from vfiod.kernel.sim.base import fail
from vfiod.kernel.sim.interfaces import DeviceParts, DeviceSpec
from vfiod.kernel.sim.pci import PciFunction

if TYPE_CHECKING:
    from vfiod.kernel.sim.group import SimGroup
    from vfiod.kernel.sim.kernel import SimKernel
    from vfiod.kernel.sim.type1 import Type1Iommu


class DmaDomain(Protocol):
    """What a device's DMA is translated by (a type1 container or an iommufd HWPT)."""

    def dma_write(self, device: SimDevice, iova: int, length: int,
                  data: bytes | None) -> None: ...


class SimDevice:
    """One VFIO device (a PCI function bound to vfio-pci/a variant driver, or an mdev)."""

    def __init__(self, spec: DeviceSpec, parts: DeviceParts, kernel: SimKernel,
                 caps_align8: bool = True) -> None:
        self.spec = spec
        self.name = spec.name
        self.parts = parts
        self.kernel = kernel
        self.caps_align8 = caps_align8
        self.pci = PciFunction(spec, kernel.linux)
        self.group: SimGroup | None = None
        self.cdev_name: str | None = None
        self.cdev_open = 0                     # open /dev/vfio/devices/vfioN files
        self.open_count = 0                    # open device fds (group or cdev path)
        self.iommufd_domain: DmaDomain | None = None   # HWPT when attached through a cdev
        self.iommu_dirty_tracking = bool(spec.extra.get("iommu_dirty_tracking", False))

    @property
    def kind(self) -> str:
        return self.spec.kind

    def __repr__(self) -> str:
        return f"SimDevice({self.name!r}, {self.kind})"

    # -- open/close bookkeeping ------------------------------------------------------------
    def opened(self) -> None:
        self.open_count += 1

    def closed(self) -> None:
        """Last close returns the device to its power-on state (docs/kernel-contract.md §6.3: closing
        the device fd ends any migration session and goes back to RUNNING), then ends
        what a reset keeps (``Closable``: a DMA-logging session)."""
        self.open_count -= 1
        if self.open_count == 0:
            self.reset_parts()
            for part in self.parts.closables:
                part.on_close()
            self.pci.reset()

    def reset_parts(self) -> None:
        for part in self.parts.resettables:
            part.reset()

    # -- hardware-like behaviour (test hooks) ----------------------------------------------
    def domain(self) -> DmaDomain | None:
        if self.iommufd_domain is not None:
            return self.iommufd_domain
        group = self.group
        if group is not None and group.container is not None:
            return group.container.iommu
        return None

    def dma_write(self, iova: int, length: int, data: bytes | None = None) -> None:
        """The device writes ``length`` bytes at ``iova`` (``data`` if given lands in the
        memory behind the mapping). Marks pages dirty for whoever tracks them."""
        if length <= 0 or iova < 0:
            raise ValueError(f"dma_write({iova:#x}, {length}): empty or negative range")
        if data is not None and len(data) != length:
            raise ValueError(f"dma_write: {len(data)} data bytes for a {length}-byte write")
        with self.kernel.lock:
            dom = self.domain()
            if dom is None:
                raise fail(errno.EFAULT, f"DMA write {iova:#x}+{length:#x}", self.name,
                           "device is not attached to any IOMMU domain")
            dom.dma_write(self, iova, length, data)
            for listener in self.parts.dma_listeners:
                listener.on_dma_write(iova, length)

    def pin_pages(self, iova: int, length: int) -> None:
        """``vfio_pin_pages`` by an emulated-IOMMU (mdev) driver: the pages stay dirty in
        type1's pinned scope until unpinned (docs/kernel-contract.md §3.9). Since 6.1 only emulated
        devices may pin."""
        if self.kind != "mdev":
            raise fail(errno.EINVAL, "vfio_pin_pages", self.name,
                       "only emulated-IOMMU (mdev) devices pin pages")
        with self.kernel.lock:
            iommu = self._type1("vfio_pin_pages")
            iommu.pin(iova, length, pin=True)

    def unpin_pages(self, iova: int, length: int) -> None:
        with self.kernel.lock:
            iommu = self._type1("vfio_unpin_pages")
            iommu.pin(iova, length, pin=False)

    def _type1(self, op: str) -> Type1Iommu:
        group = self.group
        iommu = group.container.iommu if group and group.container else None
        if iommu is None:
            raise fail(errno.EINVAL, op, self.name, "no type1 IOMMU behind this device")
        return iommu

    def signal_irq(self, index: int, vector: int = 0) -> bool:
        """Raise interrupt ``vector`` of IRQ ``index``: writes the eventfd the user set with
        VFIO_DEVICE_SET_IRQS (through the real kernel). False if none is set."""
        fd = self.pci.irq_eventfd(index, vector)
        if fd is None:
            return False
        self.kernel.linux.write(fd, struct.pack("=Q", 1))
        return True
