"""What the daemon builds a configured guest from (docs/architecture.md §1 steps 2-4,
§8.1): ``config_plan`` turns a ``[[guest]]`` table, the devices' current opt-outs and the
fds a VMM handed over into the plain ``GuestPlan`` that ``build_guest`` assembles;
``RamInUse`` names the file bytes an open guest's RAM region holds (``attach`` refuses a
VMM's RAM file another guest already maps).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vfiod.daemon.config import GuestConfig
from vfiod.migration.guest import ContainerPlan, DevicePlan, GuestPlan, HandedVfio
from vfiod.vfio import RamRegion


@dataclass(frozen=True)
class RamInUse:
    """A guest's RAM region and the bytes of the file backing it."""

    guest: str
    region: str
    device: int                # st_dev, st_ino of the file
    inode: int
    offset: int
    size: int


def config_plan(gc: GuestConfig, tracking: Mapping[str, bool],
                handed: Mapping[str, tuple[int, int]] | None = None,
                vfio: Mapping[str, HandedVfio] | None = None) -> GuestPlan:
    """The builder's description of configured guest ``gc``; ``tracking``: the devices'
    current pre-copy dirty-tracking opt-outs (they survive a re-open); ``handed``, ``vfio``:
    the RAM fds (and offsets) and VFIO fds (by container) its VMM handed over."""
    containers = dict.fromkeys(d.container for d in gc.devices)
    return GuestPlan(
        gc.name, tuple(RamRegion(r.name, r.gpa, r.size) for r in gc.ram),
        tuple(DevicePlan(d.name, d.container,
                         tracking.get(d.name, d.pre_copy_dirty_page_tracking), d.id)
              for d in gc.devices),
        tuple(ContainerPlan(c, tuple((r.gpa, r.size) for r in gc.regions_of(c)))
              for c in containers),
        gc.page_size, {r.name: r.path for r in gc.ram if r.path is not None},
        dict(handed or {}), dict(vfio or {}))
