"""What the final dirty sync will cost, from the syncs of this migration (docs/architecture.md
§4 "fixed costs measured on this path").

A sync's time is a fixed part (a query per container: its ioctls, the bitmap words the
kernel writes and vfiod counts) plus a part per page it reports: a device's DMA log is
read out record by record, and the simulator builds its report page by page. In a
``vfiod demo`` migration (4 GiB, devices writing 24 MB/s) the first pre-copy sync reported
about 4,000 pages written during the first pass and took 7-15 ms; the final sync, with
the guest paused, reported what was written since that sync and took 0.3-0.5 ms. The
estimate used to be the last pre-copy sync's time, so a migration of one pass predicted
its final sync 15-30 times too long.

``SyncCosts`` keeps (pages reported, seconds, when it ended) of each sync: the first a
baseline the source takes right after tracking starts (nothing written yet: the fixed
part, with whatever one-off cost a first query has), then one per pre-copy pass. The
final sync's estimate is a line through them (``robust_line``) at the pages the guest is
expected to write before it: the last interval's rate, until the time given.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable

from vfiod.dirty.tracker_status import SyncResult

#: pages: two syncs reporting less apart than this say nothing of a cost per page
MIN_SPREAD_PAGES = 64
#: seconds per reported page beyond which a slope is a broken clock (the simulator's
#: report costs about 2-4 us a page, a kernel's less)
MAX_S_PER_PAGE = 1e-4


def robust_line(samples: Iterable[tuple[float, float]], *, min_samples: int,
                min_spread: float, max_slope: float) -> tuple[float, float]:
    """(intercept, slope) through (x, y) samples, Theil-Sen: the median slope over the
    pairs whose x differ, within 0..``max_slope``, and the median intercept it leaves;
    robust to one slow sample that a least-squares line would follow. With fewer than
    ``min_samples`` samples, or x spread less than ``min_spread``: the median y, slope 0;
    with none, (0, 0)."""
    xs = list(samples)
    if not xs:
        return 0.0, 0.0
    x_values = [x for x, _ in xs]
    if len(xs) < min_samples or max(x_values) - min(x_values) < min_spread:
        return float(statistics.median(y for _, y in xs)), 0.0
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(xs)
              for x2, y2 in xs[i + 1:] if x2 != x1]
    slope = min(max_slope, max(0.0, statistics.median(slopes)))
    return float(statistics.median(y - slope * x for x, y in xs)), slope


class SyncCosts:
    """The syncs of one migration: (pages reported, seconds, end time), the newest ``keep``."""

    def __init__(self, keep: int = 16) -> None:
        self._samples: deque[tuple[int, float, float]] = deque(maxlen=keep)

    def add(self, pages: int, seconds: float, at: float) -> None:
        """A sync that reported ``pages`` and took ``seconds``, ending at ``at``."""
        if pages < 0 or seconds < 0:
            raise ValueError(f"a sync of {pages} pages in {seconds} s")
        self._samples.append((pages, seconds, at))

    def add_sync(self, sync: SyncResult, at: float) -> None:
        """``add`` a tracker's sync: the pages it reported and its duration."""
        self.add(sync.new_dirty_pages, sync.duration_s, at)

    def expected_pages(self, at: float) -> float:
        """The pages a sync at ``at`` would report: the last interval's rate (pages
        reported over the time since the sync before), from the last sync until ``at``."""
        if len(self._samples) < 2:
            return 0.0
        (_, _, before), (pages, _, last) = self._samples[-2], self._samples[-1]
        if last <= before:
            return 0.0
        return pages / (last - before) * max(0.0, at - last)

    def estimate_s(self, at: float) -> float:
        """The time of a sync at ``at`` (the final one: after the pause and the devices'
        stop); 0 before any sync."""
        intercept, slope = robust_line(((p, s) for p, s, _ in self._samples), min_samples=2,
                                       min_spread=MIN_SPREAD_PAGES, max_slope=MAX_S_PER_PAGE)
        return max(0.0, intercept + slope * self.expected_pages(at))
