"""iommufd HWPT dirty tracking: ``IOMMU_HWPT_SET_DIRTY_TRACKING`` enable/disable and
``IOMMU_HWPT_GET_DIRTY_BITMAP`` with and without ``NO_CLEAR`` (docs/kernel-contract.md §4.1, §4.4).

Needs a HWPT allocated with ``IOMMU_HWPT_ALLOC_DIRTY_TRACKING`` (the device's IOMMU has
``IOMMU_HW_CAP_DIRTY_TRACKING``); the kernel answers EOPNOTSUPP otherwise, which becomes
``ProviderUnavailable``. Enabling clears stale bits, so the first GET shows only writes
after ``start``. GET accepts any power-of-two page size aligned with the range, so the
size asked for is the one used.

iommufd has no unmap-and-read primitive: ``unmap`` reads with ``NO_CLEAR`` (the bits stay
in the IOPTEs, so nothing is lost if the unmap then fails and the range is read again)
and then unmaps. A device write landing between those two ioctls is the one case the
uAPI cannot report; the owner of the mapping should quiesce the device's use of that
range first (a vIOMMU unmap does).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from vfiod.dirty.providers.base import (
    Bitmap,
    DmaSpace,
    IovaRange,
    ProviderName,
    ProviderUnavailable,
    check_report_args,
    unavailable,
)
from vfiod.errors import KernelError

NAME = ProviderName.IOMMUFD


class IommufdProvider:
    name = NAME
    precise = True

    def __init__(self, space: DmaSpace, reason: str = "") -> None:
        if space.iommufd is None:
            raise ValueError(f"{NAME} dirty tracking on {space.name}: not an iommufd space")
        self.space = space
        self.ios = space.iommufd
        self.reason = reason
        self.page_size: int | None = None
        self._enabled = False

    def _hwpt(self) -> int:
        if self.ios.hwpt_id is None or not self.ios.dirty_capable:
            raise ProviderUnavailable(NAME, "IOMMU_HWPT_SET_DIRTY_TRACKING", self.space.name,
                                      errno.EOPNOTSUPP,
                                      "devices are not attached to a HWPT allocated with "
                                      "IOMMU_HWPT_ALLOC_DIRTY_TRACKING")
        return self.ios.hwpt_id

    def start(self, ranges: Sequence[IovaRange], page_size: int) -> int:
        hwpt = self._hwpt()
        try:
            self.ios.iommufd.set_dirty_tracking(hwpt, True)
        except KernelError as e:
            raise unavailable(NAME, e) from e
        self._enabled = True
        self.page_size = page_size
        return page_size

    def _get(self, iova: int, length: int, out: Bitmap | None, no_clear: bool) -> Bitmap:
        pgsize = check_report_args(NAME, iova, length, self.page_size)
        try:
            return self.ios.iommufd.get_dirty_bitmap(self._hwpt(), iova, length, pgsize, out,
                                                     no_clear=no_clear)
        except KernelError as e:
            raise unavailable(NAME, e) from e

    def report(self, iova: int, length: int, out: Bitmap | None = None) -> Bitmap:
        return self._get(iova, length, out, no_clear=False)

    def unmap(self, iova: int, size: int) -> Bitmap:
        bits = self._get(iova, size, None, no_clear=True)
        self.space.unmap(iova, size)
        return bits

    def stop(self) -> None:
        if not self._enabled:
            return
        self._enabled = False
        assert self.ios.hwpt_id is not None
        self.ios.iommufd.set_dirty_tracking(self.ios.hwpt_id, False)
