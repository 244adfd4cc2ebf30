"""``build_guest``: the one way a ``Guest`` is assembled, for the daemon (from its
configuration), ``vfiod demo`` and the tests (docs/architecture.md §1 steps 2-4; docs/kernel-contract.md §3.1
container/group/device, §3.7 MAP_DMA).

A ``GuestPlan`` is a plain description: the RAM layout (``RamRegion``s, each a new memfd
unless ``ram_files`` names a shared file for it or ``ram_handed`` an fd a VMM handed
over; a container in ``vfio_handed`` is made of a VMM's VFIO fds, adopted.py), the
devices with the container each goes
in, its pre-copy dirty-tracking opt-out and its id (unique in the guest), and
per-container options (which guest ranges to map for DMA, dirty providers not to use). The builder maps the RAM, then opens the
containers in the order their first device is listed: the IOMMU groups of a container's
devices (from sysfs), the devices, their migration drivers (each claimed RUNNING) and the
DMA mappings. Anything that fails closes what was opened before it is raised (a
failure while closing is logged, not raised over it).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from vfiod.errors import KernelError
from vfiod.kernel.ops import KernelOps
from vfiod.migration.guest.adopted import HandedVfio, adopt_container
from vfiod.migration.guest.model import Guest
from vfiod.vfio import HostPaths, RamRegion
from vfiod.vfio.discovery import discover_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevicePlan:
    """A device of the guest: its name (PCI address or mdev UUID), its container, QEMU's
    ``x-pre-copy-dirty-page-tracking`` (False: the opt-out), and its ``id``: the
    host-independent name a migration pairs it by (docs/architecture.md §1.5; "" = its
    name)."""

    name: str
    container: str = "default"
    pre_copy_dirty_page_tracking: bool = True
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.name)


@dataclass(frozen=True)
class ContainerPlan:
    """Options of one container; a container listed by no ``ContainerPlan`` gets the
    defaults (every RAM region mapped, every dirty provider allowed)."""

    name: str
    #: guest ranges (gpa, size) mapped for DMA at iova == gpa; None: every RAM region
    maps: tuple[tuple[int, int], ...] | None = None
    #: dirty providers not to use here (``TrackedContainer.disable``)
    disable: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestPlan:
    """See the module docstring."""

    name: str
    ram: tuple[RamRegion, ...]
    devices: tuple[DevicePlan, ...] = ()
    containers: tuple[ContainerPlan, ...] = ()
    page_size: int = 4096
    #: RAM region name -> shared file backing it (hugetlbfs, /dev/shm); others: new memfds
    ram_files: Mapping[str, str] = field(default_factory=dict, hash=False)
    #: RAM region name -> (fd, offset) a VMM handed over (docs/architecture.md §8.1); the
    #: guest maps its own copy of the fd, the caller keeps and closes the fd itself
    ram_handed: Mapping[str, tuple[int, int]] = field(default_factory=dict, hash=False)
    #: container name -> the VFIO fds a VMM handed over for it (adopted.py): the guest
    #: works on copies; the caller keeps and closes these fds
    vfio_handed: Mapping[str, HandedVfio] = field(default_factory=dict, hash=False)

    def container_devices(self) -> dict[str, list[str]]:
        """Container name -> its device names, containers in order of first device."""
        out: dict[str, list[str]] = {}
        for d in self.devices:
            out.setdefault(d.container, []).append(d.name)
        return out


class UnusableDevice(KernelError):
    """A planned device that sysfs does not offer for VFIO (``ENODEV``); ``reason`` is
    what discovery said (not bound to a VFIO driver, no IOMMU group ...)."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(errno.ENODEV, "open", device, f"not usable: {reason}")
        self.device = device
        self.reason = reason


def build_guest(kernel: KernelOps, plan: GuestPlan, paths: HostPaths | None = None) -> Guest:
    """The guest ``plan`` describes, opened through ``kernel`` on the host at ``paths``.

    Raises ``UnusableDevice`` or ``NotMigratable`` naming the device at fault, or another
    ``KernelError``, ``VfiodError`` or ``ValueError``; nothing stays open then."""
    paths = paths or HostPaths()
    options = {c.name: c for c in plan.containers}
    members = plan.container_devices()
    unused = sorted(set(options) - set(members))
    if unused:
        raise ValueError(f"guest {plan.name}: containers {unused} have no device")
    id_of = {d.name: d.id for d in plan.devices}
    tracking = {d.name: d.pre_copy_dirty_page_tracking for d in plan.devices}
    guest = Guest(kernel, plan.name, plan.page_size, paths)
    try:
        for region in plan.ram:
            guest.add_ram(region, plan.ram_files.get(region.name),
                          plan.ram_handed.get(region.name))
        for cname, names in members.items():
            opt = options.get(cname, ContainerPlan(cname))
            if cname in plan.vfio_handed:
                adopt_container(guest, cname, plan.vfio_handed[cname], maps=opt.maps,
                                pre_copy_dirty_page_tracking={n: tracking[n] for n in names},
                                ids={n: id_of[n] for n in names}, disable=opt.disable)
                continue
            groups = sorted({_group_of(kernel, paths, n) for n in names})
            guest.add_container(cname, groups, devices=names, maps=opt.maps,
                                pre_copy_dirty_page_tracking={n: tracking[n] for n in names},
                                ids={n: id_of[n] for n in names},
                                disable=opt.disable)
    except BaseException:
        try:
            guest.close()
        except (KernelError, BufferError) as e:
            # the failure that stopped the build is the one to report
            log.error("guest %s: closing after a failed build: %s", plan.name, e)
        raise
    return guest


def _group_of(kernel: KernelOps, paths: HostPaths, name: str) -> int:
    found = discover_device(kernel, name, paths)
    if not found.vfio_capable or found.group is None:
        raise UnusableDevice(name, found.reason)
    return found.group
