"""Mapping changes while a container is tracked (docs/architecture.md §3 "no dirty bit is lost";
docs/kernel-contract.md §3.8, §4.4, §7).

Unmapping goes through the provider (type1: UNMAP_DMA with GET_DIRTY_BITMAP), and the
final bits of what was unmapped are merged into the guest's bitmap before the mapping
leaves the layout. If the provider fails: nothing changed and nothing lost is the
caller's error; otherwise the provider falls back or restarts, and whatever may have been
lost counts dirty (what was unmapped, and the whole container, marked after the new
START). A mapping added while tracking is tracked by type1 and iommufd by themselves;
device logging only logs the ranges given at START, so it restarts with the new list and
the container counts dirty once.
"""

from __future__ import annotations

from vfiod.dirty import bitmap_kernels as kernels
from vfiod.dirty.bitmap_args import rescaled_nbits
from vfiod.dirty.container_tracking import ContainerTracking
from vfiod.dirty.providers.base import Bitmap, ProviderName, ProviderUnavailable
from vfiod.dirty.tracker_layout import (
    RamRegion,
    TrackedContainer,
    check_mappings,
)
from vfiod.errors import KernelError
from vfiod.vfio.container import DmaMapping


def unmap_tracked(box: ContainerTracking, iova: int, size: int, *, running: bool) -> int:
    """Unmap [iova, iova+size) of ``box`` (whole mappings only) and merge the final dirty
    bits of what was unmapped; returns the dirty guest pages merged."""
    end = iova + size
    gone = [m for m in box.maps if m.iova >= iova and m.iova + m.size <= end]
    cut = [m for m in box.maps if m.iova < end and m.iova + m.size > iova and m not in gone]
    if cut or not gone:
        raise ValueError(f"dirty tracker unmap on {box.name}: [{iova:#x}, {end:#x}) "
                         + (f"cuts through the mapping at {cut[0].iova:#x}"
                            if cut else "holds no mapping"))
    chain = box.chain
    if not running or chain is None:
        box.spec.space.unmap(iova, size)
        box.forget(gone)
        return 0
    try:
        bits = chain.current.unmap(iova, size)
    except (ProviderUnavailable, KernelError) as e:
        still = all(box.spec.space.is_mapped(m.iova) for m in gone)
        if still and not isinstance(e, ProviderUnavailable):
            raise                       # nothing changed and nothing lost: caller's call
        n = 0
        if not still:                   # unmapped, final bits unknown: all count dirty
            n = box.mark_maps(gone)
            box.forget(gone)
        box.recover(e, f"{chain.name} unmap failed: {e}")     # the log may be lost (§7)
        box.mark_all()                  # after the new START: nothing slips between
        if still:
            return unmap_tracked(box, iova, size, running=running)
        return n
    return _merge_unmapped(box, iova, bits, gone)


def _merge_unmapped(box: ContainerTracking, iova: int, bits: Bitmap,
                    gone: list[DmaMapping]) -> int:
    pg = box.running_chain().page_size
    assert pg is not None
    page_size = box.page_size
    n = 0
    for m in gone:
        part = kernels.test_and_clear(bits, (m.iova - iova) // pg, m.size // pg)
        nbits = m.size // pg
        if pg != page_size:
            part = kernels.rescale(part, pg, page_size, nbits)
            nbits = rescaled_nbits(nbits, pg, page_size)
        box.bitmap.merge_container(part, m.gpa // page_size, nbits)
        n += kernels.popcount(part, nbits)
    box.forget(gone)
    return n


def add_tracked_mapping(box: ContainerTracking, mapping: DmaMapping,
                        regions: list[RamRegion], *, running: bool) -> None:
    """Track a mapping the owner just created (MAP_DMA / IOAS_MAP)."""
    page_size = box.page_size
    probe = TrackedContainer(box.spec.space, [*box.maps, mapping])
    box.maps = check_mappings(probe, regions, page_size)
    chain = box.chain
    if running and chain is not None and chain.name == ProviderName.DEVICE_LOGGING:
        chain.restart(f"mapping at iova {mapping.iova:#x} added: device logging restarted "
                      "with the new ranges", box.ranges(), page_size)
        box.resegment()
        box.mark_all()
    else:
        box.resegment()
