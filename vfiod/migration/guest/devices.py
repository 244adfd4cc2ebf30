"""A guest's devices and DMA containers, and the steps of opening a device for migration
(docs/architecture.md §1 steps 2 and 4; docs/kernel-contract.md §3.1 container/group/device, §3.5 reset, §5.1
v1 discovery, §6.2 v2 flags, §7 device DMA logging).

Both the guest builder and the migratability check of a device no guest owns go through
these steps, so they open, probe and describe a device the same way:

* ``join_group``: a group attached to a container (type1v2 set on the first one);
* ``device_identity``: what sysfs says the device is (kind, driver, vendor, subsystem ...);
* ``dma_logging_supported``: whether the device accepts DMA_LOGGING_START;
* ``claim_running``: the migration driver of a device vfiod takes for a guest, which must
  be RUNNING (reset if a previous owner left it elsewhere);
* ``device_info``: the device as the stream header, preflight and ``check`` describe it,
  with its capability names.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from vfiod.errors import KernelError, MigrationError
from vfiod.kernel.ops import KernelOps
from vfiod.migration.device.probe import probe
from vfiod.migration.device.protocol import MigrationDriver
from vfiod.migration.states import MigState
from vfiod.migration.stream.header import DeviceInfo
from vfiod.vfio import Container, Device, DmaMapping, Group, HostPaths
from vfiod.vfio.discovery import discover_device

log = logging.getLogger(__name__)


def device_info(name: str, driver: MigrationDriver, dma_logging: bool,
                identity: dict[str, str] | None = None, dev_id: str = "") -> DeviceInfo:
    """The device as the stream header, preflight and ``check`` describe it: its id
    ("" = its name), protocol, v2 flags, capability names (the driver's, plus
    ``DMA_LOGGING`` if it logs)."""
    flags = driver.migration_flags
    caps = list(driver.capability_names)
    if dma_logging:
        caps.append("DMA_LOGGING")
    return DeviceInfo(name, driver.protocol, flags, dict(identity or {}), tuple(caps),
                      dev_id)


@dataclass
class GuestDevice:
    name: str
    device: Device
    driver: MigrationDriver
    container: str
    pre_copy_dirty_page_tracking: bool = True
    identity: dict[str, str] = field(default_factory=dict)
    dma_logging: bool = False
    #: the host-independent id a migration pairs the device by; "" = its name
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or self.name

    def info(self) -> DeviceInfo:
        """The device as the stream header and preflight describe it."""
        return device_info(self.name, self.driver, self.dma_logging, self.identity, self.id)


@dataclass
class GuestContainer:
    name: str
    container: Container
    mappings: list[DmaMapping] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    #: dirty providers not to use here (``TrackedContainer.disable``)
    disable: tuple[str, ...] = ()


def join_group(kernel: KernelOps, paths: HostPaths, container: Container,
               number: int) -> Group:
    """Open IOMMU group ``number`` and attach it to ``container`` (setting type1v2 on the
    container with its first group); the group is closed again if attaching fails."""
    group = Group.open(kernel, paths, number)
    try:
        group.set_container(container)
    except BaseException:
        group.close()
        raise
    if container.iommu_type is None:
        container.set_iommu()
    return group


def group_members(kernel: KernelOps, paths: HostPaths, number: int) -> list[str]:
    """The devices sysfs lists in IOMMU group ``number``."""
    return kernel.listdir(os.path.join(paths.iommu_group_dir(number), "devices"))


def device_identity(kernel: KernelOps, paths: HostPaths, name: str) -> dict[str, str]:
    """What sysfs says ``name`` is, as strings: kind, driver, mdev type, vendor, device
    and (PCI) subsystem ids; preflight compares it between the paired devices."""
    identity: dict[str, str] = {}
    found = discover_device(kernel, name, paths)
    for key in ("kind", "driver", "mdev_type"):
        val = getattr(found, key)
        if val is not None:
            identity[key] = str(val)
    for key in ("vendor", "device", "subsystem_vendor", "subsystem_device"):
        val = getattr(found, key)
        if val is not None:
            identity[key] = f"{val:#06x}"
    return identity


def dma_logging_supported(dev: Device) -> bool:
    """Whether ``dev`` accepts device DMA logging (any failure of the probe: no)."""
    try:
        return dev.dma_logging_probe()
    except KernelError:
        return False


def claim_running(name: str, dev: Device, allow_reset: bool = True) -> MigrationDriver:
    """A device vfiod claims must be RUNNING. Closing a device fd does not always
    return it there (the mtty sample keeps STOP across close and reopen, seen on
    6.12), so a device left stopped or mid-session by a previous owner is reset
    (VFIO_DEVICE_RESET: back to RUNNING, any data session dropped, docs/kernel-contract.md
    §3.5) instead of being migrated from the wrong state. A VMM's device that may not be
    reset (``allow_reset`` False, docs/architecture.md §8.1) is refused instead."""
    driver = probe(dev)                 # reads the device's state back
    state = driver.state()
    if state is MigState.RUNNING:
        return driver
    if not allow_reset:
        raise MigrationError(f"{name}: device is in {state.name}, not RUNNING, and its VMM "
                             "did not allow vfiod to reset it (allow_reset false): the "
                             "device needs its VMM")
    log.warning("%s: VFIO_DEVICE_RESET: found in %s, not RUNNING (left there by a previous "
                "owner); reset to RUNNING before claiming it", name, state.name)
    try:
        dev.reset()
    except KernelError as e:
        raise KernelError(e.errno, e.op, name,
                          f"device is in {state.name}, not RUNNING, and reset failed") from e
    driver = probe(dev)
    if driver.state() is not MigState.RUNNING:
        raise MigrationError(f"{name}: device is in {driver.state().name} after "
                             "VFIO_DEVICE_RESET, not RUNNING; refusing to claim it")
    return driver
