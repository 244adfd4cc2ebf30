"""``TornPages``: guest pages whose live RAM record failed its checksum, until re-sent.

Why this exists (docs/architecture.md §5, "zero-copy ... over the mmap"): during pre-copy the guest
runs, and the source sends RAM straight from the guest mapping. A page the guest writes
between the source's checksum and the kernel's copy arrives with a checksum that does not
match. That page is dirty again, so dirty tracking makes the source send it in a later pass
(at the latest in stop-and-copy, when nothing moves). Such records carry the ``LIVE`` flag;
the destination does not fail on them but remembers their pages here, removes pages as
verified records cover them, and refuses the stream if any page is still torn when RAM is
complete. Corruption in transit of a page the guest did not touch is therefore still caught
(it is never re-sent), and reported with the record that brought it.

Sorted, disjoint half-open intervals of page numbers; each keeps the (record index, byte
offset) of the earliest failed record that covered it. The common case — nothing torn —
costs one truth test per RAM record.
"""

from __future__ import annotations

import bisect


class TornPages:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._where: list[tuple[int, int]] = []

    def __bool__(self) -> bool:
        return bool(self._starts)

    @property
    def pages(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def intervals(self) -> list[tuple[int, int, int, int]]:
        """(first page, end page, record, offset) of every torn run, in page order."""
        return [(s, e, r, o) for s, e, (r, o) in zip(self._starts, self._ends, self._where,
                                                     strict=True)]

    def first(self) -> tuple[int, int, int, int]:
        """The torn run whose failed record came first in the stream."""
        return min(self.intervals(), key=lambda t: t[2])

    def add(self, first: int, count: int, record: int, offset: int) -> None:
        start, end = first, first + count
        lo = bisect.bisect_left(self._ends, start)   # first interval that may touch
        hi = bisect.bisect_right(self._starts, end)  # one past the last that may touch
        where = (record, offset)
        if lo < hi:  # merge with the touching ones; keep the earliest record
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
            where = min([where, *self._where[lo:hi]])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]
        self._where[lo:hi] = [where]

    def clear(self, first: int, count: int) -> None:
        """Pages [first, first + count) arrived verified."""
        if not self._starts:
            return
        start, end = first, first + count
        lo = bisect.bisect_right(self._ends, start)
        hi = bisect.bisect_left(self._starts, end)
        if lo >= hi:
            return
        keep_s: list[int] = []
        keep_e: list[int] = []
        keep_w: list[tuple[int, int]] = []
        for s, e, w in zip(self._starts[lo:hi], self._ends[lo:hi], self._where[lo:hi],
                           strict=True):
            if s < start:
                keep_s.append(s)
                keep_e.append(start)
                keep_w.append(w)
            if e > end:
                keep_s.append(end)
                keep_e.append(e)
                keep_w.append(w)
        self._starts[lo:hi] = keep_s
        self._ends[lo:hi] = keep_e
        self._where[lo:hi] = keep_w
