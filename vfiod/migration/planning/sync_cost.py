"""The final dirty sync's cost, from the syncs this migration has timed
(docs/architecture.md §4, fixed costs measured on this path).

Pure code. A dirty sync costs a part per query (each container's ioctl, the merge and
the count over the bitmap) and a part per page it reports (the simulator copies each
reported range out; a device's DMA log walks what it logged). A pre-copy pass's sync
reports everything written during the pass, the final sync only what was written
between the last pass's sync and the pause. A median of the pass syncs priced the final
sync as a whole pass's report: `vfiod demo`'s final sync was predicted at 11-12 ms and
took 3 ms; the fresh capped regimes of the bench predicted 1.4-4.3 ms for 0.1-0.3 ms.

``SyncCostLine`` keeps the recent syncs as (reported pages, seconds) and prices a sync
of ``pages`` on the line through them: the slope is the median of the slopes between
pairs of syncs whose reports differ by at least ``MIN_SPREAD_PAGES`` (closer ones are
noise over a slope of microseconds a page), never negative; the intercept is the
median of what each sync took beyond its pages. With one sync, or syncs that all
reported about as much, the price is their median, as before. The setup's sync (after
the tracker starts, before the first pass) is the one that reports almost nothing.
"""

from __future__ import annotations

import statistics
from collections import deque

#: reports closer than this (256 KiB of 4 KiB pages) give no slope
MIN_SPREAD_PAGES = 64


class SyncCostLine:
    """Recent syncs' (pages reported, seconds); ``estimate_s(pages)``."""

    def __init__(self, keep: int = 16) -> None:
        self._samples: deque[tuple[int, float]] = deque(maxlen=keep)

    def add(self, seconds: float, pages: int) -> None:
        if seconds < 0:
            raise ValueError(f"negative sync duration {seconds}")
        if pages < 0:
            raise ValueError(f"negative page count {pages}")
        self._samples.append((pages, seconds))

    @property
    def samples(self) -> int:
        return len(self._samples)

    def slope_s(self) -> float:
        """Seconds per reported page (0 until two syncs' reports differ enough)."""
        pts = sorted(self._samples)
        slopes = [(d2 - d1) / (n2 - n1)
                  for i, (n1, d1) in enumerate(pts) for n2, d2 in pts[i + 1:]
                  if n2 - n1 >= MIN_SPREAD_PAGES]
        return max(0.0, statistics.median(slopes)) if slopes else 0.0

    def estimate_s(self, pages: float) -> float:
        """A sync reporting ``pages`` (0 before any sync was timed)."""
        if not self._samples:
            return 0.0
        slope = self.slope_s()
        base = statistics.median(d - slope * n for n, d in self._samples)
        return max(0.0, base + slope * max(0.0, pages))
