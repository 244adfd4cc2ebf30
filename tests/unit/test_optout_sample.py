"""The opted-out containers' sample (``session/optout_sample.py``; docs/architecture.md
§4): a fixed uniform sample of their pages, read again at each prediction against the
CRCs the source last hashed; its upper bound and the history's, whichever is larger, is
the share of their mappings counted dirty."""

from __future__ import annotations

import numpy as np
import pytest

from vfiod.migration.session.optout_sample import (
    OptedOutSample,
    opted_out_share,
    with_opted_out_share,
)
from vfiod.migration.session.phases import PredictionNumbers
from vfiod.vfio import RamRegion

PS = 4096


def _ram(pages: int) -> tuple[list[RamRegion], list[memoryview], bytearray]:
    """Two regions over one zeroed buffer: pages 0..n/2 and n/2..n."""
    mem = bytearray(pages * PS)
    half = pages // 2 * PS
    view = memoryview(mem)
    return ([RamRegion("low", 0, half), RamRegion("high", half, len(mem) - half)],
            [view[:half], view[half:]], mem)


def _sample(runs: list[tuple[int, int]], pages: int = 16384, **kw: int
            ) -> tuple[OptedOutSample, bytearray]:
    regions, views, mem = _ram(pages)
    return OptedOutSample(runs, regions, views, PS, **kw), mem


def test_the_sample_is_drawn_from_the_runs_only_and_spread_over_them() -> None:
    runs = [(100, 3000), (10_000, 1000)]
    s, _ = _sample(runs, size=1024, seed=1)
    assert s.mapped_pages == 4000 and len(s.pages) == 1024
    assert len(set(s.pages.tolist())) == 1024                   # no page twice
    inside = ((s.pages >= 100) & (s.pages < 3100)) | ((s.pages >= 10_000) & (s.pages < 11_000))
    assert inside.all()
    # uniform over the pages: the second run holds a quarter of them
    assert 0.18 < np.count_nonzero(s.pages >= 10_000) / 1024 < 0.32
    small, _ = _sample([(7, 5)], size=1024)
    assert sorted(small.pages.tolist()) == [7, 8, 9, 10, 11]     # smaller than a sample: all
    none, _ = _sample([])
    assert none.pages.size == 0 and none.share() is None


def test_the_share_counts_sampled_pages_whose_content_changed_since_tracking_began() -> None:
    s, mem = _sample([(0, 16384)], size=1024, seed=2)
    assert s.share() == pytest.approx(1 / 1024)                 # nothing written: one page
    # write a quarter of the sampled pages, in both regions
    for p in s.pages[::4].tolist():
        mem[p * PS + 17] = 0x5A
    share = s.share()
    assert share is not None and 0.25 < share < 0.25 + 0.03 + 1 / 1024 + 1e-9
    # the baseline is the sample's own: pages written back to what they held count no more
    for p in s.pages[::4].tolist():
        mem[p * PS + 17] = 0
    assert s.share() == pytest.approx(1 / 1024)
    sampled = set(s.pages.tolist())
    mem[next(p for p in range(16384) if p not in sampled) * PS] = 9     # not sampled
    assert s.share() == pytest.approx(1 / 1024)


def test_the_larger_of_sample_and_history_counts_and_the_whole_mapping_when_neither() -> None:
    assert opted_out_share(None, None) == 1.0
    assert opted_out_share(0.1, None) == 0.1
    assert opted_out_share(None, 0.2) == 0.2
    assert opted_out_share(0.3, 0.2) == 0.3                     # history never lowers it
    num = PredictionNumbers(dirty_ram_bytes=5000, dirty_runs=2, dirty_records=2,
                            measured_dirty_bytes=1000, device_stopcopy_bytes=0,
                            device_precopy_bytes=0, tracking=True, assumed_dirty_bytes=4000)
    s, mem = _sample([(0, 64)], pages=64, size=64)
    for p in range(16):                                         # a quarter written
        mem[p * PS] = 1
    got = with_opted_out_share(num, s, None)
    share = 0.25 + 2 * (0.25 * 0.75 / 64) ** 0.5 + 1 / 64
    assert got.assumed_dirty_bytes == int(4000 * share)
    assert got.dirty_ram_bytes == 1000 + int(4000 * share)
    assert with_opted_out_share(num, None, None) == num         # nothing known: whole
    # nothing skipped: the sample is not read at all
    plain = PredictionNumbers(1000, 1, 1, 1000, 0, 0, True)
    assert with_opted_out_share(plain, s, 0.0) is plain
