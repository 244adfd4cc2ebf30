"""Type1 container dirty tracking: ``VFIO_IOMMU_DIRTY_PAGES`` START / GET_BITMAP / STOP and
``VFIO_IOMMU_UNMAP_DMA`` with ``GET_DIRTY_BITMAP`` (docs/kernel-contract.md §3.6, §3.8, §3.9).

The kernel accepts exactly one bitmap page size, the IOMMU's minimum (the MIGRATION
capability's ``pgsize_bitmap``), so ``start`` ignores the size asked for and returns that
one; the tracker rescales to guest pages when they differ. The kernel tracks every
mapping of the container (including ones created after START), so the ranges passed to
``start`` only matter for the other providers.

Precision (§3.9 scope rule): with any IOMMU-backed (vfio-pci) group in the container the
kernel reports every mapped page dirty on every GET; only an all-mdev container (pinned
page scope) gets real bits. ``select`` decides ``precise`` from the devices.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from vfiod.dirty.providers.base import (
    Bitmap,
    IovaRange,
    ProviderName,
    ProviderUnavailable,
    check_report_args,
    unavailable,
)
from vfiod.errors import KernelError
from vfiod.vfio.container import Container

NAME = ProviderName.TYPE1


class Type1Provider:
    name = NAME
    #: ``report`` writes every word of a range mappings cover over what ``out`` held
    #: (§3.9), so the tracker may hand it the guest bitmap's own words
    #: (``GlobalBitmap.merge_report``)
    report_overwrites = True

    def __init__(self, container: Container, precise: bool = False, reason: str = "") -> None:
        self.container = container
        self.precise = precise
        self.reason = reason
        self.page_size: int | None = None
        self._started = False

    def start(self, ranges: Sequence[IovaRange], page_size: int) -> int:
        """START tracking; returns the IOMMU's minimum page size (the only one GET takes)."""
        cap = self.container.iommu_info(refresh=False).dirty
        if cap is None or cap.pgsize == 0:
            # an iommufd-compat container never reports the MIGRATION cap (§3.6)
            raise ProviderUnavailable(NAME, "VFIO_IOMMU_GET_INFO", self.container.name,
                                      errno.ENOTTY, "no VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION")
        try:
            self.container.dirty_start()
        except KernelError as e:
            raise unavailable(NAME, e) from e
        self._started = True
        self.page_size = cap.pgsize
        return cap.pgsize

    def report(self, iova: int, length: int, out: Bitmap | None = None) -> Bitmap:
        """GET_BITMAP (read-and-clear; split by the container at its per-call limit)."""
        pgsize = check_report_args(NAME, iova, length, self.page_size)
        try:
            return self.container.dirty_get(iova, length, pgsize, out)
        except KernelError as e:
            raise unavailable(NAME, e) from e

    def unmap(self, iova: int, size: int) -> Bitmap:
        """UNMAP_DMA with GET_DIRTY_BITMAP: the final bits and the unmap in one ioctl, so
        no write between reading and unmapping can be missed."""
        pgsize = check_report_args(NAME, iova, size, self.page_size)
        try:
            return self.container.unmap_dma_get_dirty(iova, size, pgsize)
        except KernelError as e:
            raise unavailable(NAME, e) from e

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False      # a failed STOP is not retried: the fd close ends it too
        self.container.dirty_stop()
