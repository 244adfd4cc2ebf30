"""The "none" provider: no dirty tracking at all (docs/architecture.md §1 step 4, §3).

Used when a container has no device logging, no type1 MIGRATION capability and no dirty
-capable iommufd HWPT, and as the last resort after another provider failed for good.
Every mapped page counts as dirty at every sync, so pre-copy cannot converge on RAM and
the predictor must say so; status states it plainly (``REASON``). Nothing is asked of the
kernel except the plain unmap.
"""

from __future__ import annotations

from collections.abc import Sequence

from vfiod.dirty.providers.base import (
    Bitmap,
    DmaSpace,
    IovaRange,
    ProviderName,
    check_report_args,
    ones,
)
from vfiod.vfio.bitmap import pages

NAME = ProviderName.NONE
REASON = "no dirty tracking: every mapped page counts as dirty at every sync"


class NoneProvider:
    name = NAME
    precise = False

    def __init__(self, space: DmaSpace, reason: str = REASON) -> None:
        self.space = space
        self.reason = reason
        self.page_size: int | None = None

    def start(self, ranges: Sequence[IovaRange], page_size: int) -> int:
        self.page_size = page_size
        return page_size

    def report(self, iova: int, length: int, out: Bitmap | None = None) -> Bitmap:
        pgsize = check_report_args(NAME, iova, length, self.page_size)
        return ones(pages(length, pgsize), out)

    def unmap(self, iova: int, size: int) -> Bitmap:
        pgsize = check_report_args(NAME, iova, size, self.page_size)
        self.space.unmap(iova, size)
        return ones(pages(size, pgsize))

    def stop(self) -> None:
        pass
