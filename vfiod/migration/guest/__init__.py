"""The guest a migration moves, and how one is assembled and checked (docs/architecture.md §1 steps
2-4).

Modules:

* ``memory``        ``RamBlock``: one RAM region (a ``RamRegion``) mapped into this process
* ``devices``       ``GuestDevice``, ``GuestContainer`` and the steps of opening a device:
  joining its group, its identity, DMA logging, claiming it RUNNING, ``device_info``
* ``model``         ``Guest``: RAM, containers, devices, dirty tracker, run state, teardown
* ``adopted``       ``HandedVfio``, ``adopt_container``: a container made of copies of the
  VFIO fds a VMM handed over (docs/architecture.md §8.1)
* ``builder``       ``GuestPlan`` and ``build_guest``: the one assembly of a guest, for the
  daemon, ``vfiod demo`` and the tests
* ``migratability`` ``Migratability``: what a device offers a migration, for the devices of
  a guest and for a device no guest owns (``vfiod ctl check``)
"""

from vfiod.migration.guest.adopted import HandedVfio
from vfiod.migration.guest.builder import (
    ContainerPlan,
    DevicePlan,
    GuestPlan,
    UnusableDevice,
    build_guest,
)
from vfiod.migration.guest.devices import GuestContainer, GuestDevice
from vfiod.migration.guest.memory import RamBlock
from vfiod.migration.guest.model import Guest, RunStateHandler

__all__ = [
    "ContainerPlan", "DevicePlan", "Guest", "GuestContainer", "GuestDevice", "GuestPlan",
    "HandedVfio",
    "RamBlock", "RunStateHandler", "UnusableDevice", "build_guest",
]
