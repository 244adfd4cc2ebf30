"""How much of the opted-out containers' RAM their devices wrote, estimated during
pre-copy without asking their bitmaps (docs/architecture.md §4, the opted-out share).

A container whose device opted out of pre-copy dirty tracking is not queried until
stop-and-copy, so before anything is learnt its whole mapping counted dirty: 16 MiB at
40 MB/s is 420 ms, over a 300 ms limit, and the first migration of such a guest could not
converge (its timeout cancelled or forced it) whatever its device wrote.
``OptedOutSample`` takes the CRC of a fixed random sample of the opted-out pages when
tracking starts, reads them again at each prediction, and counts those whose content
changed: what the stop-and-copy query will report, as a fraction of the mapping. The
share counted dirty is the sample's upper bound (the fraction changed, plus two standard
errors, plus one sampled page), and never less than what earlier stop-and-copy queries
taught (``SwitchoverHistory.opted_out_share``).

The baseline is the sample's own, taken right after tracking started: against the
digests' CRCs (as each page was last sent) the first version saw only the writes since
the first pass ended, 22% of a window its device had rewritten 92% of.

What it cannot see: a write of the bytes a page already held (its bitmap bit is set, its
CRC unchanged), or a page written and then written back. The stop-and-copy query still
sends every page the bitmap reports, whatever was predicted, and the history then learns
the rate it found.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from vfiod.migration.session.phases import PredictionNumbers
from vfiod.migration.stream.pagecrc import page_crcs_at
from vfiod.vfio import RamRegion

#: pages read again per prediction: 4 MiB of CRC, a fraction of a millisecond; two
#: standard errors of a fraction from 1024 pages are at most 3% of the mapping
SAMPLE_PAGES = 1024


class OptedOutSample:
    """A fixed uniform sample of the pages of ``runs`` ((first guest page, pages) each)
    and their CRCs now, over the guest's RAM ``regions`` as ``views`` map them."""

    def __init__(self, runs: Sequence[tuple[int, int]], regions: Sequence[RamRegion],
                 views: Sequence[Any], page_size: int, size: int = SAMPLE_PAGES,
                 seed: int = 0) -> None:
        counts = np.array([n for _, n in runs], dtype=np.int64)
        firsts = np.array([f for f, _ in runs], dtype=np.int64)
        self.mapped_pages = int(counts.sum())
        picks = np.sort(np.random.default_rng(seed).choice(
            self.mapped_pages, size=min(size, self.mapped_pages), replace=False))
        ends = np.cumsum(counts)
        run = np.searchsorted(ends, picks, side="right")
        pages = firsts[run] + picks - (ends - counts)[run]
        self.page_size = page_size
        # per region: its views and the sampled pages' indexes in it (pages outside every
        # region, never the case for a mapping of guest RAM, are left out)
        self._parts: list[tuple[memoryview, np.ndarray]] = []
        kept: list[np.ndarray] = []
        for region, view in zip(regions, views, strict=True):
            first = region.gpa // page_size
            mine = pages[(pages >= first) & (pages < first + region.size // page_size)]
            if mine.size:
                self._parts.append((memoryview(view).cast("B"), mine - first))
                kept.append(mine)
        self.pages = np.concatenate(kept) if kept else np.empty(0, dtype=np.int64)
        self._baseline = self._crcs()

    def _crcs(self) -> np.ndarray:
        if not self._parts:
            return np.empty(0, dtype=np.uint32)
        return np.concatenate([page_crcs_at(view, idx, self.page_size)
                               for view, idx in self._parts])

    def share(self) -> float | None:
        """The upper bound of the part of the opted-out pages written since the sample
        was taken; None with nothing to sample."""
        n = self._baseline.size
        if n == 0:
            return None
        p = int(np.count_nonzero(self._crcs() != self._baseline)) / n
        return min(1.0, p + 2 * math.sqrt(p * (1 - p) / n) + 1 / n)


def opted_out_share(sampled: float | None, learnt: float | None) -> float:
    """The part of the opted-out mappings to count dirty: the larger of the sample's
    and the history's; the whole mapping when neither knows."""
    known = [x for x in (sampled, learnt) if x is not None]
    return max(known) if known else 1.0


def with_opted_out_share(num: PredictionNumbers, sample: OptedOutSample | None,
                         learnt: float | None) -> PredictionNumbers:
    """``num`` counting only ``opted_out_share`` of the opted-out containers' mapped
    bytes dirty (the sample is read only while they are skipped: ``assumed_dirty_bytes``)."""
    if not num.assumed_dirty_bytes:
        return num
    share = opted_out_share(sample.share() if sample is not None else None, learnt)
    counted = int(num.assumed_dirty_bytes * share)
    return replace(num, assumed_dirty_bytes=counted,
                   dirty_ram_bytes=num.dirty_ram_bytes - num.assumed_dirty_bytes + counted)
