"""A guest container made of the VFIO fds a VMM handed over (docs/architecture.md §8.1;
docs/kernel-contract.md §3.1): vfiod works on its own copies (``dup``) of the VMM's
container, group and device fds, so closing them never closes what the VMM still uses,
and it neither attaches groups nor maps DMA: the VMM did both. The container's mappings
are taken as the guest's configured ranges at iova == gpa, the layout the dirty
tracker reads bitmaps in (the VMM must have mapped them so). Each device's migration
driver is claimed RUNNING and may reset the device only if the VMM allowed it.

The fds named in ``HandedVfio`` stay the caller's; the guest closes its copies.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import vfiod.abi.vfio as v
from vfiod.errors import KernelError
from vfiod.migration.device.base import DriverBase
from vfiod.migration.guest.devices import (
    GuestContainer,
    GuestDevice,
    claim_running,
    device_identity,
    dma_logging_supported,
)
from vfiod.migration.guest.model import Guest
from vfiod.vfio import Container, Device, DmaMapping, Group
from vfiod.vfio.discovery import discover_device


@dataclass(frozen=True)
class HandedVfio:
    """A VMM's fds for one container: the container, each group (by number) and each
    device (by name), already checked (vfiod/vfio/handover.py); ``allow_reset``: whether
    vfiod may reset the devices (the last rung of the recovery ladder)."""

    container: int
    groups: Mapping[int, int] = field(default_factory=dict, hash=False)
    devices: Mapping[str, int] = field(default_factory=dict, hash=False)
    allow_reset: bool = False


def adopt_container(guest: Guest, name: str, handed: HandedVfio, *,
                    maps: Sequence[tuple[int, int]] | None = None,
                    pre_copy_dirty_page_tracking: Mapping[str, bool] | None = None,
                    ids: Mapping[str, str] | None = None,
                    disable: Sequence[str] = ()) -> GuestContainer:
    """Add container ``name`` of ``guest`` from copies of the fds in ``handed``; on a
    failure the copies made so far belong to the guest (``guest.close`` closes them)."""
    kernel = guest.kernel
    copy = kernel.dup(handed.container)
    try:
        c = Container.adopt(kernel, copy, v.VFIO_TYPE1v2_IOMMU)
    except BaseException:
        kernel.close(copy)
        raise
    gc = GuestContainer(name, c, disable=tuple(disable))
    guest.containers.append(gc)
    groups: dict[int, Group] = {}
    for number, fd in handed.groups.items():
        groups[number] = Group.adopt(kernel, kernel.dup(fd), number, c)
    opt = dict(pre_copy_dirty_page_tracking or {})
    for dev_name, fd in handed.devices.items():
        found = discover_device(kernel, dev_name, guest.paths)
        if found.group is None or found.group not in groups:
            raise KernelError(errno.ENODEV, "attach", dev_name,
                              f"no handed-over group holds it (its group: {found.group})")
        grp = groups[found.group]
        dev = Device(kernel, kernel.dup(fd), dev_name, group=grp)
        grp.devices.append(dev)
        identity = device_identity(kernel, guest.paths, dev_name)
        logging = dma_logging_supported(dev)
        driver = claim_running(dev_name, dev, handed.allow_reset)
        if isinstance(driver, DriverBase):
            driver.allow_reset = handed.allow_reset
        gd = GuestDevice(dev_name, dev, driver, name, opt.pop(dev_name, True), identity,
                         logging, (ids or {}).get(dev_name, dev_name))
        gc.devices.append(dev_name)
        guest.devices.append(gd)
    for gpa, size in (maps if maps is not None else [(b.gpa, b.size) for b in guest.ram]):
        guest.block_at(gpa)                     # inside guest RAM
        m = DmaMapping(gpa, size, gpa)
        c.know_mapping(m)
        gc.mappings.append(m)
    return gc
