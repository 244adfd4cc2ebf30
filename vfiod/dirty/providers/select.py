"""Choosing a container's dirty-page provider (docs/architecture.md §1 step 4, §3; docs/kernel-contract.md §3.6,
§3.9, §4.4, §7).

Order of preference, as QEMU's VFIO listener does it:

1. device DMA logging, when EVERY device of the container supports it (a PROBE of
   ``DMA_LOGGING_START``): precise, and it sees writes type1 cannot;
2. the type1 container's own tracking, when ``VFIO_IOMMU_GET_INFO`` carries the MIGRATION
   capability. Precise only when every device is an mdev (pinned-page scope); with any
   IOMMU-backed device the kernel reports every mapped page dirty (§3.9);
3. iommufd HWPT tracking, when the space is an iommufd IOAS whose devices are attached to
   a HWPT allocated with ``IOMMU_HWPT_ALLOC_DIRTY_TRACKING``;
4. "none": every mapped page is dirty at every sync.

``select`` returns the whole chain, best first, so the tracker can fall back down it when a
provider turns out unavailable at START or REPORT time (EOPNOTSUPP/ENOTTY), and ``notes``
saying why each better provider was not taken. ``preferred`` is the one a tracker would
start with: what status and ``vfiod ctl check`` show as a device's tracker.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

from vfiod.dirty.providers.base import DirtyProvider, DmaSpace, ProviderName
from vfiod.dirty.providers.device_logging import DeviceLoggingProvider
from vfiod.dirty.providers.iommufd import IommufdProvider
from vfiod.dirty.providers.none import REASON as NONE_REASON
from vfiod.dirty.providers.none import NoneProvider
from vfiod.dirty.providers.type1 import Type1Provider
from vfiod.errors import KernelError

# mdev devices are named by UUID; PCI devices by BDF (docs/kernel-contract.md §4.1, docs/architecture.md §1)
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


def is_mdev(name: str) -> bool:
    return bool(_UUID.match(name))


@dataclass
class Selection:
    chain: list[DirtyProvider]                          # best first; last is "none"
    notes: list[str] = field(default_factory=list)      # why better ones were not taken


def select(space: DmaSpace, disable: Collection[str] = ()) -> Selection:
    """The provider chain for ``space``. ``disable`` names providers not to use (e.g.
    ``{"device-logging"}`` like QEMU's ``x-device-dirty-page-tracking=off``)."""
    unknown = set(disable) - set(ProviderName) - {""}
    if unknown:
        raise ValueError(f"dirty provider selection for {space.name}: unknown provider "
                         f"name(s) {sorted(unknown)}; known: {', '.join(ProviderName)}")
    chain: list[DirtyProvider] = []
    notes: list[str] = []
    n = len(space.devices)

    dev_logging, type1, iommufd = (ProviderName.DEVICE_LOGGING, ProviderName.TYPE1,
                                   ProviderName.IOMMUFD)
    if dev_logging in disable:
        notes.append(f"{dev_logging}: disabled by configuration")
    elif n == 0:
        notes.append(f"{dev_logging}: the container has no devices")
    else:
        lacking = []
        for dev in space.devices:
            try:
                ok = dev.dma_logging_probe()
            except KernelError as e:
                ok = False
                notes.append(f"{dev_logging}: probe failed: {e}")
            if not ok:
                lacking.append(dev.name)
        if lacking:
            notes.append(f"{dev_logging}: not supported by {', '.join(lacking)} "
                         f"(needs every device of the container)")
        else:
            chain.append(DeviceLoggingProvider(
                space, reason=f"device DMA logging on all {n} device(s) of the container"))

    if type1 in disable:
        notes.append(f"{type1}: disabled by configuration")
    elif space.type1 is None:
        notes.append(f"{type1}: not a type1 container")
    else:
        try:
            cap = space.type1.iommu_info(refresh=False).dirty
        except KernelError as e:
            cap = None
            notes.append(f"{type1}: {e}")
        if cap is None:
            notes.append(f"{type1}: VFIO_IOMMU_GET_INFO has no MIGRATION capability "
                         "(iommufd-compat container or kernel < 5.8)")
        else:
            physical = [d.name for d in space.devices if not is_mdev(d.name)]
            precise = not physical
            why = (f"type1 container dirty tracking (VFIO_IOMMU_DIRTY_PAGES, page "
                   f"{cap.pgsize:#x}); ")
            why += ("all devices are mdevs (pinned-page scope): only written pages are "
                    "reported" if precise else
                    f"IOMMU-backed device(s) {', '.join(physical)}: the kernel reports "
                    "every mapped page dirty at every sync")
            chain.append(Type1Provider(space.type1, precise=precise, reason=why))

    if iommufd in disable:
        notes.append(f"{iommufd}: disabled by configuration")
    elif space.iommufd is None:
        notes.append(f"{iommufd}: not an iommufd space")
    elif not space.iommufd.dirty_capable or space.iommufd.hwpt_id is None:
        notes.append(f"{iommufd}: no HWPT allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING "
                     "(IOMMU lacks IOMMU_HW_CAP_DIRTY_TRACKING?)")
    else:
        chain.append(IommufdProvider(
            space, reason=f"iommufd HWPT {space.iommufd.hwpt_id} dirty tracking"))

    chain.append(NoneProvider(space, reason=NONE_REASON))
    return Selection(chain, notes)


def preferred(space: DmaSpace, disable: Collection[str] = ()) -> ProviderName:
    """The provider a tracker over ``space`` starts with (it may still fall back at START)."""
    return select(space, disable).chain[0].name
