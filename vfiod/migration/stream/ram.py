"""``GuestRam``: guest-physical pages → slices of the memory views that back them.

docs/architecture.md §1 step 3: a guest's RAM is one or more shared files that the vfio layer mmaps;
this object is how the stream reaches them without a Python object per page. The source
gives it read views (its mmaps); the destination gives it writable views, and RAM payload is
received straight into them. Pages are numbered globally: page ``p`` is guest-physical
address ``p * page_size``, the numbering the dirty bitmaps use (docs/architecture.md §3).

A range must lie inside one region: ``locate`` refuses anything else with ``ValueError``
(the reader turns that into a located ``RecordError``); ``split`` cuts a range that crosses
from one region into an adjacent one, for the writer.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from vfiod.vfio import RamRegion


class GuestRam:
    def __init__(self, page_size: int, regions: Sequence[RamRegion],
                 views: Sequence[object], *, writable: bool = False) -> None:
        if len(regions) != len(views):
            raise ValueError(f"{len(regions)} regions but {len(views)} memory views")
        self.page_size = page_size
        self.regions = tuple(regions)
        order = sorted(range(len(regions)), key=lambda i: regions[i].gpa)
        self._index = order  # sorted position -> region index (header order)
        self._starts = [regions[i].gpa // page_size for i in order]
        self._ends = [(regions[i].gpa + regions[i].size) // page_size for i in order]
        self._views: list[memoryview] = []
        for r, v in zip(regions, views, strict=True):
            mv = memoryview(v)  # type: ignore[arg-type]
            if mv.ndim != 1 or mv.itemsize != 1:
                mv = mv.cast("B")
            if mv.nbytes != r.size:
                raise ValueError(f"region {r.name}: memory view has {mv.nbytes} bytes, the "
                                 f"layout says {r.size}")
            if writable and mv.readonly:
                raise ValueError(f"region {r.name}: destination memory must be writable")
            self._views.append(mv)

    def locate(self, first_page: int, count: int) -> tuple[int, memoryview]:
        """(region index, view of exactly those pages); ``ValueError`` if not in one region."""
        if count <= 0:
            raise ValueError(f"page count {count} must be positive")
        pos = bisect.bisect_right(self._starts, first_page) - 1
        if pos < 0 or first_page + count > self._ends[pos]:
            raise ValueError(f"guest pages {first_page:#x}+{count} are not inside one RAM "
                             "region of the layout")
        idx = self._index[pos]
        off = (first_page - self._starts[pos]) * self.page_size
        return idx, self._views[idx][off:off + count * self.page_size]

    def region_pages(self, idx: int) -> tuple[int, memoryview]:
        """Region ``idx`` (header order): its first guest page and its whole view."""
        return self.regions[idx].gpa // self.page_size, self._views[idx]

    def split(self, first_page: int, count: int, max_pages: int) -> list[tuple[int, int, int]]:
        """(region index, first page, count) pieces of at most ``max_pages`` each."""
        out: list[tuple[int, int, int]] = []
        page, left = first_page, count
        while left > 0:
            pos = bisect.bisect_right(self._starts, page) - 1
            if pos < 0 or page >= self._ends[pos]:
                raise ValueError(f"guest page {page:#x} is not in any RAM region")
            n = min(left, self._ends[pos] - page, max_pages)
            out.append((self._index[pos], page, n))
            page += n
            left -= n
        return out
