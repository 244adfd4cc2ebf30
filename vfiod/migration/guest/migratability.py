"""The migratability check: what a device offers a migration, found the same way for a
device of an open guest and for a device no guest owns (docs/architecture.md §1 step 4 probes;
docs/kernel-contract.md §5.1 v1 discovery, §6.2 v2 flags, §3.9 and §7 dirty tracking).

``Migratability`` is the answer for one device that has a migration driver: its protocol
and capability names (``device_info``), whether it logs its DMA, and the dirty provider
its container would start with (``tracker_choice``: the head of the provider chain
``select`` builds). A device without a driver is not migratable: the probe raises
``NotMigratable`` with the reason.

* ``guest_migratability``: every device of an open ``Guest``, from what it probed when it
  was opened (no syscall but the provider selection);
* ``probe_unowned_device``: a device no guest owns, probed on the spot: a temporary
  container, its group, the device fd, the migration driver probe and the provider
  selection, then everything is closed again. The device is not claimed (no reset), so
  probing it changes nothing; if another process holds the group (a VMM), the kernel's
  EBUSY is raised.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from vfiod.dirty.providers.base import DmaSpace
from vfiod.dirty.providers.select import preferred
from vfiod.errors import KernelError, VfiodError
from vfiod.kernel.ops import KernelOps
from vfiod.migration.device.probe import probe
from vfiod.migration.device.protocol import MigrationDriver
from vfiod.migration.guest.devices import device_info, dma_logging_supported, join_group
from vfiod.migration.guest.model import Guest
from vfiod.vfio import Container, HostPaths


@dataclass(frozen=True)
class Migratability:
    """See the module docstring."""

    protocol: str
    capabilities: tuple[str, ...]
    dma_logging: bool
    #: first dirty provider of the device's container; None: none could be chosen
    tracker: str | None
    #: why no provider could be chosen (empty when ``tracker`` is set)
    tracker_error: str = ""

    @property
    def summary(self) -> str:
        """``migration v2 (STOP_COPY, PRE_COPY)``: the protocol and its capabilities."""
        return f"migration {self.protocol} ({', '.join(self.capabilities)})"


def tracker_choice(space: DmaSpace, disable: Collection[str] = ()) -> tuple[str | None, str]:
    """(the dirty provider a tracker on ``space`` starts with, ""), or (None, why not)."""
    try:
        return preferred(space, disable), ""
    except (VfiodError, ValueError) as e:
        return None, str(e)


def guest_migratability(guest: Guest) -> dict[str, Migratability]:
    """Device name -> its answer, for every device of ``guest``, in its device order."""
    trackers = {con.name: tracker_choice(guest.dma_space(con), con.disable)
                for con in guest.containers}
    out = {}
    for gd in guest.devices:
        info = gd.info()
        out[gd.name] = Migratability(info.protocol, info.capabilities, gd.dma_logging,
                                     *trackers[gd.container])
    return out


def probe_unowned_device(kernel: KernelOps, paths: HostPaths, name: str,
                         group: int) -> Migratability:
    """Probe ``name`` (in IOMMU group ``group``) on the spot; see the module docstring.
    Raises ``NotMigratable`` or the ``KernelError`` that stopped the probe."""
    container = Container.open(kernel, paths)
    driver: MigrationDriver | None = None
    try:
        dev = join_group(kernel, paths, container, group).get_device(name)
        driver = probe(dev)
        logging = dma_logging_supported(dev)
        info = device_info(name, driver, logging)
        tracker = tracker_choice(DmaSpace(name, [dev], type1=container))
        return Migratability(info.protocol, info.capabilities, logging, *tracker)
    finally:
        if driver is not None:
            try:
                driver.cleanup()          # v1 window mappings go before the device fd
            except KernelError:
                pass
        container.close()
