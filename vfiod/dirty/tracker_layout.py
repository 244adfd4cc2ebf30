"""What a dirty tracker tracks, checked before it starts (docs/architecture.md §3; docs/kernel-contract.md §3.8,
§4.4): the guest's RAM regions, and per DMA space (container) its mappings of IOVA ranges
onto guest memory and its devices' pre-copy opt-out settings.

The tracker merges each container's bits into the guest's bitmap at each mapping's guest
page, so the checks here are what that merge relies on: every address and size is a
non-zero multiple of the guest page, regions do not overlap, and each mapping lies inside
one RAM region and overlaps no other mapping of its container.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from vfiod.dirty.providers.base import DmaSpace
from vfiod.vfio.container import DmaMapping
from vfiod.vfio.layout import RamRegion


@dataclass
class TrackedContainer:
    """One DMA space of the guest, its mappings and its devices' opt-out settings."""

    space: DmaSpace
    mappings: Sequence[DmaMapping]
    #: device name -> False: QEMU's x-pre-copy-dirty-page-tracking=off (default: on)
    pre_copy_dirty_page_tracking: Mapping[str, bool] = field(default_factory=dict)
    #: provider names not to use, e.g. {"device-logging"}
    disable: Collection[str] = ()


def _aligned(what: str, page_size: int, **values: int) -> None:
    for k, v in values.items():
        if v < 0 or v % page_size:
            raise ValueError(f"dirty tracker: {what}: {k} {v:#x} is not a non-negative "
                             f"multiple of the {page_size:#x}-byte guest page")


def check_regions(regions: Sequence[RamRegion], page_size: int) -> list[RamRegion]:
    """The regions in address order, each page aligned, non-empty and apart."""
    out = sorted(regions, key=lambda r: r.gpa)
    for r in out:
        _aligned(f"region {r.name or hex(r.gpa)}", page_size, gpa=r.gpa, size=r.size)
        if r.size == 0:
            raise ValueError(f"dirty tracker: region {r.name or hex(r.gpa)} is empty")
    for a, b in zip(out, out[1:], strict=False):
        if b.gpa < a.gpa + a.size:
            raise ValueError(f"dirty tracker: regions at {a.gpa:#x} and {b.gpa:#x} overlap")
    return out


def check_mappings(c: TrackedContainer, regions: list[RamRegion],
                   page_size: int) -> list[DmaMapping]:
    """``c``'s mappings in IOVA order, each page aligned, inside one region, apart."""
    name = c.space.name
    maps = sorted(c.mappings, key=lambda m: m.iova)
    for m in maps:
        what = f"mapping iova {m.iova:#x} on {name}"
        _aligned(what, page_size, iova=m.iova, size=m.size, gpa=m.gpa)
        if m.size == 0:
            raise ValueError(f"dirty tracker: {what} is empty")
        if not any(r.gpa <= m.gpa and m.gpa + m.size <= r.gpa + r.size for r in regions):
            raise ValueError(f"dirty tracker: {what} maps guest [{m.gpa:#x}, "
                             f"{m.gpa + m.size:#x}), which is not inside one RAM region")
    for a, b in zip(maps, maps[1:], strict=False):
        if b.iova < a.iova + a.size:
            raise ValueError(f"dirty tracker: mappings at iova {a.iova:#x} and {b.iova:#x} "
                             f"on {name} overlap")
    return maps
